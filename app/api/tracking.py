"""The tracker: the only writer of `pipeline_tracking`, as small parts over one store.

- store.py: this thread's connection, transactions retried on deadlock, reads
- schema.py: the tracking tables' migrations, applied once and again after a table vanished
- queries.py: the named SQL, built from the stage vocabulary (app/stages.py)
- transitions.py: registration and each task's moves (the state machine's rules)
- leases.py: claims, leases (heartbeats) and the reaper
- reports.py: queues, task listings, file history, summary, throughput
- hosts.py: which host runs what, from owner ids, leases and transitions
- errors.py: what the rules refuse; the HTTP layer (service.py) maps them to codes
"""
from __future__ import annotations

import orjson

from .hosts import Hosts
from .leases import Leases
from .reports import Reports
from .schema import Schema
from .store import Store
from .transitions import Moved, Transitions, rejected_counts
from ..stages import Stage, Status


class Tracker:
    """The operations the HTTP routes call, each bound from the part that owns it."""

    def __init__(self, conns, shard_count: int, lease_seconds: float, max_attempts: int):
        self.shard_count = shard_count
        self.store = Store(conns)
        self.schema = Schema(self.store, conns.url)
        self.transitions = Transitions(self.store, lease_seconds, max_attempts)
        self.leases = Leases(self.store, lease_seconds, max_attempts)
        self.reports = Reports(self.store)
        self.hosts = Hosts(self.store, lease_seconds).report
        t, le, r = self.transitions, self.leases, self.reports
        self.register, self.ingest_done, self.transition, self.retry_all = (
            t.register, t.ingest_done, t.transition, t.retry_all)
        self.claim, self.may_claim, self.heartbeat, self.reap = le.claim, le.may_claim, le.heartbeat, le.reap
        self.upstream = le.upstream
        self.queue, self.tasks, self.file, self.summary, self.throughput = (
            r.queue, r.tasks, r.file, r.summary, r.throughput)

    def done_and_claim(self, stage: str, items: list[tuple[str, int, int | None, dict | None]], owner: str,
                       limit: int, shard: int | None) -> tuple[list[Moved], list[dict]] | None:
        """`done` of `items` (filename, shard, events, stats) by `owner`, then its claim of up
        to `limit` next tasks (of `shard`), in one transaction: the dones' statements travel
        with the claim's first reads, so a daemon's report and its next claim cost one commit
        and one round trip instead of two transactions and three or four; several
        dones are one set of statements (`Transitions.done_many_sql`). Only when
        every `done` takes effect as a first `done`; otherwise nothing is written and the
        answer is None: the caller then reports each task the ordinary way (a repeat, a
        refusal to explain) and claims on its own. `limit` 0: the dones alone, one transaction."""
        stage = Stage(stage)
        texts = [(filename, task_shard, events, orjson.dumps(stats).decode() if stats else None,
                  rejected_counts(stats)) for filename, task_shard, events, stats in items]
        if len(texts) == 1:
            filename, task_shard, events, stats_text, rejected = texts[0]
            statements = self.transitions.done_sql(stage, filename, task_shard, owner, events, stats_text, rejected)

            def attempts(results):
                return [results[1].rows[0]["attempts"] or 0] if results[0].rowcount == 1 else None
        else:
            statements, attempts = self.transitions.done_many_sql(stage, texts, owner)
        moved: list[Moved] = []

        def proceed(results) -> bool:
            got = attempts(results)
            moved[:] = [] if got is None else [Moved(filename, task_shard, stage, Status.DONE, True, tries)
                                               for (filename, task_shard, *_), tries in zip(items, got)]
            return got is not None

        def only_done(t):
            if not proceed(t.run(*statements)):
                t.finish(commit=False)
                return None
            t.finish()
            return []
        gate = f"@pipeline_done = {len(texts)}"   # what `attempts` checks, as the server sees it
        claimed = self.store.tx(lambda t: self.leases.claim_in(t, stage, limit, shard, owner, tuple(statements),
                                                               proceed, gate) if limit else only_done(t))
        return None if claimed is None else (list(moved), claimed)
