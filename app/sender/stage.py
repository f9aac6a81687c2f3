"""mysql-sender: `python -m app.sender --shard N` — loads shard N's prepared files into shard N's
own server (MYSQL_SHARD_<N>_URL), each file exactly once (see app/loader.py and
docs/sender.md).

What reaches the tracking API: done with the rows loaded; failed for a malformed or wrong-shard
line (nothing of that file is loaded); rewind when the prepared file is missing (the worker
writes it again); and, while the shard server is down or the connection breaks, the task is
handed back and the shared loop backs off until the server answers again.
"""
from __future__ import annotations

import pymysql

from .. import db, layout
from ..client import Task
from ..config import Settings
from ..stages import Stage
from ..daemon import (Context, Done, InputMissing, Outcome, Retryable, StageWork, StopRequested, TaskFailed,
                      run_shard_stage)
from . import loader

# Database errors that a retry cannot cure: the rows themselves were refused.
DATA_REFUSED = (pymysql.err.IntegrityError, pymysql.err.DataError, loader.RowsRefused)


class Sender(StageWork):
    name = Stage.SENDER

    def __init__(self, settings: Settings, shard: int):
        self.settings = settings
        self.shard = shard
        self.service = Stage.SENDER.program(shard)
        self.folder = layout.sender_dir(settings.shared_dir, shard)
        self.claim_limit = 1  # a file is one long transaction: hold no lease we are not using
        self.url = settings.shard_dbs[shard]
        self.method = settings.sender_method
        self._conn = None
        self._schema_ready = False

    # -- the shard connection -------------------------------------------------------------------

    def _connection(self):
        """The open connection to the shard, checked before each file; the schema is applied
        on first use and again after any failure (a database dropped or replaced meanwhile)."""
        if self._conn is not None:
            try:
                self._conn.ping(reconnect=False)
            except Exception:
                self._drop_connection()
        if not self._schema_ready:
            loader.prepare_database(self.url)
            self._schema_ready = True
        if self._conn is None:
            self._conn = db.connect(self.url, autocommit=False, local_infile=True)
        return self._conn

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def setup(self, ctx: Context) -> None:
        try:
            self._connection()
            ctx.log.info("shard %s database %s ready (method %s)", self.shard, self.url, self.method)
        except (pymysql.err.MySQLError, *db.UNAVAILABLE, loader.SchemaMismatch) as exc:
            self._schema_ready = False
            ctx.log.warning("shard %s database %s not ready yet (%s); tasks wait until it is",
                            self.shard, self.url, exc)

    def teardown(self) -> None:
        self._drop_connection()

    # -- one file -----------------------------------------------------------------------------------

    def process(self, tasks: list[Task], ctx: Context) -> list[Outcome]:
        return [self._send(task, ctx) for task in tasks]

    def _send(self, task: Task, ctx: Context) -> Outcome:
        if task.shard != self.shard:
            raise TaskFailed(f"wrong shard: task of shard {task.shard} claimed by the sender of shard {self.shard}")
        path = layout.worker_output(self.settings.shared_dir, task.filename, self.shard)
        try:
            conn = self._connection()
            result = loader.load_file(
                conn, path, task.filename, self.shard, self.settings.shard_count, self.folder,
                method=self.method, chunk_rows=self.settings.sender_chunk_rows, check=ctx.check)
        except StopRequested:
            ctx.log.info("%s: load rolled back; handing the task back", task.filename)
            raise
        except db.MigrationError:
            raise  # the schema files and the database disagree: not this file's fault (app/daemon.py)
        except loader.PreparedMissing as exc:
            raise InputMissing(str(exc)) from None
        except loader.BadLine as exc:
            raise TaskFailed(str(exc)) from None
        except DATA_REFUSED as exc:
            self._drop_connection()
            raise TaskFailed(f"shard {self.shard} server refused the rows of {task.filename}: {exc}") from None
        except (pymysql.err.MySQLError, *db.UNAVAILABLE, loader.SchemaMismatch) as exc:
            # Server down, connection lost, deadlock, schema gone: nothing was committed, or all
            # of it was and the load record says so next time. Hand back and retry later.
            self._drop_connection()
            self._schema_ready = False
            raise Retryable(f"shard {self.shard} database {self.url}: {exc}") from None
        except Exception as exc:
            if self._conn is not None and self._conn.open:
                raise
            # whatever the driver raised, the connection is gone: an outside fault, not the file's
            self._drop_connection()
            self._schema_ready = False
            raise Retryable(f"shard {self.shard} database {self.url}: connection lost ({exc!r})") from None
        if result.local_infile_refused and self.method == "load_data":
            ctx.log.warning("shard %s server refuses LOAD DATA LOCAL INFILE: using multi-row INSERT from now on "
                            "(enable local_infile on the server for the faster method)", self.shard)
            self.method = "insert"
        if result.already_loaded:
            ctx.log.info("%s was already loaded (%s rows): nothing added", task.filename, result.loaded)
        return Done(events=result.loaded, stats=result.stats())


def main(argv: list[str] | None = None) -> None:
    run_shard_stage("app.sender", Sender, argv)
