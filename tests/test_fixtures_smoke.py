"""The test harness itself: the API comes up on a fresh database; a private server runs."""
import shutil
from pathlib import Path

from tests import servers


def test_api_registers_on_fresh_database(api):
    client = api.client()
    assert client.register("20250101000000", [0, 1]) == {"filename": "20250101000000", "shards": [0, 1],
                                                        "created": True}


def test_private_mariadb_accepts_connections(private_mariadb):
    conn = servers.admin_connect(port=private_mariadb.port)
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)
    conn.close()


def test_private_mariadb_leaves_the_machine_tmpdir_alone(tmp_path, monkeypatch):
    """A mariadbd starting deletes every `#sql*` file in its tmpdir: a private one on the default
    (/tmp, the test server's too) deleted the on-disk temporary tables of whatever ran on the
    test server beside it (a flaky InternalError: "Error on delete of '/tmp/#sql-temptable-...'").
    Its tmpdir is its own, and not listed as a database. The machine's tmpdir here is a folder of
    the test's (TMPDIR, mariadbd's default): the real /tmp has other servers starting beside."""
    machine_tmp = tmp_path / "machine-tmp"
    machine_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(machine_tmp))
    canary = machine_tmp / "#sql-temptable-canary.MAI"
    canary.write_bytes(b"in use by another server")
    server = servers.new_private_mariadb()
    try:
        conn = servers.admin_connect(port=server.port)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT @@tmpdir")
                tmpdir = Path(cur.fetchone()[0])
                cur.execute("SHOW DATABASES")
                databases = {name for name, in cur.fetchall()}
        finally:
            conn.close()
        assert canary.exists()
        assert tmpdir.resolve().is_relative_to(server.datadir.resolve())
        assert not any("tmp" in name for name in databases), databases
    finally:
        server.stop()
        shutil.rmtree(server.datadir, ignore_errors=True)
