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

from .. import db, layout, safefiles
from ..client import Task
from ..config import Settings
from ..stages import Stage
from ..daemon import (Context, Done, InputMissing, Outcome, Retryable, StageWork, StopRequested, TaskFailed,
                      run_shard_stage)
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
        try:
            self.shard_db.get()
            ctx.log.info("shard %s database %s ready (method %s)", self.shard, self.url, self.method)
        except (pymysql.err.MySQLError, *db.UNAVAILABLE, OSError, loader.SchemaMismatch) as exc:
            ctx.log.warning("shard %s database %s not ready yet (%s); tasks wait until it is",
                            self.shard, self.url, exc)

    def teardown(self) -> None:
        self.shard_db.discard()

    # -- one file -----------------------------------------------------------------------------------

    def process(self, tasks: list[Task], ctx: Context) -> list[Outcome]:
        return [self._send(task, ctx) for task in tasks]

    def _send(self, task: Task, ctx: Context) -> Outcome:
        if task.shard != self.shard:
            raise TaskFailed(f"wrong shard: task of shard {task.shard} claimed by the sender of shard {self.shard}")
        path = layout.worker_output(self.settings.shared_dir, task.filename, self.shard)
        started = time.monotonic()
        try:
            conn = self.shard_db.get()
            result = loader.load_file(
                conn, path, task.filename, self.shard, self.settings.shard_count, method=self.method,
                chunk_rows=self.settings.sender_chunk_rows, root=self.settings.shared_dir, check=ctx.check,
                max_line_bytes=self.settings.max_line_bytes, max_json_depth=self.settings.max_json_depth)
        except StopRequested:
            ctx.log.info("%s: load rolled back; handing the task back", task.filename)
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
            raise TaskFailed(f"shard {self.shard} server refused the rows of {task.filename}: {exc}") from None
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
        if result.local_infile_refused and self.method == "load_data":
            ctx.log.warning("shard %s server refuses LOAD DATA LOCAL INFILE: using multi-row INSERT from now on "
                            "(enable local_infile on the server for the faster method)", self.shard)
            self.method = "insert"
        if result.already_loaded:
            ctx.log.info("%s was already loaded (%s rows): nothing added", task.filename, result.loaded)
        self.claim_limit = self.small_files_claim if time.monotonic() - started < FAST_LOAD_SECONDS else 1
        return Done(events=result.loaded, stats=result.stats())


def main(argv: list[str] | None = None) -> None:
    run_shard_stage("app.sender", Sender, argv)
