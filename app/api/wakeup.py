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

# What the watcher reads: the counts it uses and no others (ready and started; 0 is as good as
# absent). The whole counts table was ~25 rows a read, ~40% of them new or done, which only
# cost their parsing (~40-60 us of the API's CPU a read, every `interval` while anyone waits)
# and, changing with every move, made reads look changed when nothing a waiter wants had.
SQL_WATCH = f"SELECT stage, shard, status, n FROM pipeline_task_counts WHERE status IN ('{READY}', '{STARTED}') AND n <> 0"

log = logging.getLogger("pipeline-apid")


class _Waiter:
    __slots__ = ("stage", "shard", "seen", "event")

    def __init__(self, stage: str, shard: int | None, seen: int):
        self.stage, self.shard, self.seen = stage, shard, seen
        self.event = threading.Event()


class ReadyWatch:
    """`read()` returns rows with stage, shard, status, n (the counts table's ready and
    started rows: `SQL_WATCH`).

    A waiter wakes only on news about its own stage and shard that came after its claim began
    (`seen`): a hint of this process for them, or counts read after that claim began, showing
    a ready task for them, and changed since it began. Other stages' moves wake nobody, counts
    read before the claim (which the claim itself may have emptied) send nobody back to the
    database, and neither do counts that stay as they were (a shard blocked upstream).
    """

    def __init__(self, read: Callable[[], list[dict]], interval: float, on_error: Callable[[], None] = lambda: None):
        self.read = read
        self.interval = interval
        self.on_error = on_error
        self._lock = threading.Lock()
        self._wanted = threading.Event()
        self._generation = 0
        self._signature: tuple | None = None
        self._ready: dict[tuple[str, int], int] = {}
        self._started: dict[tuple[str, int], int] = {}
        self._read_at = 0.0
        self._read_gen = -1       # the generation their read began at: news to claims begun before it
        self._changed_gen = -1    # the generation at which a read last found them changed
        self._hints: dict[tuple[str, int | None], int] = {}   # (stage, shard) -> generation of the last hint
        self._waiters: set[_Waiter] = set()
        self._closed = False
        self._thread: threading.Thread | None = None

    @property
    def generation(self) -> int:
        """Taken before a claim: a later `wait` returns once something changed after it."""
        return self._generation

    def wait(self, stage: str, shard: int | None, seen: int, deadline: float) -> bool:
        """Sleep until news since generation `seen` says `stage` (on `shard`, or any) may have a
        ready task; False when `deadline` (monotonic) passed or the process stops."""
        me = _Waiter(stage, shard, seen)
        with self._lock:
            self._waiters.add(me)
            self._start()
        self._wanted.set()
        try:
            while True:
                with self._lock:
                    if self._closed:
                        return False
                    if self._may_be_ready(me):
                        return True
                    me.event.clear()
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                me.event.wait(left)
        finally:
            with self._lock:
                self._waiters.discard(me)

    def idle(self, stage: str, shard: int | None) -> bool:
        """Whether a claim now would surely find nothing: by a fresh read of the counts, the
        stage (on `shard`, or on any) has no ready task and no started one (so none its caller
        holds), and this process hinted nothing for it since. Only a waiting claim asks: it then
        skips its claim and waits, so an idle group's long polls cost the database nothing."""
        with self._lock:
            if time.monotonic() - self._read_at > 2 * self.interval + 0.05:
                return False
            if any(self._matches(stage, shard, s, h) for s, h in self._hints):
                return False
            for counts in (self._ready, self._started):
                if any(n > 0 for (s, h), n in counts.items() if s == stage and (shard is None or h == shard)):
                    return False
            return True

    def hint(self, stage: str, shard: int | None) -> None:
        """This process just made `stage`'s tasks (of `shard`, or of all) perhaps ready."""
        with self._lock:
            self._generation += 1
            self._hints[(stage, shard)] = self._generation
            for w in self._waiters:
                if self._matches(w.stage, w.shard, stage, shard):
                    w.event.set()

    def close(self) -> None:
        """The process stops: every waiter returns (with what it has: nothing)."""
        with self._lock:
            self._closed = True
            for w in self._waiters:
                w.event.set()
        self._wanted.set()

    @staticmethod
    def _matches(stage: str, shard: int | None, hinted_stage: str, hinted_shard: int | None) -> bool:
        return stage == hinted_stage and (shard is None or hinted_shard is None or shard == hinted_shard)

    def _may_be_ready(self, w: _Waiter) -> bool:
        if any(gen > w.seen and self._matches(w.stage, w.shard, s, h) for (s, h), gen in self._hints.items()):
            return True
        if self._read_gen <= w.seen or self._changed_gen <= w.seen:
            return False   # read before the claim began (which saw as much), or unchanged since
        if w.shard is None:
            return any(n > 0 for (s, _), n in self._ready.items() if s == w.stage)
        return self._ready.get((w.stage, w.shard), 0) > 0

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ready-watch", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            if not self._waiters:
                self._wanted.clear()
                if not self._waiters:
                    self._wanted.wait()     # nobody waits: no reads at all
                continue
            with self._lock:
                self._generation += 1      # claims begun from here on read before this read
                began = self._generation
            try:
                rows = self.read()
            except Exception as exc:  # noqa: BLE001 - the database is down: waiters time out
                self.on_error()
                log.debug("ready watch: %s", exc)
                time.sleep(max(self.interval, 1.0))
                continue
            signature = tuple(sorted((r["stage"], r["shard"], r["status"], int(r["n"])) for r in rows))
            with self._lock:
                self._read_at = time.monotonic()
                # Hints from before this read began are in its counts now.
                self._hints = {k: gen for k, gen in self._hints.items() if gen > began}
                self._generation += 1
                self._read_gen = began
                if signature != self._signature:
                    self._signature = signature
                    self._ready = {(r["stage"], r["shard"]): int(r["n"]) for r in rows if r["status"] == READY}
                    self._started = {(r["stage"], r["shard"]): int(r["n"]) for r in rows if r["status"] == STARTED}
                    self._changed_gen = self._generation
                for w in self._waiters:
                    if self._may_be_ready(w):
                        w.event.set()
            time.sleep(self.interval)
