"""Long-poll claims and batch `done`: a claim with `wait=` is held until a task is ready and then
gets it, whichever API instance or process made it ready; waiting claims take no thread from
the daemons' other requests; a waiting claim whose caller went away claims nothing; a batch
`done` answers each task as its own `done` would."""
from __future__ import annotations

import socket
import threading
import time

import orjson
import requests

from tests import servers
from tests.test_api_concurrency import server_db
from tests.test_api_contract import BASE, module_api, new_name


def claim_later(root: str, stage: str, body: dict, wait: float, out: list) -> threading.Thread:
    def run():
        resp = requests.post(f"{root}/queues/{stage}/claim", params={"wait": wait}, json=body, timeout=wait + 20)
        out.append(resp.json())
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_waiting_claim_gets_the_task_another_api_instance_made_ready(tmp_path_factory):
    with module_api(tmp_path_factory, API_WAIT_POLL="0.05") as first:
        env = {**first.process.env, "PIPELINE_API_PORT": str(servers.free_port())}
        second = servers.start_api(env, tmp_path_factory.mktemp("second"))
        try:
            root_a = f"http://127.0.0.1:{first.port}{BASE}"
            root_b = f"http://127.0.0.1:{second.port}{BASE}"
            got: list = []
            waiter = claim_later(root_a, "shard-splitter", {"worker": "w", "limit": 2}, 30, got)
            time.sleep(0.5)
            assert got == []          # nothing ready: still waiting
            name = new_name()
            requests.post(f"{root_b}/files/register", json={"filename": name}, timeout=10).raise_for_status()
            requests.post(f"{root_b}/stages/event-ingest/done", json={"filename": name}, timeout=10).raise_for_status()
            waiter.join(40)
            assert [(i["filename"], i["shard"]) for i in got[0]["items"]] == [(name, 0), (name, 1)]
            # and one made ready by an UPDATE outside any API (only the database is shared)
            conn = server_db(first)
            got.clear()
            waiter = claim_later(root_a, "shard-worker", {"worker": "v", "shard": 1}, 30, got)
            time.sleep(0.5)
            with conn.cursor() as cur:
                cur.execute("UPDATE pipeline_tracking SET shard_splitter_status='done', owner=NULL, "
                            "lease_expires_at=NULL WHERE filename=%s AND shard=1", (name,))
            conn.commit()
            conn.close()
            waiter.join(40)
            assert [(i["filename"], i["shard"]) for i in got[0]["items"]] == [(name, 1)]
        finally:
            second.process.stop()


def test_waiting_claims_leave_the_daemons_threads_free(tmp_path_factory):
    """More waiting claims than API_THREADS x API_WORKERS: a registration is still answered."""
    with module_api(tmp_path_factory, API_THREADS="2", API_WORKERS="2") as server:
        root = f"http://127.0.0.1:{server.port}{BASE}"
        got: list = []
        waiters = [claim_later(root, "mysql-sender", {"worker": f"w{i}", "shard": 0}, 6, got) for i in range(10)]
        time.sleep(1.0)
        name = new_name()
        resp = requests.post(f"{root}/files/register", json={"filename": name}, timeout=10)
        assert resp.status_code == 200
        assert len(got) == 0 and all(w.is_alive() for w in waiters)   # answered while all ten still wait
        for w in waiters:
            w.join(30)
        assert len(got) == 10 and all(g["items"] == [] for g in got)


