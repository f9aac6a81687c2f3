"""The database stopped and started under a running API: 503 with a message while it is down,
200 again once it is back, with no restart of the API (a private mariadbd of the test's own)."""
from __future__ import annotations

from tests import servers
from tests.test_api_contract import Http


def test_database_outage_is_503_and_the_api_recovers_by_itself(private_mariadb, api_factory, shared_dir):
    name = servers.unique_name("outage")
    conn = servers.admin_connect(port=private_mariadb.port)
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}`")
    conn.close()
    server = api_factory(servers.service_env(private_mariadb.url(name), shared_dir, servers.free_port(),
                                             REAP_INTERVAL="0.2"))
    pid = server.process.proc.pid
    http = Http(server)
    http.ok("POST", "/files/register", {"filename": "20250101000000"})
    http.ok("POST", "/stages/event-ingest/done", {"filename": "20250101000000"})

    private_mariadb.stop()
    for method, path, body in (("POST", "/files/register", {"filename": "20250101000001"}),
                               ("POST", "/queues/shard-splitter/claim", {"worker": "w"}),
                               ("POST", "/stages/shard-splitter/start", {"filename": "20250101000000", "shard": 0}),
                               ("GET", "/files/20250101000000", None),
                               ("GET", "/queues/shard-splitter", None),
                               ("GET", "/metrics/summary", None)):
        code, answer = http.post(path, body) if method == "POST" else http.get(path)
        assert code == 503, (path, code, answer)
        assert "database" in answer["error"] and answer["retry"] is True
    code, answer = http.get("/ready")
    assert code == 503 and answer == {"status": "unavailable"}   # why: in the log, or with the token
    assert "not ready: database" in server.process.output() and "unreachable" in server.process.output()
    assert http.ok("GET", "/health") == {"status": "ok"}
    # the client library retries a 503, and past its max_wait reports the outage
    client = server.client(max_wait=0.5)
    try:
        client.file("20250101000000")
        raise AssertionError("the client should have given up")
    except Exception as exc:
        assert "503" in str(exc)

    private_mariadb.start()
    servers.wait_until(lambda: http.get("/ready")[0] == 200, 30, what="ready again")
    servers.wait_until(lambda: http.post("/files/register", {"filename": "20250101000001"})[0] == 200, 10,
                       what="writes again")
    assert server.process.proc.poll() is None and server.process.proc.pid == pid  # never restarted
    assert [s["event_ingest_status"] for s in http.ok("GET", "/files/20250101000000")["shards"]] == ["done", "done"]
    items = http.ok("POST", "/queues/shard-splitter/claim", {"limit": 2, "worker": "w"})["items"]
    assert {(i["filename"], i["shard"]) for i in items} == {("20250101000000", 0), ("20250101000000", 1)}
    assert "unhandled error" not in server.process.output()
