"""Numbered schema migrations (app/db.py `migrate`, db/migrations/): applied in order and
recorded once, safe when many processes start together, never run without the lock, a database
made before the ledger adopted without re-running anything, a table dropped by hand re-created,
and every file problem a clear MigrationError, never mistaken for a database outage."""
from __future__ import annotations

import hashlib
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
                                                            ("tracking", 4, 0), ("tracking", 5, 0), ("tracking", 6, 0),
                                                            ("tracking", 7, 0), ("tracking", 8, 0)]
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


def test_a_procedure_lost_by_a_dump_without_routines_is_created_again_and_nothing_else_runs(make_database):
    """`mysqldump` leaves stored procedures out unless asked (`--routines`): a database restored
    from such a dump has the ledger saying tracking 0007 and 0008 ran, and no procedure. Their
    `creates` name the procedures, so the next migration runs each again, and nothing else."""
    url = make_database("routine")
    migrate(url, "tracking")
    servers.query(url, "DROP PROCEDURE pipeline_register")
    assert [str(m) for m in migrate(url, "tracking")] == ["tracking 0007_register_procedure"]
    servers.query(url, "DROP PROCEDURE pipeline_claim")
    assert [str(m) for m in migrate(url, "tracking")] == ["tracking 0008_claim_procedure"]
    assert servers.query(url, "SELECT routine_name FROM information_schema.routines WHERE routine_schema = DATABASE()"
                              " AND routine_type = 'PROCEDURE' ORDER BY routine_name") == [("pipeline_claim",),
                                                                                         ("pipeline_register",)]
    assert migrate(url, "tracking") == []


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
    assert not isinstance(caught.value, db.UNAVAILABLE)   # recorded as started, not as applied
    assert servers.query(url, "SELECT version, checksum = %s FROM schema_migrations WHERE component = 'splitter' "
                              "ORDER BY version", (db.STARTED,)) == [(v, 0) for v in range(1, known + 1)] + [(known + 1, 1)]


def test_a_migration_whose_process_died_half_way_runs_again_and_is_never_adopted(make_database, sql_copy):
    """A process killed after a migration's tables exist but before its later statements (here
    the seed row splitter 0001 gives `splitter_seq`; a chaos run lost its splitter there and
    every file then failed on the missing row) left everything its `creates` line lists: taken
    for a database made before the ledger, it was adopted and the seed never came. It is
    recorded as started first, so the next process runs it again from its start."""
    url = make_database("died")
    known = len(db.migrations("splitter"))
    name = f"{known + 1:04d}_seeded"
    path = sql_copy / "migrations" / "splitter" / f"{name}.sql"
    text = ("-- creates: seeded\nCREATE TABLE IF NOT EXISTS seeded (id INT PRIMARY KEY);\n"
            "INSERT INTO seeded (id) VALUES (1) ON DUPLICATE KEY UPDATE id = id;\n")
    migrate(url, "splitter")
    # The process dies at the second statement (its connection killed there).
    path.write_text(text.replace("INSERT INTO seeded (id) VALUES (1) ON DUPLICATE KEY UPDATE id = id;",
                                 "KILL CONNECTION_ID();"))
    with pytest.raises(db.MigrationError, match="statement 2 failed.*Connection was killed"):
        migrate(url, "splitter")
    assert servers.query(url, "SELECT COUNT(*) FROM seeded") == [(0,)]
    path.write_text(text)                     # the next process, with the file as released
    assert [m.name for m in migrate(url, "splitter")] == ["seeded"]
    assert servers.query(url, "SELECT id FROM seeded") == [(1,)]
    assert ledger(url)[-1] == ("splitter", known + 1, "seeded", 0)
    assert servers.query(url, "SELECT checksum FROM schema_migrations WHERE version = %s AND component = 'splitter'",
                         (known + 1,)) == [(db.migrations("splitter")[-1].checksum,)]
    assert migrate(url, "splitter") == []


