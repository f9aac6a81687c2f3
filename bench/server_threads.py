"""The server's CPU split by thread: each connection's by the stage that opened it, and InnoDB's
background threads (page cleaner, the thread pool that runs purge and I/O completions) by name.

A `ThreadSampler` reads /proc/<mariadbd>/task/*/stat (utime + stime per OS thread) every
`interval` seconds and books each thread's CPU since the last sample to what the thread is at
that sample: a connection thread (information_schema.PROCESSLIST's TID) to the client process
that opened it (PyMySQL sends its pid as the connection attribute `_pid`: performance_schema
on) or to its database, any other thread to its performance_schema name (`thread/innodb/...`),
or "background" when performance_schema is off. A thread cached between two connections is
booked to the connection it serves at each sample, so a short connection's CPU may land on the
next one of the same thread; the pipeline's connections are long-lived.

Used by `bench/pipeline.py --profile` (the window's split in its JSON and printout), and alone:

    .venv/bin/python bench/server_threads.py --port PORT --seconds 30   # a running server's split
                                                                        # (SIGINT: the split so far)
"""
from __future__ import annotations

import argparse
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable

TICK = os.sysconf("SC_CLK_TCK")


def task_ticks(pid: int) -> dict[int, int]:
    """utime + stime (clock ticks) of every thread of process `pid` alive now."""
    out = {}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            text = (task / "stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        out[int(task.name)] = int(fields[11]) + int(fields[12])
    return out


class ThreadSampler:
    """Samples a server's threads in a background thread between start() and stop()."""

    def __init__(self, server_pid: int, connect: Callable, owner_of_pid: Callable[[int], str] | None = None,
                 roles: dict[str, str] | None = None, interval: float = 0.5,
                 counted: Callable[[int], None] | None = None):
        self.pid, self.connect, self.interval = server_pid, connect, interval
        self.counted = counted or (lambda n: None)   # told how many statements each sample ran
        self.performance_schema = False
        self.error: str | None = None
        self.owner_of_pid = owner_of_pid or (lambda pid: "other")
        self.roles = roles or {}
        self.ticks: Counter = Counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn = None

    def _labels(self) -> dict[int, str]:
        labels: dict[int, str] = {}
        with self._conn.cursor() as cur:
            pids: dict[int, int] = {}
            if self.performance_schema:
                self.counted(2)
                cur.execute("SELECT THREAD_OS_ID, NAME FROM performance_schema.threads WHERE TYPE = 'BACKGROUND'")
                for tid, name in cur.fetchall():
                    if tid:
                        labels[int(tid)] = "server " + name.removeprefix("thread/")
                cur.execute("SELECT PROCESSLIST_ID, ATTR_VALUE FROM performance_schema.session_connect_attrs"
                            " WHERE ATTR_NAME = '_pid'")
                pids = {int(i): int(p) for i, p in cur.fetchall()}
            self.counted(1)
            cur.execute("SELECT ID, TID, DB, CONNECTION_ID() FROM information_schema.PROCESSLIST")
            for cid, tid, db, own in cur.fetchall():
                if not tid:
                    continue
                if cid == own:
                    labels[int(tid)] = "conn bench (this sampler)"
                    continue
                role = self.roles.get(db or "", db or "no db")
                owner = self.owner_of_pid(pids[cid]) if cid in pids else "?"
                labels[int(tid)] = f"conn {owner} @{role}"
        return labels

    def _run(self) -> None:
        last = task_ticks(self.pid)
        while not self._stop.wait(self.interval):
            try:
                self._sample(last)
            except Exception as exc:     # the server went away: keep what was booked
                self.error = repr(exc)
                return

    def _sample(self, last: dict[int, int]) -> None:
        labels = self._labels()
        now = task_ticks(self.pid)
        for tid, t in now.items():
            delta = t - last.get(tid, 0)
            if delta > 0:
                self.ticks[labels.get(tid, "server other (unnamed)")] += delta
        last.clear()
        last.update(now)

    def start(self) -> "ThreadSampler":
        self._conn = self.connect()
        with self._conn.cursor() as cur:
            cur.execute("SELECT @@performance_schema")
            self.performance_schema = bool(int(cur.fetchone()[0]))
        self._thread = threading.Thread(target=self._run, name="server-threads", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, float]:
        self._stop.set()
        if self._thread:
            self._thread.join()
        if self._conn:
            self._conn.close()
        return self.seconds()

    def seconds(self) -> dict[str, float]:
        return {k: round(v / TICK, 2) for k, v in self.ticks.most_common()}


def summary(seconds: dict[str, float], events: int) -> dict[str, float]:
    """Microseconds per event by label, and by kind: connections by owner, background by name."""
    kinds: Counter = Counter()
    for label, s in seconds.items():
        if label.startswith("conn "):
            kinds["connections: " + label.split()[1]] += s
        else:
            kinds["background: " + label.removeprefix("server ")] += s
    return {k: round(1e6 * v / events, 2) for k, v in kinds.most_common()}


def main() -> None:
    import pymysql
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pid", type=int, help="the server's pid (default: read @@pid_file)")
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()

    def connect():
        return pymysql.connect(host=args.host, port=args.port, user="root", password="", autocommit=True)

    pid = args.pid
    if pid is None:
        conn = connect()
        with conn.cursor() as cur:
            cur.execute("SELECT @@pid_file")
            pid = int(Path(cur.fetchone()[0]).read_text().split()[0])
        conn.close()
    sampler = ThreadSampler(pid, connect).start()
    deadline = time.monotonic() + args.seconds
    try:
        while time.monotonic() < deadline and sampler.error is None:
            time.sleep(0.5)
    except KeyboardInterrupt:        # the split so far
        pass
    if sampler.error:
        print(f"sampling stopped: {sampler.error}")
    for label, s in sampler.stop().items():
        print(f"{s:8.2f} s  {label}")


if __name__ == "__main__":
    main()
