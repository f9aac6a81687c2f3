"""mysql-sender: `python -m app.sender --shard N` — loads shard N's prepared files into shard N's
own server (MYSQL_SHARD_<N>_URL), each file exactly once (see app/sender/loader.py and
docs/sender.md).

What reaches the tracking API: done with the rows loaded; failed for a malformed or wrong-shard
line (nothing of that file is loaded); rewind when the prepared file is missing (the worker
writes it again); and, while the shard server is down or the connection breaks, the task is
handed back and the shared loop backs off until the server answers again.
"""
from __future__ import annotations

import time
from functools import partial

import pymysql

from .. import db, heap, layout, safefiles
from ..client import Task
from ..config import Settings
from ..stages import Stage
from ..daemon import (Context, Done, Failed, InputMissing, Outcome, Retryable, Rewind, StageWork, StopRequested,
                      TaskFailed, run_shard_stage)
from . import loader

# Database errors that a retry cannot cure: the rows themselves were refused.
DATA_REFUSED = (pymysql.err.IntegrityError, pymysql.err.DataError, loader.RowsRefused)
# A connection idle this long is pinged before the next file; one used more recently is not (a
# file's first statement finds a dead one, and the task is handed back and retried).
PING_AFTER = 5.0
# A file loaded within this many seconds is a small one: the next claim may take CLAIM_LIMIT
# tasks (one request instead of one per file, where the claim cost more than the load); after a
# slower file, one at a time again, so other replicas of the shard can take the next files.
FAST_LOAD_SECONDS = 1.0


def tune_process(settings: Settings) -> bool:
    """What the sender process sets for itself at start: a file's buffers (megabytes of lines,
    rows and TSV) stay in the heap for the next file instead of being unmapped and faulted in
    again (`heap.keep_freed`: a fifth of the sender's CPU on big files was the kernel's)."""
    return heap.keep_freed(settings.sender_heap_keep_mb << 20)


