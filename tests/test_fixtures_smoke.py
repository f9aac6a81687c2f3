"""The test harness itself: the API comes up on a fresh database; a private server runs."""
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
