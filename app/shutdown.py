"""A stop request that a signal handler can make safely.

`threading.Event.set()` takes the Event's lock, and a Python signal handler runs in the main
thread between two bytecodes, possibly while that same thread is inside `Event.wait()` holding
that lock: the handler then waits for itself for ever (the daemon logs "SIGTERM received" and
never exits). `StopFlag.set()` takes no lock: it sets a flag and writes one byte to a pipe.
Waiters sleep in poll() on the pipe's read end, which is never drained, so once written it wakes
every waiter in every thread, now and later.
"""
from __future__ import annotations

import os
import select
import signal


class StopFlag:
    """Event-like (`set`, `is_set`, `wait`), safe to `set` from a signal handler."""

    def __init__(self):
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._set = False
        self.signal: int | None = None  # the signal that asked, if one did

    def request(self, signum: int | None = None) -> None:
        """Ask to stop: a flag and one byte written, nothing that can block."""
        if signum is not None:
            self.signal = signum
        if self._set:
            return
        self._set = True
        try:
            os.write(self._write, b"!")
        except BlockingIOError:  # a byte is already there: the waiters are awake anyway
            pass

    set = request  # threading.Event's name, for code that only needs "stop now"

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until set or `timeout` seconds passed; whether it is set."""
        if self._set:
            return True
        if timeout is not None and timeout <= 0:
            return False
        poller = select.poll()
        poller.register(self._read, select.POLLIN)
        # An interrupted poll() is resumed by Python with the time left (PEP 475), after the
        # signal handler has run and written its byte.
        poller.poll(None if timeout is None else max(1, int(timeout * 1000 + 0.999)))
        return self._set

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else "stop"


def stop_on_signals(flag: StopFlag, signals=(signal.SIGTERM, signal.SIGINT)) -> None:
    """Make SIGTERM and SIGINT set `flag`. The handler only records the signal and sets the
    flag: no logging, no locks (whoever notices the flag says what happened)."""
    def on_signal(signum, _frame):
        flag.request(signum)
    for sig in signals:
        signal.signal(sig, on_signal)
