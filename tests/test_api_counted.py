"""The task counts (`pipeline_task_counts`, kept by the triggers of migrations 0004-0006) stay
exact through every path that moves a task, driven at once by two API
instances (two processes each) on one database: registration (alone, complete, again), ingest's
done, claims, dones (alone, with a claim, in batches, with and without a claim, with a task that
cannot be done in the batch, without a worker name), fail, retry (one, all), release, rewind,
heartbeats, the reaper's returns of expired leases, the pruning of the history, an operator's
hand-made UPDATEs, and API processes killed mid-request. Every few tenths of a second, and at the
end, the counts are compared with a GROUP BY of the tracking table in one consistent snapshot:
a path that forgot its changes, or counted them twice, shows as a difference (a guard for any
change to how the counts are kept, e.g. the API writing its own, which was built, measured and
taken back: docs/performance.md, sixth round)."""
from __future__ import annotations

import os
import random
import signal
import threading
import time

import pymysql
import requests

from app import db
from app.api.queries import SQL_COUNTS_SCANNED, SQL_TASK_COUNTS
from app.stages import STAGES, WORK_STAGES
from bench import procstat
from tests import servers
from tests.test_api_contract import BASE, new_name
from tests.test_api_counts import wait_for_reaper

ACTIONS = ("start", "done", "fail", "retry", "release", "rewind", "heartbeat")


def snapshot(conn) -> tuple[dict, dict]:
    """The kept counts and a scan of the table, read in one snapshot (both are committed by
    the same transactions, so they agree at every moment, not only when the API is idle)."""
    with conn.cursor() as cur:
        cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        cur.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT")
        cur.execute(SQL_TASK_COUNTS)
        kept = {(s, h, st): int(n) for s, h, st, n in cur.fetchall()}
        cur.execute(SQL_COUNTS_SCANNED)
        scanned = {(s, h, st): int(n) for s, h, st, n in cur.fetchall() if n}
    conn.commit()
    return kept, scanned


def known(names: list[str], lock: threading.Lock, rng: random.Random) -> str:
    with lock:
        return rng.choice(names)


def churn(roots: list[str], seed: int, names: list[str], stop: threading.Event, lock: threading.Lock) -> dict:
    """Random requests over every path, legal or not, until `stop`: how many of each kind."""
    rng = random.Random(seed)
    session = requests.Session()
    worker = f"test/counted-{seed % 3}"
    done: dict[str, int] = {}
    while not stop.is_set():
        root = rng.choice(roots)
        roll = rng.random()
        try:
            if roll < 0.10 or len(names) < 4:
                kind = rng.choice(("register", "register-done", "register-again"))
                name = known(names, lock, rng) if kind == "register-again" and names else new_name()
                shards = rng.choice(([0, 1], [0], [1]))
                if kind == "register":
                    session.post(f"{root}/files/register", json={"filename": name, "shards": shards}, timeout=10)
                    session.post(f"{root}/stages/event-ingest/done", json={"filename": name}, timeout=10)
                else:
                    session.post(f"{root}/files/register", timeout=10,
                                 json={"filename": name, "shards": shards, "done": True, "events": 5})
                with lock:
                    names.append(name)
            elif roll < 0.30:
                kind = "claim"
                stage = rng.choice(WORK_STAGES)
                session.post(f"{root}/queues/{stage}/claim", timeout=10,
                             json={"worker": worker, "limit": rng.randint(1, 3), "shard": rng.randint(0, 1)})
            elif roll < 0.55:
                kind = rng.choice(("done-batch", "done-batch-claim"))
                stage = rng.choice(WORK_STAGES)
                items = [{"filename": known(names, lock, rng), "shard": rng.randint(0, 1), "events": 3,
                          "stats": {"rejected": {"duplicate": 1}}} for _ in range(rng.randint(1, 4))]
                body = {"worker": worker, "items": items}
                if kind == "done-batch-claim":
                    body["claim"] = {"limit": rng.randint(1, 4), "shard": rng.randint(0, 1)}
                session.post(f"{root}/stages/{stage}/done-batch", json=body, timeout=10)
            elif roll < 0.62:
                kind = "done-claim"
                stage = rng.choice(WORK_STAGES)
                session.post(f"{root}/stages/{stage}/done", timeout=10,
                             json={"filename": known(names, lock, rng), "shard": rng.randint(0, 1), "worker": worker,
                                   "claim": {"limit": rng.randint(1, 3), "shard": rng.randint(0, 1)}})
            elif roll < 0.64:
                kind = "retry-all"
                session.post(f"{root}/stages/{rng.choice(WORK_STAGES)}/retry", json={"all": True}, timeout=10)
            else:
                kind = rng.choice(ACTIONS)
                body = {"filename": known(names, lock, rng), "shard": rng.randint(0, 1), "error": "churn"}
                if kind == "heartbeat" or rng.random() < 0.8:
                    body["worker"] = worker
                session.post(f"{root}/stages/{rng.choice(WORK_STAGES)}/{kind}", json=body, timeout=10)
            done[kind] = done.get(kind, 0) + 1
        except requests.RequestException:
            pass  # an API process was killed under this request
    return done


