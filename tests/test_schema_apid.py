"""The tracking schema: its migrations applied twice and by two API instances starting together;
an original-shaped table upgraded in place (nothing lost, everything of a fresh install present);
every queue and claim query an index range/ref read without filesort (EXPLAIN)."""
from __future__ import annotations

import re

import pymysql
import pytest

from app import db
from app.api import queries, schema
from tests import servers
from tests.test_api_contract import Http


def connect(url):
    return db.connect(url)


def shape(url) -> dict:
    """Columns (type, nullable, default) and indexes (unique, columns) of the tracking tables."""
    conn = connect(url)
    out = {}
    with conn.cursor() as cur:
        for table in ("pipeline_tracking", "pipeline_transitions", "pipeline_claim_lock"):
            cur.execute("SELECT column_name, column_type, is_nullable, column_default FROM information_schema.columns "
                        "WHERE table_schema=DATABASE() AND table_name=%s", (table,))
            columns = {r[0].lower(): (r[1].lower(), r[2], None if r[3] is None else str(r[3]).lower())
                       for r in cur.fetchall()}
            cur.execute("SELECT index_name, non_unique, column_name FROM information_schema.statistics "
                        "WHERE table_schema=DATABASE() AND table_name=%s ORDER BY index_name, seq_in_index", (table,))
            indexes: dict[str, list] = {}
            for name, non_unique, column in cur.fetchall():
                indexes.setdefault(name, [not int(non_unique)]).append(column.lower())
            out[table] = {"columns": columns,
                          "indexes": {name: (v[0], tuple(v[1:])) for name, v in indexes.items()}}
    conn.close()
    return out


def install(url) -> None:
    conn = connect(url)
    db.migrate(conn, schema.SCHEMA)
    conn.close()


def test_ddl_applied_twice_changes_nothing(make_database):
    url = make_database("ddl")
    install(url)
    first = shape(url)
    install(url)
    assert shape(url) == first
    versions = servers.query(url, "SELECT component, version, adopted FROM schema_migrations ORDER BY version")
    assert versions == [("tracking", m.version, 0) for m in db.migrations(schema.SCHEMA)]


def test_two_api_instances_starting_together_share_one_schema(make_database, tmp_path):
    url = make_database("twin")
    procs = []
    for _ in range(2):
        port = servers.free_port()
        env = servers.service_env(url, tmp_path, port)
        procs.append(servers.ApiServer(servers.Process("app.apid", [], env, tmp_path / f"apid-{port}.log"), port))
    for server in procs:
        server.process.start()
    try:
        for server in procs:
            server.wait_ready()
        fresh = make_database("fresh")
        install(fresh)
        assert shape(url) == shape(fresh)
        Http(procs[0]).ok("POST", "/files/register", {"filename": "20250101000000"})
        assert Http(procs[1]).ok("GET", "/files/20250101000000")["shards"][1]["event_ingest_status"] == "started"
        for server in procs:
            assert "Traceback" not in server.process.output()
    finally:
        for server in procs:
            server.process.stop()


ORIGINAL = """
CREATE TABLE pipeline_tracking (
  id BIGINT AUTO_INCREMENT PRIMARY KEY,
  filename VARCHAR(255) NOT NULL,
  event_ingest_status ENUM('new','started','done','failed') DEFAULT 'new',
  shard_splitter_status ENUM('new','started','done','failed') DEFAULT 'new',
  shard_worker_status ENUM('new','started','done','failed') DEFAULT 'new',
  mysql_sender_status ENUM('new','started','done','failed') DEFAULT 'new',
  shard TINYINT NOT NULL,
  created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
  updated_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP,
  UNIQUE KEY unique_file_shard (filename, shard),
  INDEX idx_event_ingest_status (event_ingest_status),
  INDEX idx_shard_splitter_status (shard_splitter_status),
  INDEX idx_shard_worker_status (shard_worker_status),
  INDEX idx_mysql_sender_status (mysql_sender_status)
) ENGINE=InnoDB
"""
ROWS = [  # filename, shard, four statuses, created_at
    ("20240101000000", 0, "done", "done", "done", "done", "2024-01-01 00:00:01"),
    ("20240101000000", 1, "done", "done", "done", "failed", "2024-01-01 00:00:01"),
    ("20240101000001", 0, "done", "new", "new", "new", "2024-01-01 00:00:02"),
    ("20240101000001", 1, "done", "done", "new", "new", "2024-01-01 00:00:02"),
    ("20240101000002", 0, "done", "done", "done", None, "2024-01-01 00:00:03"),
    ("20240101000002", 1, "started", "new", "new", "new", "2024-01-01 00:00:03"),
]


