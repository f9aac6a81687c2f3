"""GET /metrics: the tracker's figures in the Prometheus text format.

Every value is read from the database at scrape time (a custom collector, no in-process
counters), so under gunicorn every process answers the same. Each read is of a bounded size,
whatever the tracking table holds: the counters the triggers of migration 0004 keep, the first
row of each ready index, and the rejected-line counts `done` adds. No scrape scans a table.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from ..stages import STAGES, WORK_STAGES, Action
from .queries import READY, sql_ready
from .store import Store

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# The run-time buckets of migration 0004's trigger (pipeline_transition_counts.le_ms), in ms;
# INF_MS stands for +Inf.
RUN_BUCKETS_MS = (50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000)
INF_MS = 2147483647

SQL_TRANSITION_COUNTS = ("SELECT stage, action, to_status, le_ms, SUM(n) n, SUM(sum_ms) sum_ms "
                         "FROM pipeline_transition_counts GROUP BY stage, action, to_status, le_ms")
SQL_REJECTED = "SELECT stage, reason, n FROM pipeline_rejected_counts"
AGE = "TIMESTAMPDIFF(MICROSECOND, created_at, NOW(3)) / 1e6 age"
# The oldest ready task of each work stage: the first row of its ready index, one per stage.
SQL_OLDEST_READY = " UNION ALL ".join(
    f"SELECT {s.sql} stage, age FROM ({sql_ready(s, False, AGE, 'LIMIT 1')}) x{n}" for n, s in enumerate(WORK_STAGES))
SCRAPE_SQL = ("SELECT stage, shard, status, n FROM pipeline_task_counts", SQL_OLDEST_READY, SQL_TRANSITION_COUNTS,
              SQL_REJECTED)


class TrackerCollector:
    """Reads the figures at each collect (one scrape: four small reads)."""

    def __init__(self, store: Store):
        self.store = store

    def collect(self):
        counts_sql, oldest_sql, transitions_sql, rejected_sql = SCRAPE_SQL
        read = self.store.read
        tasks = GaugeMetricFamily("pipeline_tasks", "Tasks per stage, shard and status.",
                                  labels=["stage", "shard", "status"])
        ready = GaugeMetricFamily("pipeline_tasks_ready", "Tasks a stage can claim: previous stage done, "
                                  "this one new.", labels=["stage", "shard"])
        for r in read(counts_sql):
            if r["status"] == READY:
                ready.add_metric([r["stage"], str(r["shard"])], int(r["n"]))
            else:
                tasks.add_metric([r["stage"], str(r["shard"]), r["status"]], int(r["n"]))
        yield tasks
        yield ready

        oldest = {r["stage"]: float(r["age"]) for r in read(oldest_sql) if r["age"] is not None}
        age = GaugeMetricFamily("pipeline_oldest_ready_age_seconds", "Age (since registration) of the oldest "
                                "task a stage could claim; 0 when none is ready.", labels=["stage"])
        for stage in WORK_STAGES:
            age.add_metric([stage.value], max(oldest.get(stage.value, 0.0), 0.0))
        yield age

        moves = CounterMetricFamily("pipeline_transitions", "Outcomes of tasks (done, fail, reap, retry, release, "
                                    "rewind) since the counters began (migration 0004), by stage, action and "
                                    "resulting status.", labels=["stage", "action", "to_status"])
        expiries = CounterMetricFamily("pipeline_lease_expiries", "Started tasks whose lease ran out "
                                       "(returned to new or failed by the reaper).", labels=["stage"])
        retries = CounterMetricFamily("pipeline_retries", "Failed tasks sent back to new (retry).",
                                      labels=["stage"])
        summed: dict[tuple, int] = {}
        by_stage: dict[str, dict[int, tuple[int, int]]] = {}
        for r in read(transitions_sql):
            key = (r["stage"], r["action"], r["to_status"])
            summed[key] = summed.get(key, 0) + int(r["n"])
            if int(r["le_ms"]) >= 0:
                by_stage.setdefault(r["stage"], {})[int(r["le_ms"])] = (int(r["n"]), int(r["sum_ms"]))
        for (stage, action, to), n in sorted(summed.items()):
            moves.add_metric([stage, action, to], n)
        for stage in WORK_STAGES:
            expiries.add_metric([stage.value], sum(n for (s, a, _), n in summed.items()
                                                   if s == stage and a == Action.REAP))
            retries.add_metric([stage.value], sum(n for (s, a, _), n in summed.items()
                                                  if s == stage and a == Action.RETRY))
        yield moves
        yield expiries
        yield retries

        runs = HistogramMetricFamily("pipeline_task_run_seconds", "Run time of finished tasks (claim to done).",
                                     labels=["stage"])
        for stage in STAGES:
            got = by_stage.get(stage.value)
            if got is None:
                continue
            cumulative, buckets = 0, []
            for le in (*RUN_BUCKETS_MS, INF_MS):
                cumulative += got.get(le, (0, 0))[0]
                buckets.append(("+Inf" if le == INF_MS else f"{le / 1000:g}", cumulative))
            runs.add_metric([stage.value], buckets, sum_value=sum(s for _, s in got.values()) / 1000)
        yield runs

        rejected = CounterMetricFamily("pipeline_rejected_lines", "Lines rejected, by the stage that rejected "
                                       "them and the reason (as its `done` reported them).",
                                       labels=["stage", "reason"])
        for r in read(rejected_sql):
            rejected.add_metric([r["stage"], r["reason"]], int(r["n"]))
        yield rejected


class Metrics:
    def __init__(self, store: Store):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(TrackerCollector(store))

    def render(self) -> bytes:
        return generate_latest(self.registry)
