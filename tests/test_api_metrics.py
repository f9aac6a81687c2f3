"""GET /metrics: the Prometheus text format, values that agree with the tracking tables whichever
gunicorn process answers, and a scrape whose reads do not grow with the tables."""
from __future__ import annotations

import time

import requests
from prometheus_client.parser import text_string_to_metric_families

from app import db
from app.api import metrics, schema, tracking
from app.api.queries import SQL_COUNTS_SCANNED
from tests.test_api_concurrency import server_db
from tests.test_api_contract import BASE, module_api, new_name

LEASE = 0.5


def scrape(port: int) -> dict[tuple, float]:
    resp = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(resp.text) for s in family.samples}


def test_metrics_agree_with_the_tables_from_every_api_process(tmp_path_factory):
    with module_api(tmp_path_factory, LEASE_SECONDS=str(LEASE), REAP_INTERVAL="0.2", MAX_ATTEMPTS="5") as server:
        root = f"http://127.0.0.1:{server.port}{BASE}"
        s = requests.Session()
        names = [new_name() for _ in range(4)]
        for name in names:
            s.post(f"{root}/files/register", json={"filename": name}, timeout=10).raise_for_status()
            s.post(f"{root}/stages/event-ingest/done", json={"filename": name}, timeout=10).raise_for_status()
        claimed = s.post(f"{root}/queues/shard-splitter/claim", json={"worker": "w", "limit": 8}, timeout=10).json()
        assert len(claimed["items"]) == 8
        first = names[0]
        # The splitter reports its file's rejections on each shard's task, written with one of them.
        for shard, written in ((0, True), (1, False)):
            s.post(f"{root}/stages/shard-splitter/done", timeout=10, json={
                "filename": first, "shard": shard, "worker": "w",
                "stats": {"rejected": {"malformed_json": 3, "no_shop": 1}, "rejected_file_written": written}}
                   ).raise_for_status()
        s.post(f"{root}/stages/shard-splitter/fail", json={"filename": names[1], "shard": 0, "worker": "w",
                                                          "error": "x"}, timeout=10).raise_for_status()
        s.post(f"{root}/stages/shard-splitter/retry", json={"filename": names[1], "shard": 0},
               timeout=10).raise_for_status()
        # The rest are left to expire: the reaper returns them.
        time.sleep(LEASE * 3)
        worker = s.post(f"{root}/queues/shard-worker/claim", json={"worker": "v", "shard": 0}, timeout=10).json()
        assert [i["filename"] for i in worker["items"]] == [first]
        s.post(f"{root}/stages/shard-worker/done", timeout=10, json={
            "filename": first, "shard": 0, "worker": "v", "stats": {"rejected": {"over_balance": 2}}}
               ).raise_for_status()

        conn = server_db(server)
        try:
            with conn.cursor() as cur:
                cur.execute(SQL_COUNTS_SCANNED)
                truth = {(st, str(sh), status): int(n) for st, sh, status, n in cur.fetchall()}
                cur.execute("SELECT stage, action, COUNT(*) FROM pipeline_transitions GROUP BY stage, action")
                actions = {(st, a): int(n) for st, a, n in cur.fetchall()}
                cur.execute("SELECT stage, COUNT(*), SUM(duration_ms) FROM pipeline_transitions "
                            "WHERE to_status='done' AND duration_ms IS NOT NULL GROUP BY stage")
                runs = {st: (int(n), int(ms)) for st, n, ms in cur.fetchall()}
        finally:
            conn.close()
        assert actions[("shard-splitter", "reap")] >= 5

        answers = [scrape(server.port) for _ in range(8)]   # a connection each: both processes answer
        ageless = [{k: v for k, v in a.items() if k[0] != "pipeline_oldest_ready_age_seconds"} for a in answers]
        assert all(a == ageless[0] for a in ageless)
        m = answers[0]
        for (stage, shard, status), n in truth.items():
            if status == "ready":
                assert m[("pipeline_tasks_ready", (("shard", shard), ("stage", stage)))] == n
            else:
                assert m[("pipeline_tasks", (("shard", shard), ("stage", stage), ("status", status)))] == n
        assert sum(v for (name, _), v in m.items() if name == "pipeline_tasks") == 4 * 2 * 4
        assert m[("pipeline_lease_expiries_total", (("stage", "shard-splitter"),))] == actions[("shard-splitter", "reap")]
        assert m[("pipeline_retries_total", (("stage", "shard-splitter"),))] == 1
        for stage, (n, ms) in runs.items():
            assert m[("pipeline_task_run_seconds_count", (("stage", stage),))] == n
            assert m[("pipeline_task_run_seconds_bucket", (("le", "+Inf"), ("stage", stage)))] == n
            assert abs(m[("pipeline_task_run_seconds_sum", (("stage", stage),))] - ms / 1000) < 1e-6
        assert m[("pipeline_rejected_lines_total", (("reason", "malformed_json"), ("stage", "shard-splitter")))] == 3
        assert m[("pipeline_rejected_lines_total", (("reason", "no_shop"), ("stage", "shard-splitter")))] == 1
        assert m[("pipeline_rejected_lines_total", (("reason", "over_balance"), ("stage", "shard-worker")))] == 2
        # The reaper returned the splitter's tasks: they are ready, the oldest for a second or more.
        assert m[("pipeline_oldest_ready_age_seconds", (("stage", "shard-splitter"),))] >= LEASE


def test_a_scrape_reads_the_same_few_rows_at_any_table_size(make_database):
    """Rows the server reads for one scrape (its session's Handler_read_* counters), with 200 and
    with 20,000 finished tasks: a few dozen both times. A scan of either table would read them all."""
    url = make_database("scrape")
    conns = db.ThreadConnections(url, multi_statements=True)
    tracker = tracking.Tracker(conns, 2, 60.0, 5)
    tracker.schema.ensure()
    collector = metrics.Metrics(tracker.store)

    def fill(upto: int, start: int) -> None:
        rows = [(f"2025{i:010d}", s) for i in range(start, upto) for s in (0, 1)]
        for at in range(0, len(rows), 2000):
            chunk = rows[at:at + 2000]
            tracker.store.execute(
                "INSERT INTO pipeline_tracking (filename, shard, event_ingest_status, shard_splitter_status, "
                "shard_worker_status, mysql_sender_status) VALUES "
                + ",".join(["(%s,%s,'done','done','done','done')"] * len(chunk)), [v for r in chunk for v in r])
            tracker.store.execute(
                "INSERT INTO pipeline_transitions (tracking_id, filename, shard, stage, from_status, to_status, action,"
                " duration_ms) VALUES " + ",".join(["(0,%s,%s,'mysql-sender','started','done','done',120)"] * len(chunk)),
                [v for r in chunk for v in r])
        tracker.claim("mysql-sender", 1, 0, "w")   # nothing ready: leaves the tables as they are

    def rows_read() -> int:
        def handler_reads() -> int:
            return sum(int(r["Value"]) for r in tracker.store.read("SHOW SESSION STATUS LIKE 'Handler_read%%'"))
        before = handler_reads()
        text = collector.render()
        assert b"pipeline_tasks{" in text
        return handler_reads() - before

    fill(100, 0)
    small = rows_read()
    fill(10_000, 100)
    big = rows_read()
    conns.discard()
    assert small < 200 and big < 200, (small, big)   # a scan of either table reads 20,000 rows
    assert set(schema.TABLES) >= {"pipeline_task_counts", "pipeline_transition_counts"}
