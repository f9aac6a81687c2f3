"""The API is never open by accident: no token on an address other machines reach refuses to
start (one line saying how to set one) unless PIPELINE_API_INSECURE=1 says so (warned); an
empty token is a config error; /ready and error texts name no database user, host or name to
a caller without the token; the daemons and the dashboard send the token."""
from __future__ import annotations

import re
import subprocess
import sys

import requests

from app.config import MySQLURL
from monitor.api import ApiSource
from tests import servers

BASE = "/api/v1/pipeline"
TOKEN = "a-long-random-token-for-tests-0123456789"
# How a refused call reads in a daemon's log (app/client.ApiError, the API's 401 answer); a bare
# "401" is no sign: a log line's milliseconds, a count or a pid can read so.
REFUSAL = re.compile(r"HTTP 401|Authorization: Bearer")


def run(module: str, env: dict, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=servers.ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def answers(port: int) -> bool:
    try:
        requests.get(f"http://127.0.0.1:{port}{BASE}/health", timeout=1)
        return True
    except requests.ConnectionError:
        return False


def test_listening_beyond_loopback_without_a_token_refuses_to_start(pipeline_db, shared_dir):
    port = servers.free_port()
    env = servers.service_env(pipeline_db, shared_dir, port, PIPELINE_API_HOST="0.0.0.0")
    for module in ("app.apid", "app.api"):
        done = run(module, env)
        assert done.returncode != 0
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert lines[0].startswith("config error: PIPELINE_API_TOKEN: pipeline-apid would listen on 0.0.0.0:")
        assert "set PIPELINE_API_TOKEN to a long random secret" in lines[0] and "PIPELINE_API_INSECURE=1" in lines[0]
        assert not answers(port)
    short = run("app.apid", {**env, "PIPELINE_API_TOKEN": "s3cret"})
    assert short.returncode != 0 and "too short for an API listening on 0.0.0.0" in short.stderr


def test_an_empty_token_is_a_config_error_for_every_service(pipeline_db, shared_dir):
    env = servers.service_env(pipeline_db, shared_dir, servers.free_port(), PIPELINE_API_TOKEN="")
    for module, args in (("app.apid", ()), ("app.ingest", ("--files", "1")), ("app.splitter", ())):
        done = run(module, env, *args)
        assert done.returncode != 0, (module, done.stdout[-2000:])
        assert "config error: PIPELINE_API_TOKEN: is set but empty" in done.stderr, (module, done.stderr)
    assert not answers(int(env["PIPELINE_API_PORT"]))


def test_insecure_on_purpose_is_served_with_a_warning(api_factory, pipeline_db, shared_dir):
    env = servers.service_env(pipeline_db, shared_dir, servers.free_port(), PIPELINE_API_HOST="0.0.0.0",
                              PIPELINE_API_INSECURE="1")
    server = api_factory(env)
    assert requests.post(f"{server.base}/files/register", json={"filename": "20990101000000"}, timeout=10).ok
    assert "PIPELINE_API_INSECURE=1: listening on 0.0.0.0" in server.process.output()


def test_ready_and_errors_name_no_database_to_a_caller_without_the_token(api_factory, pipeline_db, shared_dir,
                                                                         tmp_path):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    server = api_factory(servers.service_env(pipeline_db, shared_dir, servers.free_port(), PIPELINE_API_TOKEN=TOKEN))
    assert requests.get(f"{server.base}/ready", timeout=10).json() == {"status": "ready"}
    assert requests.get(f"{server.base}/ready", headers=auth, timeout=10).json() == {
        "status": "ready", "database": str(pipeline_db)}

    # a database user the server does not know: its error text names user, host and database
    bad = MySQLURL(pipeline_db.host, pipeline_db.port, "nosuchuser", "pw", "secret_db_name")
    env = servers.service_env(bad, shared_dir, servers.free_port(), PIPELINE_API_TOKEN=TOKEN)
    proc = servers.Process("app.apid", [], env, tmp_path / "apid-bad.log").start()
    try:
        servers.wait_until(lambda: answers(int(env["PIPELINE_API_PORT"])), 30, what="pipeline-apid answering")
        base = f"http://127.0.0.1:{env['PIPELINE_API_PORT']}{BASE}"
        for path in ("/ready", "/files/20990101000000", "/metrics/summary", "/queues/shard-splitter"):
            resp = requests.get(base + path, timeout=10)
            assert resp.status_code == 503, (path, resp.text)
            for secret in ("nosuchuser", "secret_db_name", str(pipeline_db.port), "Access denied"):
                assert secret not in resp.text, (path, resp.text)
        assert requests.post(f"{base}/files/register", json={"filename": "20990101000000"}, timeout=10
                             ).status_code == 401
        told = requests.get(f"{base}/ready", headers=auth, timeout=10).json()
        assert told["status"] == "unavailable" and "nosuchuser" in told["error"]
        assert "nosuchuser" in requests.get(f"{base}/files/20990101000000", headers=auth, timeout=10).json()["error"]
        assert "Access denied for user 'nosuchuser'" in proc.output()   # the operator reads it in the log
    finally:
        proc.stop()


def test_daemons_and_dashboard_send_the_token(api_factory, pipeline_db, shard_dbs, shared_dir, tmp_path):
    env = servers.service_env(pipeline_db, shared_dir, servers.free_port(), shard_dbs, PIPELINE_API_TOKEN=TOKEN,
                              POLL_MAX_SECONDS="0.1", LEASE_SECONDS="5", WORKER_ID="test-token")
    server = api_factory(env)
    assert requests.post(f"{server.base}/files/register", json={"filename": "20990101000001"}, timeout=10
                         ).status_code == 401
    made = run("app.ingest", env, "--files", "1", "--events", "20", "--start", "20990101000002", timeout=60)
    assert made.returncode == 0 and not refused(made.stdout), made.stdout[-2000:]
    name = made.stdout.split()[-1]
    splitter = servers.Process("app.splitter", [], env, tmp_path / "splitter.log").start()
    worker = servers.Process("app.worker", ["--shard", "0"], env, tmp_path / "worker.log").start()
    client = server.client()
    try:
        def split_and_worked():
            shards = client.file(name)["shards"]
            return all(s["shard_splitter_status"] == "done" for s in shards) and \
                shards[0]["shard_worker_status"] == "done"
        servers.wait_until(split_and_worked, 60, 0.1, what="the splitter and worker through the token")
        client.fail("mysql-sender", name, 0, "for the dashboard to retry", "test")
        dashboard = ApiSource(server.base, TOKEN)
        assert dashboard.retry("mysql-sender", name, 0)["status"] == "new"
        for proc in (splitter, worker):
            assert not refused(proc.output()), proc.output()[-2000:]
    finally:
        for proc in (splitter, worker):
            assert proc.stop() == 0, proc.output()[-2000:]


def refused(output: str) -> bool:
    """Whether a daemon's output tells of a call refused for its token."""
    return REFUSAL.search(output) is not None


def test_a_refusal_is_told_from_a_log_lines_milliseconds():
    assert not refused("2026-11-29 19:29:25,401 INFO shard-splitter: shard-splitter starting\n")
    assert refused("2026-11-29 19:29:25,402 WARNING shard-splitter: claim refused: HTTP 401: missing or wrong "
                   "'Authorization: Bearer <token>'\n")
