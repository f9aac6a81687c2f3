"""Reading ahead of, and writing behind, a loop that mostly waits for a database.

The shard worker's deciding loop spends much of each batch waiting for MariaDB; these let the
file reading and line validation of the next batch, and the output writing of the previous one,
use that time, in threads (the waits release the interpreter lock). `Turns` keeps the helpers
from taking the interpreter while the loop itself computes: the loop is the critical path.
The sender reads its prepared file ahead of the server's loads with the same `ReadAhead`.
"""
from __future__ import annotations

import queue
import threading
from contextlib import contextmanager

PAUSE = 0.005  # a helper never waits longer for its turn: a missed `waiting` only slows things


class Turns:
    """The deciding loop marks when it is blocked; helpers run Python only then."""

    def __init__(self):
        self._blocked = threading.Event()

    @contextmanager
    def waiting(self):
        self._blocked.set()
        try:
            yield
        finally:
            self._blocked.clear()

    def pause(self) -> None:
        """Called by a helper now and then: wait (briefly) until the loop is blocked."""
        if not self._blocked.is_set():
            self._blocked.wait(PAUSE)


class ReadAhead:
    """Runs a generator in a thread, at most `depth` items ahead of the consumer. Without
    `turns` the thread runs whenever it can (the sender's reader: its consumer mostly waits)."""

    _END = object()

    def __init__(self, items, turns: Turns | None = None, depth: int = 2):
        self.items = items
        self.turns = turns or _ALWAYS
        self.queue: queue.Queue = queue.Queue(depth)
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._run, name="read-ahead", daemon=True)

    def _run(self) -> None:
        try:
            for item in self.items:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as exc:
            self._put(exc)

    def _put(self, item) -> bool:
        while not self.closed.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __enter__(self):
        self.thread.start()
        return self

    def __iter__(self):
        while True:
            with self.turns.waiting():
                item = self.queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def __exit__(self, *exc) -> None:
        self.closed.set()
        with self.turns.waiting():
            self.thread.join()


class _Always(Turns):
    """No turn-keeping: the consumer is never the critical path."""

    @contextmanager
    def waiting(self):
        yield

    def pause(self) -> None:
        pass


_ALWAYS = _Always()


class Behind:
    """Hands items to `work` in a thread, in order; its errors surface in the caller."""

    _END = object()

    def __init__(self, work, turns: Turns, depth: int = 2):
        self.work = work
        self.turns = turns
        self.queue: queue.Queue = queue.Queue(depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="write-behind", daemon=True)

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is self._END:
                return
            if self.error is None:
                try:
                    self.work(item)
                except BaseException as exc:
                    self.error = exc

    def put(self, item) -> None:
        if self.error is not None:
            raise self.error
        with self.turns.waiting():
            self.queue.put(item)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, exc_type, *rest) -> None:
        with self.turns.waiting():
            self.queue.put(self._END)
            self.thread.join()
        if self.error is not None and exc_type is None:
            raise self.error
