"""Numbered schema migrations (app/db.py `migrate`, db/migrations/): applied in order and
recorded once, safe when many processes start together, never run without the lock, a database
made before the ledger adopted without re-running anything, a table dropped by hand re-created,
and every file problem a clear MigrationError, never mistaken for a database outage."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import orjson
import pytest

from app import db
from app.config import Settings
from tests import servers
from tests.test_schema_apid import ORIGINAL, ROWS, shape

PIPELINE_COMPONENTS = ("tracking", "worker", "splitter", "rejected")
ALL = (*PIPELINE_COMPONENTS, "shard")


def ledger(url) -> list[tuple]:
    return servers.query(url, "SELECT component, version, name, adopted FROM schema_migrations "
                              "ORDER BY component, version")


def expected_ledger(components, adopted: int = 0) -> list[tuple]:
    return sorted((m.component, m.version, m.name, adopted) for c in components for m in db.migrations(c))


def migrate(url, component: str, **kw) -> list[db.Migration]:
    conn = db.connect(url)
    try:
        return db.migrate(conn, component, **kw)
    finally:
        conn.close()


def tables(url) -> list[str]:
    return [r[0] for r in servers.query(url, "SELECT table_name FROM information_schema.tables "
                                             "WHERE table_schema=DATABASE() ORDER BY 1")]


@pytest.fixture
def sql_copy(tmp_path, monkeypatch):
    """A copy of db/ that a test may break; `db` reads it instead of the real one."""
    root = tmp_path / "db"
    shutil.copytree(db.SQL_DIR, root)
    monkeypatch.setattr(db, "SQL_DIR", root)
    return root


def test_every_component_migrates_once_in_order_and_again_changes_nothing(make_database):
    url = make_database("mig")
    for component in ALL:
        assert [m.version for m in migrate(url, component)] == list(range(1, len(db.migrations(component)) + 1))
    first = shape(url)
    assert ledger(url) == expected_ledger(ALL)
    for component in ALL:
        assert migrate(url, component) == []
    assert shape(url) == first and ledger(url) == expected_ledger(ALL)


def test_many_processes_starting_together_apply_each_migration_once(make_database):
    url = make_database("race")
    components = PIPELINE_COMPONENTS * 2 + ("worker", "tracking")
    barrier = threading.Barrier(len(components), timeout=60)
    errors, applied = [], []

    def start(component: str) -> None:
        conn = db.connect(url)
        try:
            barrier.wait()
            applied.extend(str(m) for m in db.migrate(conn, component))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(repr(exc))
        finally:
            conn.close()

    threads = [threading.Thread(target=start, args=(c,), daemon=True) for c in components]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not [t for t in threads if t.is_alive()]
    assert errors == []
    assert sorted(applied) == sorted(str(m) for c in PIPELINE_COMPONENTS for m in db.migrations(c))
    assert ledger(url) == expected_ledger(PIPELINE_COMPONENTS)


def test_a_process_that_cannot_take_the_lock_stops_and_changes_nothing(make_database):
    url = make_database("lock")
    holder = db.connect(url)
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT GET_LOCK(%s, 0)", (f"schema_migrations.{url.database}"[:64],))
            assert cur.fetchone()[0] == 1
        with pytest.raises(db.MigrationLockTimeout, match="could not take the migration lock"):
            migrate(url, "tracking", lock_seconds=0.5)
        assert tables(url) == []
    finally:
        holder.close()
    migrate(url, "tracking")
    assert ledger(url) == expected_ledger(["tracking"])


def test_a_database_made_before_the_ledger_is_adopted_without_running_anything(make_database):
    """Tables as today's DDL files made them (migration 0001 of each component holds exactly
    that DDL; tracking's is 0001-0003), no schema_migrations: every version is recorded as
    adopted and nothing runs (running tracking 0002 again would fail: its columns exist)."""
    url = make_database("adopt")
    conn = db.connect(url)
    with conn.cursor() as cur:
        for component in PIPELINE_COMPONENTS:
            for m in db.migrations(component):
                for statement in m.statements():
                    cur.execute(statement)
        cur.execute("INSERT INTO pipeline_tracking (filename, shard) VALUES ('20250101000000', 0)")
    conn.close()
    before = shape(url)
    for component in PIPELINE_COMPONENTS:
        assert [m.version for m in migrate(url, component)] == [m.version for m in db.migrations(component)]
    # a migration that changes what exists (no `creates` line, e.g. worker 0002) cannot tell it
    # already happened: it runs (it is safe to run twice); the others are adopted
    assert ledger(url) == sorted((m.component, m.version, m.name, int(bool(m.creates)))
                                 for c in PIPELINE_COMPONENTS for m in db.migrations(c))
    assert shape(url) == before
    assert servers.query(url, "SELECT filename FROM pipeline_tracking") == [("20250101000000",)]


def test_an_original_tracking_table_is_migration_0001_and_is_upgraded_by_the_rest(make_database):
    url = make_database("orig")
    conn = db.connect(url)
    with conn.cursor() as cur:
        cur.execute(ORIGINAL)
        cur.executemany("INSERT INTO pipeline_tracking (filename, shard, event_ingest_status, shard_splitter_status,"
                        " shard_worker_status, mysql_sender_status, created_at) VALUES (%s,%s,%s,%s,%s,%s,%s)", ROWS)
    conn.close()
    migrate(url, "tracking")
    assert [(c, v, a) for c, v, _, a in ledger(url)] == [("tracking", 1, 1), ("tracking", 2, 0), ("tracking", 3, 0),
                                                            ("tracking", 4, 0), ("tracking", 5, 0), ("tracking", 6, 0)]
    assert servers.query(url, "SELECT COUNT(*) FROM pipeline_tracking WHERE owner IS NULL") == [(len(ROWS),)]


def test_a_table_dropped_by_hand_is_created_again_and_nothing_else_runs(make_database):
    url = make_database("drop")
    migrate(url, "tracking")
    migrate(url, "worker")
    conn = db.connect(url)
    with conn.cursor() as cur:
        cur.execute("INSERT INTO pipeline_tracking (filename, shard) VALUES ('20250101000000', 0)")
        cur.execute("DROP TABLE pipeline_transitions")
        cur.execute("DROP TABLE worker_stock")     # worker_seen: 0003 remakes it too (test_worker_state.py)
    conn.close()
    assert [str(m) for m in migrate(url, "tracking")] == ["tracking 0003_transitions_and_claim_lock"]
    assert [str(m) for m in migrate(url, "worker")] == ["worker 0001_worker_state"]
    assert {"pipeline_transitions", "worker_stock"} <= set(tables(url))
    assert servers.query(url, "SELECT COUNT(*) FROM pipeline_tracking") == [(1,)]


def test_an_edited_applied_migration_is_refused(make_database, sql_copy):
    url = make_database("edit")
    migrate(url, "worker")
    path = sql_copy / "migrations" / "worker" / "0001_worker_state.sql"
    path.write_text(path.read_text() + "-- a harmless-looking edit\n")
    with pytest.raises(db.MigrationError, match="never edited"):
        migrate(url, "worker")


def test_a_database_migrated_by_newer_code_is_refused(make_database, sql_copy):
    url = make_database("newer")
    later = f"{len(db.migrations('splitter')) + 1:04d}_later_change"
    (sql_copy / "migrations" / "splitter" / f"{later}.sql").write_text("CREATE TABLE later (id INT);\n")
    migrate(url, "splitter")
    (sql_copy / "migrations" / "splitter" / f"{later}.sql").unlink()
    with pytest.raises(db.MigrationError, match=f"{later}, which this code does not know"):
        migrate(url, "splitter")


def test_a_failing_statement_is_a_migration_error_naming_it_not_an_outage(make_database, sql_copy):
    """Error 1054 (unknown column) arrives as pymysql's OperationalError, which the services
    otherwise read as "database down": a broken migration must not be waited out as one."""
    url = make_database("bad")
    known = len(db.migrations("splitter"))
    broken = f"{known + 1:04d}_broken"
    (sql_copy / "migrations" / "splitter" / f"{broken}.sql").write_text(
        "CREATE TABLE IF NOT EXISTS fine (id INT);\nUPDATE splitter_seq SET no_such_column = 1;\n")
    with pytest.raises(db.MigrationError, match=rf"splitter {broken}, statement 2 failed") as caught:
        migrate(url, "splitter")
    assert not isinstance(caught.value, db.UNAVAILABLE)
    assert [v for _, v, _, _ in ledger(url)] == list(range(1, known + 1))


@pytest.mark.parametrize("damage, message", [
    (lambda root: shutil.rmtree(root / "migrations" / "worker"), "cannot read the SQL files"),
    (lambda root: (root / "migrations" / "worker" / "0001_worker_state.sql").rename(
        root / "migrations" / "worker" / "0002_worker_state.sql"), "without gaps"),
    (lambda root: (root / "migrations" / "worker" / "2_more.sql").write_text("SELECT 1;\n"), "NNNN_name.sql"),
])
def test_missing_or_misnamed_files_are_refused_before_the_database_is_touched(sql_copy, damage, message):
    damage(sql_copy)
    with pytest.raises(db.MigrationError, match=message) as caught:
        db.migrate(None, "worker")  # no connection at all: the files are checked first
    assert not isinstance(caught.value, db.UNAVAILABLE)


def test_the_splitter_stops_on_missing_sql_files_instead_of_waiting_for_the_database(pipeline_db, shared_dir,
                                                                                    sql_copy):
    import logging

    from app.daemon import Context
    from app.shutdown import StopFlag
    from app.splitter.stage import Splitter
    shutil.rmtree(sql_copy / "migrations" / "splitter")
    settings = Settings.from_env(servers.service_env(pipeline_db, shared_dir, servers.free_port()))
    splitter = Splitter(settings)
    try:
        with pytest.raises(db.MigrationError, match="cannot read the SQL files"):
            splitter.setup(Context(StopFlag(), logging.getLogger("test")))
    finally:
        splitter.teardown()


def test_the_api_answers_500_naming_the_schema_problem_not_503_database_down(pipeline_db, shared_dir, sql_copy):
    from app.api.service import Api
    shutil.rmtree(sql_copy / "migrations" / "tracking")
    api = Api(Settings.from_env(servers.service_env(pipeline_db, shared_dir, servers.free_port(),
                                                    PIPELINE_API_TOKEN="migrations-test-token")))

    def answer(token=None):
        environ: dict = {}
        setup_testing_defaults(environ)
        environ["PATH_INFO"] = "/api/v1/pipeline/metrics/summary"
        if token:
            environ["HTTP_AUTHORIZATION"] = f"Bearer {token}"
        status = []
        body = b"".join(api.app(environ, lambda s, headers, exc_info=None: status.append(s)))
        return status[0], orjson.loads(body)["error"]
    status, error = answer("migrations-test-token")
    assert status.startswith("500")
    assert error.startswith("database schema: cannot read the SQL files") and "unavailable" not in error
    status, error = answer()   # without the token: what kind of problem, not where (paths, names)
    assert status.startswith("500") and error == "database schema (details in the pipeline-apid log)"


def test_the_api_process_exits_at_start_when_its_migrations_are_missing(pipeline_db, shared_dir, tmp_path):
    env = servers.service_env(pipeline_db, shared_dir, servers.free_port())
    code = ("import pathlib, sys; from app import db; db.SQL_DIR = pathlib.Path(sys.argv[1]); "
            "from app.api.service import main; main([])")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "nowhere")], cwd=servers.ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "pipeline-apid: database schema: cannot read the SQL files" in result.stderr
    assert "not reachable" not in result.stderr + result.stdout


def test_each_component_owns_a_folder_of_migrations_and_nothing_else_lies_around():
    root = Path(db.SQL_DIR)
    assert sorted(p.name for p in (root / "migrations").iterdir()) == sorted(ALL)
    assert sorted(p.name for p in root.iterdir()) == ["README.md", "migrations", "pipeline-examples.sql"]


# MariaDB-only DDL a migration must not use (db/README.md: every migration runs on MariaDB 10.11
# and MySQL 8.0); the condition goes through `SET @x = IF(...)` + PREPARE/EXECUTE instead.
MARIADB_ONLY_DDL = re.compile(r"\b(ADD|DROP|MODIFY|CHANGE)\s+(COLUMN\s+|KEY\s+|INDEX\s+|UNIQUE\s+(KEY\s+|INDEX\s+)?)?"
                              r"IF\s+(NOT\s+)?EXISTS\b", re.I)
# Released before the rule was checked (a released file is never edited): MariaDB only.
RELEASED_MARIADB_ONLY = {("splitter", 2)}


def test_no_migration_adds_a_column_with_if_not_exists_which_mysql_8_refuses():
    found = [(m.component, m.version, match.group(0)) for c in ALL for m in db.migrations(c)
             if (m.component, m.version) not in RELEASED_MARIADB_ONLY for match in MARIADB_ONLY_DDL.finditer(m.text)]
    assert found == []
    assert MARIADB_ONLY_DDL.search("ALTER TABLE t\n  ADD COLUMN IF NOT EXISTS c INT")       # the lint can fail
    assert MARIADB_ONLY_DDL.search(db.migrations("splitter")[1].text)


def test_splitter_0003_runs_again_from_the_top_after_stopping_halfway(make_database):
    """Its conditional columns: one already there is left alone, one missing is added; twice."""
    url = make_database("mig0003")
    migrate(url, "splitter")
    migration = next(m for m in db.migrations("splitter") if m.version == 3)
    servers.query(url, "ALTER TABLE splitter_epoch DROP COLUMN dir, DROP COLUMN files")
    servers.query(url, "UPDATE splitter_seq SET closed_below = 3 WHERE id = 1")
    first = None
    for _ in range(2):
        conn = db.connect(url)
        try:
            with conn.cursor() as cur:
                for statement in migration.statements():
                    cur.execute(statement)
            conn.commit()
        finally:
            conn.close()
        columns = servers.query(url, "SELECT table_name, column_name, column_type FROM information_schema.columns "
                                     "WHERE table_schema = DATABASE() AND table_name IN ('splitter_seq', 'splitter_epoch') "
                                     "ORDER BY table_name, ordinal_position")
        assert first is None or columns == first
        first = columns
    names = {(t, c) for t, c, _ in first}
    assert {("splitter_epoch", c) for c in ("sealed", "dir", "files")} <= names
    assert {("splitter_seq", c) for c in ("closed_below", "sealed_below", "truncated_below")} <= names
    assert servers.query(url, "SELECT closed_below FROM splitter_seq")[0][0] == 3