def test_original_table_is_upgraded_in_place_losing_nothing(make_database, api_factory, shared_dir):
    url = make_database("orig")
    conn = connect(url)
    with conn.cursor() as cur:
        cur.execute(ORIGINAL)
        cur.executemany("INSERT INTO pipeline_tracking (filename, shard, event_ingest_status, shard_splitter_status,"
                        " shard_worker_status, mysql_sender_status, created_at) VALUES (%s,%s,%s,%s,%s,%s,%s)", ROWS)
        cur.execute("SELECT id, filename, shard FROM pipeline_tracking ORDER BY id")
        ids = cur.fetchall()
    conn.close()

    server = api_factory(servers.service_env(url, shared_dir, servers.free_port()))
    conn = connect(url)
    with conn.cursor() as cur:
        cur.execute("SELECT id, filename, shard FROM pipeline_tracking ORDER BY id")
        assert cur.fetchall() == ids
        cur.execute("SELECT filename, shard, event_ingest_status, shard_splitter_status, shard_worker_status, "
                    "mysql_sender_status, DATE_FORMAT(created_at, '%Y-%m-%d %H:%i:%s') FROM pipeline_tracking "
                    "ORDER BY id")
        kept = cur.fetchall()
    conn.close()
    # the one NULL status (nullable in the original) now reads as the contract's default, 'new'
    assert kept == tuple(tuple("new" if v is None else v for v in row) for row in ROWS)

    fresh = make_database("fresh")
    install(fresh)
    want, got = shape(fresh)["pipeline_tracking"], shape(url)["pipeline_tracking"]
    for column, definition in want["columns"].items():
        assert got["columns"].get(column) == definition, column
    got_by_columns = set(got["indexes"].values())
    for name, (unique, columns) in want["indexes"].items():
        assert (unique, columns) in got_by_columns, name
    forced = {name for _, sql, _ in queries.queue_queries() for name in re.findall(r"FORCE INDEX \((\w+)\)", sql)}
    assert forced <= set(got["indexes"])
    assert len(got["indexes"]) == len(want["indexes"])  # the original's indexes count as ours: no duplicates

    http = Http(server)
    assert [(i["filename"], i["shard"]) for i in http.ok("GET", "/queues/shard-splitter")["items"]] == \
        [("20240101000001", 0)]
    assert [(i["filename"], i["shard"]) for i in http.ok("GET", "/queues/shard-worker")["items"]] == \
        [("20240101000001", 1)]
    assert [(i["filename"], i["shard"]) for i in http.ok("GET", "/queues/mysql-sender")["items"]] == \
        [("20240101000002", 0)]
    summary = http.ok("GET", "/metrics/summary")
    assert summary["total"] == 6 and summary["by_stage"]["mysql_sender"] == {"new": 4, "started": 0, "done": 1,
                                                                             "failed": 1}
    assert http.ok("GET", "/files/20240101000000")["shards"][0]["updated_at"].startswith("20")
    http.ok("POST", "/stages/mysql-sender/retry", {"filename": "20240101000000", "shard": 1})
    http.finish("20240101000001", 1, "shard-worker")
    http.ok("POST", "/stages/event-ingest/done", {"filename": "20240101000002"})
    http.finish("20240101000002", 1, "shard-splitter")
    # a second start of the API finds nothing left to do
    before = shape(url)
    api_factory(servers.service_env(url, shared_dir, servers.free_port()))
    assert shape(url) == before


def test_tables_dropped_under_a_running_api_come_back(api):
    http = Http(api)
    http.ok("POST", "/files/register", {"filename": "20250101000000"})
    conn = servers.admin_connect(database=api.process.env["MYSQL_PIPELINE_URL"].rsplit("/", 1)[1])
    with conn.cursor() as cur:
        cur.execute("DROP TABLE pipeline_transitions")
    conn.close()
    code, body = http.post("/files/register", {"filename": "20250101000001"})
    assert code == 503 and "schema missing" in body["error"]
    servers.wait_until(lambda: http.post("/files/register", {"filename": "20250101000001"})[0] == 200, 10,
                       what="schema reinstalled")


# -- EXPLAIN --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def populated(tmp_path_factory):
    """A tracking table with a few thousand rows in every stage and status, statistics fresh."""
    name = servers.unique_name("explain")
    conn = servers.admin_connect()
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}`")
    conn.close()
    url = servers.server_url(name)
    install(url)
    statuses = [("done", "done", "done", "done")] * 12 + [
        ("started", "new", "new", "new"), ("done", "new", "new", "new"), ("done", "started", "new", "new"),
        ("done", "done", "new", "new"), ("done", "done", "started", "new"), ("done", "done", "done", "new"),
        ("done", "done", "done", "started"), ("done", "failed", "new", "new"), ("done", "done", "failed", "new")]
    rows = []
    for n in range(3000):
        a, b, c, d = statuses[n % len(statuses)]
        started = "started" in (b, c, d)
        rows.append((f"{20240000000000 + n // 2}", n % 2, a, b, c, d, f"w{n % 7}" if started else None,
                     "2030-01-01" if started else None))
    conn = connect(url)
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO pipeline_tracking (filename, shard, event_ingest_status, shard_splitter_status,"
                        " shard_worker_status, mysql_sender_status, owner, lease_expires_at)"
                        " VALUES (%s,%s,%s,%s,%s,%s,%s,%s)", rows)
        cur.execute("ANALYZE TABLE pipeline_tracking")
        cur.fetchall()
    conn.close()
    yield url
    conn = servers.admin_connect()
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    conn.close()


@pytest.mark.parametrize("label,sql,args", queries.queue_queries(), ids=[q[0] for q in queries.queue_queries()])
def test_every_queue_and_claim_query_is_an_index_read_without_filesort(populated, label, sql, args):
    conn = connect(populated)
    with conn.cursor(pymysql.cursors.DictCursor) as cur:
        cur.execute("EXPLAIN " + sql, args)
        plan = cur.fetchall()
    conn.close()
    assert len(plan) == 1, plan
    step = plan[0]
    access = (step["type"] or "").split("|")[0]
    assert access in ("ref", "range", "eq_ref", "const"), (label, step)
    assert step["key"] and step["key"].split("|")[0] != "PRIMARY", (label, step)
    assert "filesort" not in (step["Extra"] or "").lower(), (label, step)
    assert "temporary" not in (step["Extra"] or "").lower(), (label, step)