class Sender(StageWork):
    name = Stage.SENDER
    schemas = (loader.SCHEMA,)

    def __init__(self, settings: Settings, shard: int):
        self.settings = settings
        self.shard = shard
        self.service = Stage.SENDER.program(shard)
        self.folder = layout.sender_dir(settings.shared_dir, shard)
        self.claim_limit = 1  # a file is one long transaction: hold no lease we are not using...
        self.small_files_claim = max(settings.claim_limit, 1)  # ...unless files load fast (FAST_LOAD_SECONDS)
        self.url = settings.shard_dbs[shard]
        self.method = settings.sender_method
        # Pinged before a file after PING_AFTER idle; a new connection brings the schema up to
        # date first (so it is applied again after any failure: a database dropped or replaced).
        self.shard_db = db.Reconnecting(self.url, check_after=PING_AFTER, create_database=True, autocommit=False,
                                        local_infile=True, multi_statements=True,
                                        on_open=partial(loader.prepare, indexes=settings.shard_indexes))

    # -- the shard connection -------------------------------------------------------------------

    def setup(self, ctx: Context) -> None:
        if tune_process(self.settings):
            ctx.log.info("keeping up to %d MiB of freed memory for the next file (SENDER_HEAP_KEEP_MB)",
                         self.settings.sender_heap_keep_mb)
        try:
            self.shard_db.get()
            ctx.log.info("shard %s database %s ready (method %s)", self.shard, self.url, self.method)
        except (pymysql.err.MySQLError, *db.UNAVAILABLE, OSError, loader.SchemaMismatch) as exc:
            ctx.log.warning("shard %s database %s not ready yet (%s); tasks wait until it is",
                            self.shard, self.url, exc)

    def teardown(self) -> None:
        self.shard_db.discard()

    # -- one file -----------------------------------------------------------------------------------

    def group(self, tasks: list[Task]) -> list[list[Task]]:
        """A claim's tasks of this shard are one group, so its small files load in one
        transaction (`process`); another shard's task goes alone (and fails)."""
        own = [t for t in tasks if t.shard == self.shard]
        return ([own] if own else []) + [[t] for t in tasks if t.shard != self.shard]

    def process(self, tasks: list[Task], ctx: Context) -> list[Outcome]:
        """One file: `load_file`. Several: their small files together (`loader.load_batch`: one
        transaction, three statements and one log flush for all), and each other file, or each
        file of a batch that was rolled back, on its own as before, with its own outcome."""
        if len(tasks) == 1 or self.method != "load_data":
            return [self._send(task, ctx) for task in tasks]
        started = time.monotonic()
        files = [(layout.worker_output(self.settings.shared_dir, t.filename, self.shard), t.filename) for t in tasks]
        names = ", ".join(t.filename for t in tasks)
        try:
            batched = self._guarded(names, ctx, lambda conn: loader.load_batch(
                conn, files, self.shard, self.settings.shard_count, chunk_rows=self.settings.sender_chunk_rows,
                root=self.settings.shared_dir, check=ctx.check, max_line_bytes=self.settings.max_line_bytes,
                max_json_depth=self.settings.max_json_depth))
        except TaskFailed as exc:  # refused rows are one file's: each on its own tells which
            ctx.log.warning("%s: %s; loading each file on its own", names, exc)
            batched = [None] * len(tasks)
        outcomes: list[Outcome] = []
        for task, result in zip(tasks, batched):
            try:
                outcomes.append(self._done(result) if result is not None else self._send(task, ctx))
            except InputMissing as exc:
                outcomes.append(Rewind(str(exc)))
            except TaskFailed as exc:
                outcomes.append(Failed(str(exc)))
        fast = (time.monotonic() - started) / len(tasks) < FAST_LOAD_SECONDS
        self.claim_limit = self.small_files_claim if fast else 1
        return outcomes

    def _send(self, task: Task, ctx: Context) -> Outcome:
        if task.shard != self.shard:
            raise TaskFailed(f"wrong shard: task of shard {task.shard} claimed by the sender of shard {self.shard}")
        path = layout.worker_output(self.settings.shared_dir, task.filename, self.shard)
        started = time.monotonic()
        result = self._guarded(task.filename, ctx, lambda conn: loader.load_file(
            conn, path, task.filename, self.shard, self.settings.shard_count, method=self.method,
            chunk_rows=self.settings.sender_chunk_rows, root=self.settings.shared_dir, check=ctx.check,
            max_line_bytes=self.settings.max_line_bytes, max_json_depth=self.settings.max_json_depth))
        if result.local_infile_refused and self.method == "load_data":
            ctx.log.warning("shard %s server refuses LOAD DATA LOCAL INFILE: using multi-row INSERT from now on "
                            "(enable local_infile on the server for the faster method)", self.shard)
            self.method = "insert"
        if result.already_loaded:
            ctx.log.info("%s was already loaded (%s rows): nothing added", task.filename, result.loaded)
        self.claim_limit = self.small_files_claim if time.monotonic() - started < FAST_LOAD_SECONDS else 1
        return self._done(result)

    @staticmethod
    def _done(result: loader.LoadResult) -> Done:
        return Done(events=result.loaded, stats=result.stats())

    def _guarded(self, names: str, ctx: Context, load):
        """`load(connection)`, its faults told apart: the file's (TaskFailed, InputMissing) from
        the server's (Retryable: the connection is dropped and the tasks handed back)."""
        try:
            return load(self.shard_db.get())
        except StopRequested:
            ctx.log.info("%s: load rolled back; handing the task back", names)
            raise
        except db.MigrationError:
            raise  # the schema files and the database disagree: not this file's fault (app/daemon.py)
        except loader.PreparedMissing as exc:
            raise InputMissing(str(exc)) from None
        except loader.BadLine as exc:
            raise TaskFailed(str(exc)) from None
        except safefiles.Refused as exc:
            raise TaskFailed(f"prepared file refused: {exc}") from None
        except DATA_REFUSED as exc:
            self.shard_db.discard()
            raise TaskFailed(f"shard {self.shard} server refused the rows of {names}: {exc}") from None
        except (pymysql.err.MySQLError, *db.UNAVAILABLE, OSError, loader.SchemaMismatch) as exc:
            # Server down, connection lost, deadlock, schema gone, a chunk not written: nothing was committed, or all
            # of it was and the load record says so next time. Hand back and retry later.
            self.shard_db.discard()
            raise Retryable(f"shard {self.shard} database {self.url}: {exc}") from None
        except Exception as exc:
            if self.shard_db.conn is not None and self.shard_db.conn.open:
                raise
            # whatever the driver raised, the connection is gone: an outside fault, not the file's
            self.shard_db.discard()
            raise Retryable(f"shard {self.shard} database {self.url}: connection lost ({exc!r})") from None


def main(argv: list[str] | None = None) -> None:
    run_shard_stage("app.sender", Sender, argv)