def test_a_waiting_claim_whose_caller_left_claims_nothing(tmp_path_factory):
    with module_api(tmp_path_factory, API_WORKERS="1") as server:
        root = f"http://127.0.0.1:{server.port}{BASE}"
        body = orjson.dumps({"worker": "gone", "limit": 2})
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(f"POST {BASE}/queues/shard-splitter/claim?wait=20 HTTP/1.1\r\nHost: x\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(0.5)
        sock.close()                       # the daemon stopped while its claim waited
        name = new_name()
        requests.post(f"{root}/files/register", json={"filename": name}, timeout=10).raise_for_status()
        requests.post(f"{root}/stages/event-ingest/done", json={"filename": name}, timeout=10).raise_for_status()
        time.sleep(1.5)
        detail = requests.get(f"{root}/files/{name}", timeout=10).json()
        assert [s["shard_splitter_status"] for s in detail["shards"]] == ["new", "new"]
        # a caller that stays gets them
        got = requests.post(f"{root}/queues/shard-splitter/claim", params={"wait": 5},
                            json={"worker": "here", "limit": 2}, timeout=20).json()
        assert len(got["items"]) == 2


def test_batch_done_answers_each_task_as_its_own_done(tmp_path_factory):
    with module_api(tmp_path_factory) as server:
        root = f"http://127.0.0.1:{server.port}{BASE}"
        s = requests.Session()
        name, other = new_name(), new_name()
        for n in (name, other):
            s.post(f"{root}/files/register", json={"filename": n}, timeout=10).raise_for_status()
            s.post(f"{root}/stages/event-ingest/done", json={"filename": n}, timeout=10).raise_for_status()
        claimed = s.post(f"{root}/queues/shard-splitter/claim", json={"worker": "w", "limit": 2}, timeout=10).json()
        assert {(i["filename"], i["shard"]) for i in claimed["items"]} == {(name, 0), (name, 1)}
        items = [{"filename": name, "shard": 0, "events": 3, "stats": {"lines": 3}},
                 {"filename": name, "shard": 1, "events": 4},
                 {"filename": other, "shard": 0},
                 {"filename": new_name(), "shard": 1}]
        resp = s.post(f"{root}/stages/shard-splitter/done-batch", json={"worker": "w", "items": items}, timeout=10)
        assert resp.status_code == 200
        answers = resp.json()["items"]
        assert [(a["status_code"], a.get("status"), a.get("changed")) for a in answers] == [
            (200, "done", True), (200, "done", True), (409, "new", None), (404, None, None)]
        again = s.post(f"{root}/stages/shard-splitter/done-batch", json={"worker": "w", "items": items[:2]},
                       timeout=10).json()["items"]
        assert [(a["status_code"], a["changed"]) for a in again] == [(200, False), (200, False)]
        history = s.get(f"{root}/files/{name}", timeout=10).json()["shards"][0]["stats"]
        assert history["shard-splitter"] == {"events": 3, "lines": 3}
        bad = s.post(f"{root}/stages/shard-splitter/done-batch", json={"worker": "w", "items": []}, timeout=10)
        assert bad.status_code == 400 and bad.json()["field"] == "items"


def test_a_waiting_claim_wakes_only_on_news_for_its_own_stage_and_shard():
    """Another stage's move wakes no waiter, nor do counts read before its claim began (they
    may show the very task the claim just took); a hint for its stage and shard, or a read
    whose counts changed since, does."""
    from app.api.wakeup import ReadyWatch

    rows = [{"stage": "shard-worker", "shard": 0, "status": "ready", "n": 1}]
    watch = ReadyWatch(lambda: list(rows), 0.02)
    try:
        assert watch.wait("shard-worker", 0, watch.generation, time.monotonic() + 5)  # the first read
        seen = watch.generation    # a claim begins here (and takes that task)
        threading.Timer(0.05, watch.hint, ("mysql-sender", 0)).start()   # while it waits
        threading.Timer(0.1, watch.hint, ("shard-worker", 1)).start()
        began = time.monotonic()
        assert not watch.wait("shard-worker", 0, seen, time.monotonic() + 0.3)
        assert time.monotonic() - began >= 0.25
        seen = watch.generation
        threading.Timer(0.05, watch.hint, ("shard-worker", 0)).start()
        assert watch.wait("shard-worker", 0, seen, time.monotonic() + 5)
        seen = watch.generation
        rows[0] = {**rows[0], "n": 2}   # another API process made one ready
        assert watch.wait("shard-worker", 0, seen, time.monotonic() + 5)
    finally:
        watch.close()


def test_the_ready_watch_reads_only_the_ready_and_started_counts(make_database):
    """The watcher reads the counts every interval while anyone waits: only the rows it uses,
    the ready and started ones that are not 0 (the whole table was ~25 rows a read, 40% of them
    new or done, parsed for nothing); they agree with a scan of the table."""
    from app import db
    from app.api import tracking, wakeup
    from app.api.queries import SQL_COUNTS_SCANNED

    url = make_database("watch_read")
    tracker = tracking.Tracker(db.ThreadConnections(url, multi_statements=True), 2, 60, 3)
    tracker.schema.ensure()
    for n in range(3):
        tracker.register(f"2029{n}", [0, 1], n < 2, "ingest")
    tracker.transition("shard-splitter", "start", "20290", 0, owner="s")
    tracker.transition("shard-splitter", "done", "20290", 0, owner="s")
    tracker.transition("shard-splitter", "start", "20291", 1, owner="s")
    got = sorted((r["stage"], r["shard"], r["status"], int(r["n"])) for r in tracker.store.read(wakeup.SQL_WATCH))
    scanned = sorted((s, h, st, int(n)) for s, h, st, n in servers.query(url, SQL_COUNTS_SCANNED)
                     if st in ("ready", "started") and n)
    assert got == scanned == [("event-ingest", 0, "started", 1), ("event-ingest", 1, "started", 1),
                              ("shard-splitter", 0, "ready", 1), ("shard-splitter", 1, "ready", 1),
                              ("shard-splitter", 1, "started", 1), ("shard-worker", 0, "ready", 1)]
