"""Fixtures: unique databases on the real MariaDB, the real API on loopback, private servers."""
from __future__ import annotations

import shutil

import pytest

from tests import servers

# Fixtures that stand on the test MariaDB: a run that collects any of them checks it first.
NEEDS_MARIADB = {"make_database", "pipeline_db", "shard_dbs", "api_env", "api"}


def pytest_collection_modifyitems(session, config, items):
    """Without the MariaDB the tests use, say so in one line before running anything, instead
    of failing every test with a connection error."""
    if not any(NEEDS_MARIADB & set(getattr(item, "fixturenames", ())) for item in items):
        return
    try:
        servers.admin_connect().close()
    except Exception as exc:
        pytest.exit(f"no MariaDB at {servers.MYSQL_HOST}:{servers.MYSQL_PORT} (user {servers.MYSQL_USER}): "
                    f"{str(exc)[:120]}. The tests need one: start it (`start-stop-daemon --start --oknodo "
                    f"--background --exec /usr/sbin/mariadbd`; `.ci/run` does) or set TEST_MYSQL_HOST/PORT",
                    returncode=2)


@pytest.fixture
def make_database():
    """Factory: a fresh, uniquely named database on the test server; dropped afterwards."""
    created: list[tuple[str, str, int]] = []

    def make(prefix: str = "db", host: str = servers.MYSQL_HOST, port: int = servers.MYSQL_PORT):
        name = servers.unique_name(prefix)
        conn = servers.admin_connect(host, port)
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{name}`")
        conn.close()
        created.append((name, host, port))
        return servers.server_url(name, host, port)

    yield make
    for name, host, port in created:
        try:
            conn = servers.admin_connect(host, port)
            with conn.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
            conn.close()
        except Exception:
            pass  # a private server already gone takes its databases with it


@pytest.fixture
def pipeline_db(make_database):
    return make_database("pipe")


@pytest.fixture
def shard_dbs(make_database):
    return [make_database(f"shard{n}") for n in range(2)]


@pytest.fixture
def shared_dir(tmp_path):
    path = tmp_path / "shared"
    path.mkdir()
    return path


@pytest.fixture
def api_factory(tmp_path):
    """Factory: start pipeline-apid with an environment; stopped afterwards."""
    started: list[servers.ApiServer] = []

    def start(env: dict) -> servers.ApiServer:
        server = servers.start_api(env, tmp_path / "logs")
        started.append(server)
        return server

    yield start
    for server in started:
        server.process.stop()


@pytest.fixture
def api_env(pipeline_db, shared_dir, shard_dbs):
    return servers.service_env(pipeline_db, shared_dir, servers.free_port(), shard_dbs)


@pytest.fixture
def api(api_factory, api_env):
    """pipeline-apid on a free loopback port over a fresh database."""
    return api_factory(api_env)


@pytest.fixture
def private_mariadb():
    """A mariadbd of the test's own on a spare port (stop and start it at will)."""
    server = servers.new_private_mariadb()
    yield server
    server.stop()
    shutil.rmtree(server.datadir, ignore_errors=True)
