"""No double claims: 32 threads race for the same tasks through the real API; each task is won
exactly once. The shard worker's ordered claim never takes a later file of a shard while an
earlier one is pending or held by someone else."""
from __future__ import annotations

import random
import threading
import time
from collections import Counter

import pytest
import requests

from tests.test_api_contract import BASE, Http, module_api, new_name

THREADS = 32
BUSY_RETRIES = 20


def post(session: requests.Session, url: str, body: dict) -> requests.Response:
    """A POST as the daemons' client sends it: a 503 that says `"retry": true` (lock contention
    the API's own deadlock retries did not get past; nothing of the request was committed) is
    sent again, a bounded number of times. Every other answer is the test's to judge: with 32
    threads racing, a request now and then meets six deadlocks in a row (one CI run in ~10)."""
    for _ in range(BUSY_RETRIES):
        resp = session.post(url, json=body, timeout=60)
        if resp.status_code != 503 or resp.json().get("retry") is not True:
            return resp
        time.sleep(random.uniform(0.005, 0.05))
    return resp


@pytest.fixture
def fresh(tmp_path_factory):
    """An API over an empty database: the queues hold only this test's tasks."""
    with module_api(tmp_path_factory) as server:
        yield server


def race(n: int, body) -> list:
    """Run body(i, session) in n threads released at once; their results, in thread order."""
    gate = threading.Barrier(n)
    results: list = [None] * n
    errors: list = []

    def run(i: int) -> None:
        session = requests.Session()
        gate.wait()
        try:
            results[i] = body(i, session)
        except Exception as exc:  # reported below: a thread must not die silently
            errors.append(repr(exc))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    return results


def transitions(server, action: str, stage: str = "shard-splitter") -> Counter:
    conn = server_db(server)
    with conn.cursor() as cur:
        cur.execute("SELECT filename, shard FROM pipeline_transitions WHERE action=%s AND stage=%s", (action, stage))
        counted = Counter(cur.fetchall())
    conn.close()
    return counted


def server_db(server):
    from tests import servers
    return servers.admin_connect(database=server.process.env["MYSQL_PIPELINE_URL"].rsplit("/", 1)[1])


def test_32_threads_racing_start_on_the_same_tasks_win_each_exactly_once(fresh):
    http = Http(fresh)
    tasks = [(name, shard) for name in [http.registered() for _ in range(8)] for shard in (0, 1)]
    url = f"{http.root}{BASE}/stages/shard-splitter/start"

    def contend(i: int, session: requests.Session) -> list:
        order = tasks[:]
        random.Random(i).shuffle(order)
        outcomes = []
        for name, shard in order:
            resp = post(session, url, {"filename": name, "shard": shard, "worker": f"t{i}"})
            assert resp.status_code in (200, 409), resp.text
            if resp.status_code == 409:
                assert resp.json()["status"] == "started"
            outcomes.append(((name, shard), resp.status_code))
        return outcomes

    wins = Counter(task for result in race(THREADS, contend) for task, code in result if code == 200)
    assert wins == Counter({task: 1 for task in tasks})
    assert transitions(fresh, "start") == Counter({task: 1 for task in tasks})
    owners = {(i["filename"], i["shard"]): i["owner"]
              for i in http.ok("GET", "/tasks/shard-splitter", {"status": "started", "limit": 1000})["items"]}
    assert set(owners) == set(tasks) and all(o.startswith("t") for o in owners.values())


def test_32_threads_racing_claims_take_every_task_exactly_once(fresh):
    http = Http(fresh)
    tasks = {(name, shard) for name in [http.registered() for _ in range(40)] for shard in (0, 1)}
    url = f"{http.root}{BASE}/queues/shard-splitter/claim"
    done_url = f"{http.root}{BASE}/stages/shard-splitter/done"

    def claim_until_empty(i: int, session: requests.Session) -> list:
        rng = random.Random(i)
        got = []
        while True:
            resp = post(session, url, {"limit": rng.randint(1, 3), "worker": f"c{i}"})
            assert resp.status_code == 200, resp.text
            items = resp.json()["items"]
            if not items:
                return got
            assert not any(x["resumed"] for x in items)  # each is finished before the next claim
            for x in items:
                done = post(session, done_url, {"filename": x["filename"], "shard": x["shard"], "worker": f"c{i}"})
                assert done.status_code == 200 and done.json()["changed"], done.text
                got.append((x["filename"], x["shard"]))

    claimed = [task for result in race(THREADS, claim_until_empty) for task in result]
    assert Counter(claimed) == Counter({task: 1 for task in tasks})
    assert transitions(fresh, "claim") == Counter({task: 1 for task in tasks})
    assert http.ok("GET", "/queues/shard-splitter")["items"] == []
    assert transitions(fresh, "done") == Counter({task: 1 for task in tasks})