@pytest.mark.parametrize("damage, message", [
    (lambda root: shutil.rmtree(root / "migrations" / "worker"), "cannot read the SQL files"),
    (lambda root: (root / "migrations" / "worker" / "0001_worker_state.sql").rename(
        root / "migrations" / "worker" / "0002_worker_state.sql"), "without gaps"),
    (lambda root: (root / "migrations" / "worker" / "2_more.sql").write_text("SELECT 1;\n"), "NNNN_name.sql"),
    (lambda root: (root / "migrations" / "worker" / "0004_lean_state.sql").write_text(
        "-- replaces: 61511e8c21c4\nSELECT 1;\n"), "replaces"),
    (lambda root: (root / "migrations" / "worker" / "0004_lean_state.sql").write_text(
        "-- replaces:\nSELECT 1;\n"), "replaces"),
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
# The text of splitter 0002 as first released (MariaDB only), which databases may have recorded;
# the file now holds its portable rewrite, which names this text's checksum (`-- replaces:`).
RELEASED_SPLITTER_0002 = Path(__file__).parent / "migration_fixtures" / "splitter_0002_compact_order_index.released.sql"
RELEASED_CHECKSUM = "61511e8c21c4ff2a530dacd0ca15d37f4d43b7c31dfc23e803b05ded54e21c1f"
SPLITTER = db.migrations("splitter")   # the real files, read before any test swaps the folder
SPLITTER_TABLES = ("splitter_epoch", "splitter_file", "splitter_order", "splitter_sealed", "splitter_seq")


def test_no_migration_uses_ddl_that_mysql_8_refuses():
    """Every file, its statements (what runs: comments may name the forms)."""
    found = [(m.component, m.version, match.group(0)) for c in ALL for m in db.migrations(c)
             for match in MARIADB_ONLY_DDL.finditer("\n".join(m.statements()))]
    assert found == []
    assert MARIADB_ONLY_DDL.search("ALTER TABLE t\n  ADD COLUMN IF NOT EXISTS c INT")       # the lint can fail
    assert MARIADB_ONLY_DDL.search("\n".join(db.split_sql(RELEASED_SPLITTER_0002.read_text())))


def splitter_files(root: Path, upto: int, released_0002: bool = False) -> None:
    """The copy's splitter migrations: the real ones up to `upto`, 0002 as first released if asked."""
    folder = root / "migrations" / "splitter"
    shutil.rmtree(folder)
    folder.mkdir()
    for m in SPLITTER[:upto]:
        text = RELEASED_SPLITTER_0002.read_text() if (m.version, released_0002) == (2, True) else m.text
        (folder / f"{m.version:04d}_{m.name}.sql").write_text(text)


def splitter_schema(url) -> dict[str, str]:
    """SHOW CREATE TABLE of each splitter table there (its AUTO_INCREMENT counter left out)."""
    return {t: re.sub(r" AUTO_INCREMENT=\d+", "", servers.query(url, f"SHOW CREATE TABLE {t}")[0][1])
            for t in SPLITTER_TABLES if t in tables(url)}


def old_order_index(url) -> None:
    """Rows in the tables of splitter 0001: two files indexed, one not; purchases of each."""
    for sql in ("INSERT INTO splitter_file (filename, horizon, indexed_seq, purchases, indexed_at) VALUES "
                "('20260101000000', 0, 1, 2, NOW(3)), ('20260101000001', 1, 2, 1, NOW(3)), "
                "('20260101000002', 2, NULL, NULL, NULL)",
                "UPDATE splitter_seq SET value = 2 WHERE id = 1",
                "INSERT INTO splitter_order (file_id, line, order_id, shop_id) VALUES "
                "(1, 1, -9000000000000000000, 3), (1, 5, 8674665223082153551, 4), (2, 2, 42, 5), (3, 1, 7, 1)"):
        servers.query(url, sql)


def order_index_rows(url) -> dict[str, list]:
    return {"file": servers.query(url, "SELECT file_id, filename, horizon, indexed_seq, purchases, epoch, floor_seq "
                                       "FROM splitter_file ORDER BY file_id"),
            "order": servers.query(url, "SELECT epoch, order_id, file_id, line, shop_id FROM splitter_order "
                                        "ORDER BY epoch, order_id, file_id, line"),
            "epoch": servers.query(url, "SELECT epoch, first_seq, last_seq FROM splitter_epoch ORDER BY epoch"),
            "seq": servers.query(url, "SELECT id, value, epoch, epoch_rows, pruned_epoch FROM splitter_seq")}


# What old_order_index's rows become: every purchase in epoch 0, whose files' sequences are 1..2.
OLD_ROWS_MIGRATED = {
    "order": [(0, -9000000000000000000, 1, 1, 3), (0, 7, 3, 1, 1), (0, 42, 2, 2, 5), (0, 8674665223082153551, 1, 5, 4)],
    "epoch": [(0, 1, 2)]}


def test_a_database_that_applied_the_released_splitter_0002_is_accepted_and_left_alone(make_database, sql_copy):
    """The rewrite names the released text's checksum: a database that ran that text (on
    MariaDB) starts with the new files, keeps its rows and its record of what ran, and gets
    the schema a fresh database gets from the rewrite."""
    assert hashlib.sha256(RELEASED_SPLITTER_0002.read_bytes()).hexdigest() == RELEASED_CHECKSUM
    assert SPLITTER[1].replaces == {RELEASED_CHECKSUM}
    fresh = make_database("fresh0002")
    migrate(fresh, "splitter")
    url = make_database("old0002")
    splitter_files(sql_copy, 1)
    migrate(url, "splitter")
    old_order_index(url)
    splitter_files(sql_copy, 2, released_0002=True)
    assert [str(m) for m in migrate(url, "splitter")] == ["splitter 0002_compact_order_index"]
    before = order_index_rows(url)
    recorded = "SELECT checksum FROM schema_migrations WHERE component = 'splitter' AND version = 2"
    assert servers.query(url, recorded) == [(RELEASED_CHECKSUM,)]

    splitter_files(sql_copy, len(SPLITTER))       # the current files, the rewrite among them
    assert [m.version for m in migrate(url, "splitter")] == list(range(3, len(SPLITTER) + 1))
    assert migrate(url, "splitter") == []
    assert order_index_rows(url) == before
    assert {k: before[k] for k in OLD_ROWS_MIGRATED} == OLD_ROWS_MIGRATED
    assert servers.query(url, recorded) == [(RELEASED_CHECKSUM,)]
    assert ledger(url) == sorted(("splitter", m.version, m.name, 0) for m in SPLITTER)
    assert (tables(url), splitter_schema(url)) == (tables(fresh), splitter_schema(fresh))
    # Run again (a column it creates dropped by hand): the rewrite ran, and the record says so.
    servers.query(url, "ALTER TABLE splitter_file DROP COLUMN opened_at")
    assert [str(m) for m in migrate(url, "splitter")] == ["splitter 0002_compact_order_index"]
    assert servers.query(url, recorded) == [(SPLITTER[1].checksum,)]
    assert order_index_rows(url) == before and splitter_schema(url) == splitter_schema(fresh)


def test_the_rewrite_of_splitter_0002_makes_what_the_released_text_made(make_database, sql_copy):
    """On the same rows, the released text and its rewrite leave the same schema and rows."""
    results = []
    for released in (True, False):
        url = make_database("same0002")
        splitter_files(sql_copy, 1)
        migrate(url, "splitter")
        old_order_index(url)
        splitter_files(sql_copy, 2, released_0002=released)
        migrate(url, "splitter")
        results.append((splitter_schema(url), order_index_rows(url)))
    assert results[0] == results[1]
    assert {k: results[1][1][k] for k in OLD_ROWS_MIGRATED} == OLD_ROWS_MIGRATED


def _rewrite(root: Path, edit) -> None:
    path = root / "migrations" / "splitter" / "0002_compact_order_index.sql"
    path.write_text(edit(path.read_text()))


def _without_replaces(root: Path) -> None:
    _rewrite(root, lambda text: re.sub(r"(?m)^-- replaces:.*\n", "", text))


def _another_checksum(root: Path) -> None:
    _rewrite(root, lambda text: re.sub(r"(?m)^(-- replaces: )\w+", r"\g<1>" + "0" * 64, text))


def _renamed(root: Path) -> None:
    folder = root / "migrations" / "splitter"
    (folder / "0002_compact_order_index.sql").rename(folder / "0002_compact_index.sql")


def _named_by_another_version(root: Path) -> None:
    _without_replaces(root)
    path = root / "migrations" / "splitter" / "0003_sealed_order_index.sql"
    path.write_text(f"-- replaces: {RELEASED_CHECKSUM}\n" + path.read_text())


@pytest.mark.parametrize("change", [_without_replaces, _another_checksum, _renamed, _named_by_another_version])
def test_a_changed_migration_without_its_old_checksum_in_a_replaces_line_is_still_refused(make_database, sql_copy,
                                                                                          change):
    url = make_database("refuse0002")
    splitter_files(sql_copy, 2, released_0002=True)
    migrate(url, "splitter")
    splitter_files(sql_copy, len(SPLITTER))
    change(sql_copy)
    with pytest.raises(db.MigrationError, match="never edited"):
        migrate(url, "splitter")


@pytest.mark.parametrize("change", [
    pytest.param(lambda root: splitter_files(root, 2, released_0002=True), id="older-code"),
    pytest.param(lambda root: _rewrite(root, lambda text: text + "-- a harmless-looking edit\n"), id="rewrite-edited"),
])
def test_a_database_the_rewrite_migrated_refuses_the_released_text_and_any_edit(make_database, sql_copy, change):
    """Only the checksums of older texts are accepted in place of the file's own: code from
    before the rewrite, or an edit of the rewrite (its `replaces` line kept), is refused."""
    url = make_database("back0002")
    splitter_files(sql_copy, 2)
    migrate(url, "splitter")
    change(sql_copy)
    with pytest.raises(db.MigrationError, match="never edited"):
        migrate(url, "splitter")


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


def _run_statements(url, statements) -> None:
    conn = db.connect(url)
    try:
        with conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
                if cur.description:
                    cur.fetchall()
        conn.commit()
    finally:
        conn.close()


def test_splitter_0002_runs_again_from_the_top_after_stopping_before_any_statement(make_database, sql_copy):
    """Stopped before any statement that changes something (a SET or PREPARE dies with its
    session), between the copy and the RENAME or after it included, then run by `migrate`
    from the top: the schema and rows a run without a stop gives."""
    rewrite = SPLITTER[1]
    statements = rewrite.statements()
    assert any("RENAME TABLE" in s for s in statements)
    reference = make_database("ref0002")
    splitter_files(sql_copy, 1)
    migrate(reference, "splitter")
    old_order_index(reference)
    splitter_files(sql_copy, len(SPLITTER))
    migrate(reference, "splitter")
    stops = [k for k in range(1, len(statements)) if not statements[k - 1].startswith(("SET", "PREPARE", "DEALLOCATE"))]
    assert len(stops) >= 12
    for k in stops:
        url = make_database("stop0002")
        splitter_files(sql_copy, 1)
        migrate(url, "splitter")
        old_order_index(url)
        _run_statements(url, statements[:k])
        splitter_files(sql_copy, len(SPLITTER))
        assert [m.version for m in migrate(url, "splitter")] == list(range(2, len(SPLITTER) + 1)), k
        assert (tables(url), splitter_schema(url), order_index_rows(url)) == (
            tables(reference), splitter_schema(reference), order_index_rows(reference)), statements[k - 1]
        # Taken as done (not run again) only once its last column is there: only a DEALLOCATE was left.
        adopted = [a for c, v, _, a in ledger(url) if (c, v) == ("splitter", 2)]
        assert adopted == [int(k == len(statements) - 1)], statements[k - 1]


def test_splitter_0002_run_again_on_a_later_index_changes_nothing(make_database):
    """Run again once 0003 partitioned the index and the splitter wrote epochs and sealed one
    (`migrate` does so if a column it creates was dropped by hand): no row moves to epoch 0,
    the partitions stay, a sealed epoch keeps its buckets' directory. The released text, run
    again, copied every row into epoch 0 of an unpartitioned table and reset each epoch row."""
    url = make_database("again0002")
    migrate(url, "splitter")
    for sql in ("INSERT INTO splitter_file (filename, horizon, indexed_seq, purchases, indexed_at, epoch) VALUES "
                "('20260101000000', 0, 1, 2, NOW(3), 0), ('20260101000001', 1, 2, 1, NOW(3), 1), "
                "('20260101000002', 2, NULL, NULL, NULL, 2)",
                "UPDATE splitter_seq SET value = 2 WHERE id = 1",
                "INSERT INTO splitter_order (epoch, order_id, file_id, line, shop_id) VALUES (0, 8, 1, 1, 3), "
                "(1, 42, 2, 2, 5), (2, 7, 3, 1, 1), (2, 9, 3, 2, 1)",
                "INSERT INTO splitter_epoch (epoch, first_seq, last_seq, sealed, dir, files) VALUES "
                "(0, 1, 1, 1, x'00', x'01'), (1, 2, 2, 0, NULL, NULL)",
                "UPDATE splitter_seq SET epoch = 2, sealed_below = 1, closed_below = 1 WHERE id = 1"):
        servers.query(url, sql)

    def state():
        return (splitter_schema(url), order_index_rows(url), servers.query(url, "SELECT * FROM splitter_epoch"),
                servers.query(url, "SELECT * FROM splitter_seq"),
                servers.query(url, "SELECT COUNT(*) FROM information_schema.partitions WHERE table_schema = DATABASE() "
                                   "AND table_name = 'splitter_order' AND partition_name IS NOT NULL"))
    before = state()
    assert before[-1] == [(8,)]
    _run_statements(url, SPLITTER[1].statements())
    assert state() == before
    servers.query(url, "ALTER TABLE splitter_file DROP COLUMN opened_at")
    assert [str(m) for m in migrate(url, "splitter")] == ["splitter 0002_compact_order_index"]
    assert state() == before


def test_splitter_0004_runs_again_and_its_procedure_commits_nothing_itself(make_database):
    """The completion's procedure: its migration runs again from the top (the procedure there
    or dropped), and a CALL is part of the caller's transaction: rolled back, it marked
    nothing; committed, the file is indexed and the sequence moved on."""
    url = make_database("mig0004")
    migrate(url, "splitter")
    migration = next(m for m in db.migrations("splitter") if m.version == 4)
    _run_statements(url, migration.statements())
    servers.query(url, "DROP PROCEDURE splitter_finalize")
    _run_statements(url, migration.statements())
    assert servers.query(url, "SELECT routine_name, routine_type FROM information_schema.routines "
                              "WHERE routine_schema = DATABASE()") == [("splitter_finalize", "PROCEDURE")]
    servers.query(url, "INSERT INTO splitter_file (filename, horizon, floor_seq, epoch) VALUES ('f', 0, 1, 0)")
    conn = db.connect(url)
    try:
        with conn.cursor() as cur:
            for end in ("ROLLBACK", "COMMIT"):
                cur.execute("START TRANSACTION")
                cur.execute("CALL splitter_finalize(1, 0, 5, 100, 8, NULL, @state)")
                cur.execute("SELECT @state")
                assert cur.fetchone()[0] == "1 0 0 0 0"
                cur.execute(end)
                expected = [(None, 0)] if end == "ROLLBACK" else [(1, 5)]
                assert servers.query(url, "SELECT f.indexed_seq, s.epoch_rows FROM splitter_file f "
                                          "JOIN splitter_seq s ON s.id = 1") == expected
    finally:
        conn.close()
