"""Long-poll claims: a claim that found nothing sleeps here until work may be ready for it.

One watcher thread per API process, and only while someone waits, reads the task counts the
triggers keep (a few dozen rows) every `interval` seconds; when they changed, waiters whose
stage and shard have ready tasks wake and claim again. A change made by this very process
(`hint`) wakes its waiters at once, without reading anything. So however many daemons wait,
the database sees one small read per interval per process, and another process's change is
noticed within one interval: several API instances and gunicorn processes need nothing shared
but the database.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from ..stages import Status
from .queries import READY

STARTED = Status.STARTED.value

log = logging.getLogger("pipeline-apid")


class ReadyWatch:
    """`read()` returns rows with stage, shard, status, n (the counts table)."""

    def __init__(self, read: Callable[[], list[dict]], interval: float, on_error: Callable[[], None] = lambda: None):
        self.read = read
        self.interval = interval
        self.on_error = on_error
        self._cond = threading.Condition()
        self._wanted = threading.Event()
        self._generation = 0
        self._signature: tuple | None = None
        self._ready: dict[tuple[str, int], int] = {}
        self._started: dict[tuple[str, int], int] = {}
        self._read_at = 0.0
        self._hints: set[tuple[str, int | None]] = set()
        self._waiters = 0
        self._closed = False
        self._thread: threading.Thread | None = None

    @property
    def generation(self) -> int:
        """Taken before a claim: a later `wait` returns once something changed after it."""
        return self._generation

    def wait(self, stage: str, shard: int | None, seen: int, deadline: float) -> bool:
        """Sleep until the counts changed since generation `seen` and `stage` (on `shard`, or any)
        may have a ready task; False when `deadline` (monotonic) passed or the process stops."""
        with self._cond:
            self._waiters += 1
            self._start()
            self._wanted.set()
            try:
                while not self._closed:
                    if self._generation != seen and self._may_be_ready(stage, shard):
                        return True
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._cond.wait(left)
                return False
            finally:
                self._waiters -= 1

    def idle(self, stage: str, shard: int | None) -> bool:
        """Whether a claim now would surely find nothing: by a fresh read of the counts, the
        stage (on `shard`, or on any) has no ready task and no started one (so none its caller
        holds), and nothing changed here since. Only a waiting claim asks: it then skips its
        claim and waits, so an idle group's long polls cost the database nothing."""
        with self._cond:
            if self._hints or time.monotonic() - self._read_at > 2 * self.interval + 0.05:
                return False
            for counts in (self._ready, self._started):
                if any(n > 0 for (s, h), n in counts.items() if s == stage and (shard is None or h == shard)):
                    return False
            return True

    def hint(self, stage: str, shard: int | None) -> None:
        """This process just made `stage`'s tasks (of `shard`, or of all) perhaps ready."""
        with self._cond:
            if not self._waiters:
                return
            self._hints.add((stage, shard))
            self._generation += 1
            self._cond.notify_all()

    def close(self) -> None:
        """The process stops: every waiter returns (with what it has: nothing)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._wanted.set()

    def _may_be_ready(self, stage: str, shard: int | None) -> bool:
        if (stage, None) in self._hints or (stage, shard) in self._hints:
            return True
        if shard is None and any(s == stage for s, _ in self._hints):
            return True
        if shard is None:
            return any(n > 0 for (s, _), n in self._ready.items() if s == stage)
        return self._ready.get((stage, shard), 0) > 0

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ready-watch", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            if not self._waiters:
                self._wanted.clear()
                self._wanted.wait()     # nobody waits: no reads at all
                continue
            try:
                rows = self.read()
            except Exception as exc:  # noqa: BLE001 - the database is down: waiters time out
                self.on_error()
                log.debug("ready watch: %s", exc)
                time.sleep(max(self.interval, 1.0))
                continue
            signature = tuple(sorted((r["stage"], r["shard"], r["status"], int(r["n"])) for r in rows))
            with self._cond:
                self._hints.clear()
                self._read_at = time.monotonic()
                if signature != self._signature:
                    self._signature = signature
                    self._ready = {(r["stage"], r["shard"]): int(r["n"]) for r in rows if r["status"] == READY}
                    self._started = {(r["stage"], r["shard"]): int(r["n"]) for r in rows if r["status"] == STARTED}
                    self._generation += 1
                    self._cond.notify_all()
            time.sleep(self.interval)