def operator(url, stop: threading.Event, seed: int) -> int:
    """An operator's hand-made UPDATEs (one status of one row, anything to anything): the
    triggers count them."""
    rng = random.Random(seed)
    conn = db.connect(url)
    moves = 0
    try:
        while not stop.wait(0.05):
            column = rng.choice(STAGES).status_column
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT MAX(id) FROM pipeline_tracking")
                    top = cur.fetchone()[0] or 0
                    cur.execute(f"UPDATE pipeline_tracking SET {column}=%s WHERE id=%s",
                                (rng.choice(("new", "started", "done", "failed")), rng.randint(1, max(top, 1))))
                conn.commit()
                moves += 1
            except pymysql.err.OperationalError:
                conn.rollback()   # a lock wait or deadlock with the API: the operator tries again
    finally:
        conn.close()
    return moves


def test_counts_stay_exact_through_every_path_at_once(make_database, tmp_path):
    database = make_database("counted")
    env = dict(LEASE_SECONDS="0.5", REAP_INTERVAL="0.2", MAX_ATTEMPTS="3", TRANSITIONS_WINDOW="1", API_WORKERS="2")
    apis = []
    try:
        for n in range(2):
            port = servers.free_port()
            apis.append(servers.start_api(servers.service_env(database, tmp_path / f"shared{n}", port, **env),
                                          tmp_path / f"logs{n}"))
        roots = [f"http://127.0.0.1:{api.port}{BASE}" for api in apis]
        names: list[str] = []
        lock, stop = threading.Lock(), threading.Event()
        kinds: list[dict] = []
        threads = [threading.Thread(target=lambda i=i: kinds.append(churn(roots, i, names, stop, lock)))
                   for i in range(10)]
        moves: list[int] = []
        threads.append(threading.Thread(target=lambda: moves.append(operator(database, stop, 99))))
        for t in threads:
            t.start()
        conn = db.connect(database)
        checks = killed = 0
        try:
            deadline = time.monotonic() + 12
            while time.monotonic() < deadline:
                time.sleep(0.3)
                kept, scanned = snapshot(conn)
                assert kept == scanned, {k: (kept.get(k), scanned.get(k)) for k in kept.keys() | scanned.keys()
                                         if kept.get(k) != scanned.get(k)}
                checks += 1
                workers = procstat.children(apis[killed % 2].process.proc.pid)
                if checks % 12 == 0 and killed < 2 and workers:   # mid-request: ten clients keep them busy
                    os.kill(random.choice(workers), signal.SIGKILL)
                    killed += 1
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        total: dict[str, int] = {}
        for k in kinds:
            for kind, n in k.items():
                total[kind] = total.get(kind, 0) + n
        assert len(kinds) == 10 and min(total.values()) >= 5 and moves[0] >= 20, (total, moves)

        wait_for_reaper(conn)
        with conn.cursor() as cur:
            # The history is pruned as it goes (a window of 1 s); its outcome counts are not.
            cur.execute("SELECT action, SUM(n) FROM pipeline_transition_counts GROUP BY action")
            actions = {a: int(n) for a, n in cur.fetchall()}
            cur.execute("SELECT COUNT(*) FROM pipeline_transitions")
            history = cur.fetchone()[0]
        conn.commit()
        # (A release needs the churn to name the holder of a started task: sent, not always taken.)
        assert {"done", "reap", "fail", "retry", "rewind"} <= set(actions), actions
        assert history < sum(actions.values()), "nothing was pruned"
        kept, scanned = snapshot(conn)
        conn.close()
        assert kept == scanned and checks >= 20 and killed == 2
        assert sum(v for (s, _, st), v in scanned.items() if s == "event-ingest") >= len(set(names))
    finally:
        for api in apis:
            api.process.stop()
