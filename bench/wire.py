"""What PyMySQL sends and reads while a bench's window runs, in-process: round trips, statements
(results read), rows, and round trips by their statement's first words. For the per-file benches
(`split_files.py`, `worker_files.py`) that run a stage's code against another checkout, where
the server's own counters would also count the bench's setup."""
from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def counting():
    """(counts, kinds) filled while the block runs; PyMySQL is put back as it was after."""
    import pymysql.connections as pc

    counts = {"round_trips": 0, "statements": 0, "rows": 0}
    kinds: dict[str, int] = {}
    execute, read, row = pc.Connection._execute_command, pc.MySQLResult.read, pc.MySQLResult._read_row_from_packet

    def counted_execute(self, command, sql):
        counts["round_trips"] += 1
        text = sql if isinstance(sql, str) else bytes(sql[:100]).decode("utf-8", "replace")
        kind = " ".join(text.split()[:3])[:40] or "(ping)"
        kinds[kind] = kinds.get(kind, 0) + 1
        return execute(self, command, sql)

    def counted_read(self):
        counts["statements"] += 1
        return read(self)

    def counted_row(self, packet):
        counts["rows"] += 1
        return row(self, packet)

    pc.Connection._execute_command, pc.MySQLResult.read = counted_execute, counted_read
    pc.MySQLResult._read_row_from_packet = counted_row
    try:
        yield counts, kinds
    finally:
        pc.Connection._execute_command, pc.MySQLResult.read, pc.MySQLResult._read_row_from_packet = execute, read, row
