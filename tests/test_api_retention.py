"""pipeline_transitions keeps TRANSITIONS_WINDOW of history: the API prunes older rows by itself,
one process at a time (a named lock), and the counters /metrics reads are not touched."""
from __future__ import annotations

import requests

from app import db
from app.api import retention, tracking
from tests import servers
from tests.test_api_concurrency import server_db
from tests.test_api_contract import BASE, module_api, new_name


def age_rows(conn, filename: str, seconds: int) -> None:
    with conn.cursor() as cur:
        cur.execute("UPDATE pipeline_transitions SET at = NOW(3) - INTERVAL %s SECOND WHERE filename=%s",
                    (seconds, filename))
    conn.commit()


def count(conn, sql: str, args=()) -> int:
    with conn.cursor() as cur:
        cur.execute(sql, args)
        n = cur.fetchone()[0]
    conn.commit()
    return int(n)


def test_the_api_prunes_transitions_older_than_the_window_by_itself(tmp_path_factory):
    with module_api(tmp_path_factory, TRANSITIONS_WINDOW="1h") as server:
        root = f"http://127.0.0.1:{server.port}{BASE}"
        old, recent = new_name(), new_name()
        for name in (old, recent):
            requests.post(f"{root}/files/register", json={"filename": name}, timeout=10).raise_for_status()
            requests.post(f"{root}/stages/event-ingest/done", json={"filename": name}, timeout=10).raise_for_status()
        conn = server_db(server)
        try:
            metrics_before = requests.get(f"http://127.0.0.1:{server.port}/metrics", timeout=10).text
            age_rows(conn, old, 2 * 3600)
            assert count(conn, "SELECT COUNT(*) FROM pipeline_transitions WHERE filename=%s", (old,)) == 4
            # A window of an hour prunes every 15 minutes: prune now as the API's thread does.
            settings_window = 3600.0
            conns = db.ThreadConnections(servers.server_url(conn.db.decode()), multi_statements=True)
            assert retention.Retention(tracking.Tracker(conns, 2, 60, 5).store, settings_window).prune() == 4
            assert count(conn, "SELECT COUNT(*) FROM pipeline_transitions WHERE filename=%s", (old,)) == 0
            assert count(conn, "SELECT COUNT(*) FROM pipeline_transitions WHERE filename=%s", (recent,)) == 4
            metrics_after = requests.get(f"http://127.0.0.1:{server.port}/metrics", timeout=10).text
            keep = [ln for ln in metrics_before.splitlines() if ln.startswith("pipeline_transitions_total")]
            assert keep and all(ln in metrics_after.splitlines() for ln in keep)
            conns.discard()
        finally:
            conn.close()


def test_pruning_runs_in_the_api_on_its_own(tmp_path_factory):
    with module_api(tmp_path_factory, TRANSITIONS_WINDOW="2") as server:
        root = f"http://127.0.0.1:{server.port}{BASE}"
        name = new_name()
        requests.post(f"{root}/files/register", json={"filename": name}, timeout=10).raise_for_status()
        conn = server_db(server)
        try:
            assert count(conn, "SELECT COUNT(*) FROM pipeline_transitions WHERE filename=%s", (name,)) == 2
            servers.wait_until(lambda: count(conn, "SELECT COUNT(*) FROM pipeline_transitions") == 0, timeout=20,
                               what="the API to prune transitions older than 2 s")
            assert count(conn, "SELECT COUNT(*) FROM pipeline_tracking WHERE filename=%s", (name,)) == 2
        finally:
            conn.close()


def test_one_pruner_at_a_time(make_database):
    url = make_database("prune")
    conns = db.ThreadConnections(url, multi_statements=True)
    tracker = tracking.Tracker(conns, 2, 60.0, 5)
    tracker.schema.ensure()
    for i in range(12):
        tracker.register(f"2025{i:010d}", [0, 1])
    tracker.store.execute("UPDATE pipeline_transitions SET at = NOW(3) - INTERVAL 1 DAY WHERE id <= 10")
    pruning = retention.Retention(tracker.store, 3600.0)
    holder = db.connect(url)
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT GET_LOCK(%s, 0)", (pruning.lock_name(),))
            assert cur.fetchone()[0] == 1
        assert pruning.prune() is None           # another process is pruning: this one leaves it
        assert tracker.store.read("SELECT COUNT(*) n FROM pipeline_transitions")[0]["n"] == 24
        with holder.cursor() as cur:
            cur.execute("SELECT RELEASE_LOCK(%s)", (pruning.lock_name(),))
    finally:
        holder.close()
    assert pruning.prune() == 10
    assert tracker.store.read("SELECT MIN(id) m, COUNT(*) n FROM pipeline_transitions")[0] == {"m": 11, "n": 14}
    retention.BATCH, saved = 3, retention.BATCH
    try:
        tracker.store.execute("UPDATE pipeline_transitions SET at = NOW(3) - INTERVAL 1 DAY WHERE id <= 21")
        assert pruning.prune() == 11             # in batches of 3 along the key
    finally:
        retention.BATCH = saved
    conns.discard()
