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

from .hosts import Hosts
from .leases import Leases
from .reports import Reports
from .schema import Schema
from .store import Store
from .transitions import Transitions


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
        self.claim, self.heartbeat, self.reap = le.claim, le.heartbeat, le.reap
        self.queue, self.tasks, self.file, self.summary, self.throughput = (
            r.queue, r.tasks, r.file, r.summary, r.throughput)