def test_ordered_claim_keeps_each_shards_registration_order(fresh):
    http = Http(fresh)
    stage, claim = "shard-worker", "/queues/shard-worker/claim"
    writing = http.registered(shards=[0], ingest_done=False)  # still being written: blocks nothing
    f1, f2, f3, f4, f5 = (http.registered(shards=[0]) for _ in range(5))
    other_shard = http.registered(shards=[1])
    for name in (f1, f2, f4, f5):
        http.finish(name, 0, "shard-splitter")
    http.finish(other_shard, 1, "shard-splitter")

    def take(worker: str, limit: int = 10, shard: int = 0) -> list[str]:
        items = http.ok("POST", claim, {"limit": limit, "shard": shard, "worker": worker})["items"]
        return [i["filename"] for i in items]

    assert take("A") == [f1, f2]                   # f3 is not split yet: nothing past it
    assert take("B") == []                         # A holds the shard's files
    assert take("B", shard=1) == [other_shard]     # other shards are independent
    for name in (f1, f2):
        http.ok("POST", f"/stages/{stage}/done", {"filename": name, "shard": 0, "worker": "A"})
    assert take("B") == []                         # f3 still waits for the splitter
    http.finish(f3, 0, "shard-splitter")
    assert take("B", limit=1) == [f3]
    assert take("A") == []
    http.ok("POST", f"/stages/{stage}/fail", {"filename": f3, "shard": 0, "worker": "B", "error": "x"})
    assert take("A", limit=1) == [f4]              # a failed file is out of the way
    http.ok("POST", f"/stages/{stage}/release", {"filename": f4, "shard": 0, "worker": "A"})
    assert take("B") == [f4, f5]                   # handed back: still first in line
    assert writing not in take("B")


def test_splitter_failure_lets_later_files_pass(fresh):
    http = Http(fresh)
    first, second = http.registered(shards=[0]), http.registered(shards=[0])
    http.finish(second, 0, "shard-splitter")
    assert http.ok("POST", "/queues/shard-worker/claim", {"shard": 0, "worker": "A"})["items"] == []
    http.ok("POST", "/stages/shard-splitter/fail", {"filename": first, "shard": 0, "error": "unreadable"})
    items = http.ok("POST", "/queues/shard-worker/claim", {"shard": 0, "worker": "A"})["items"]
    assert [i["filename"] for i in items] == [second]


def test_racing_ordered_claims_never_overlap_or_reorder(fresh):
    http = Http(fresh)
    names = [http.registered(shards=[0]) for _ in range(24)]
    for name in names:
        http.finish(name, 0, "shard-splitter")
    url = http.root + BASE

    def work(i: int, session: requests.Session) -> int:
        done = 0
        idle = 0
        while idle < 40:
            resp = post(session, f"{url}/queues/shard-worker/claim", {"limit": 2, "shard": 0, "worker": f"o{i}"})
            assert resp.status_code == 200, resp.text
            items = resp.json()["items"]
            if not items:
                idle += 1
                continue
            idle = 0
            for item in items:
                r = post(session, f"{url}/stages/shard-worker/done",
                         {"filename": item["filename"], "shard": 0, "worker": f"o{i}"})
                assert r.status_code == 200, r.text
                done += 1
        return done

    assert sum(race(8, work)) == len(names)
    conn = server_db(fresh)
    with conn.cursor() as cur:
        cur.execute("SELECT t.tracking_id, t.action, t.actor FROM pipeline_transitions t "
                    "WHERE t.stage='shard-worker' ORDER BY t.id")
        log = cur.fetchall()
    conn.close()
    holding: dict[int, str] = {}
    last_claimed = 0
    for tracking_id, action, actor in log:
        if action == "claim":
            assert set(holding.values()) <= {actor}, (tracking_id, actor, holding)
            assert tracking_id > last_claimed
            last_claimed = tracking_id
            holding[tracking_id] = actor
        elif action == "done":
            holding.pop(tracking_id)
    assert not holding and last_claimed > 0


def test_register_racing_itself_creates_once(fresh):
    name = new_name()
    url = f"http://127.0.0.1:{fresh.port}{BASE}/files/register"

    def register(i: int, session: requests.Session) -> bool:
        resp = post(session, url, {"filename": name, "shards": [0, 1]})
        assert resp.status_code == 200, resp.text
        return resp.json()["created"]

    assert sorted(race(16, register)) == [False] * 15 + [True]
    assert transitions(fresh, "register", "event-ingest") == Counter({(name, 0): 1, (name, 1): 1})
