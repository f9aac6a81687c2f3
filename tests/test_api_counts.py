"""The task counts the triggers keep (migration 0004) are exact: after concurrent random
transitions through the real API, API worker processes SIGKILLed mid-request and the reaper
returning expired leases, they equal a full GROUP BY of the tracking table, and so does what
/metrics/summary reports. An existing table is counted when the migration arrives."""
from __future__ import annotations

import os
import random
import signal
import threading
import time

import requests

from app import db
from app.api.queries import SQL_COUNTS_SCANNED, SQL_TASK_COUNTS
from app.stages import STAGES, WORK_STAGES
from bench import procstat
from tests import servers
from tests.test_api_concurrency import server_db
from tests.test_api_contract import BASE, module_api, new_name

ACTIONS = ("start", "done", "fail", "retry", "release", "rewind", "heartbeat")


def kept_and_scanned(conn) -> tuple[dict, dict]:
    with conn.cursor() as cur:
        cur.execute(SQL_TASK_COUNTS)
        kept = {(s, h, st): int(n) for s, h, st, n in cur.fetchall()}
        cur.execute(SQL_COUNTS_SCANNED)
        scanned = {(s, h, st): int(n) for s, h, st, n in cur.fetchall() if n}
    conn.commit()
    return kept, scanned


def churn(root: str, seed: int, names: list[str], stop: threading.Event, lock: threading.Lock) -> int:
    """Random requests, legal or not, until `stop`; how many got an answer."""
    rng = random.Random(seed)
    session = requests.Session()
    worker = f"test/churn-{seed % 3}"
    answered = 0
    while not stop.is_set():
        try:
            roll = rng.random()
            if roll < 0.08 or not names:
                name = new_name()
                session.post(f"{root}/files/register", json={"filename": name}, timeout=10)
                session.post(f"{root}/stages/event-ingest/done", json={"filename": name}, timeout=10)
                with lock:
                    names.append(name)
            elif roll < 0.4:
                stage = rng.choice(WORK_STAGES)
                session.post(f"{root}/queues/{stage}/claim", timeout=10,
                             json={"worker": worker, "limit": rng.randint(1, 3), "shard": rng.randint(0, 1)})
            else:
                with lock:
                    name = rng.choice(names)
                session.post(f"{root}/stages/{rng.choice(WORK_STAGES)}/{rng.choice(ACTIONS)}", timeout=10,
                             json={"filename": name, "shard": rng.randint(0, 1), "worker": worker,
                                   "error": "churn"})
            answered += 1
        except requests.RequestException:
            pass  # a worker was killed under this request: the client sees a broken connection
    return answered


def wait_for_reaper(conn, timeout: float = 30) -> None:
    """Until no task holds a lease: the reaper has returned (or failed) every one a churn left
    started (each read in a fresh snapshot)."""
    def leases_left() -> int:
        with conn.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM pipeline_tracking WHERE lease_expires_at IS NOT NULL")
            n = cur.fetchone()[0]
        conn.commit()
        return n
    servers.wait_until(lambda: leases_left() == 0, timeout=timeout, what="the reaper to return every lease")


def test_counts_equal_a_full_group_by_after_concurrent_transitions_kills_and_reaping(tmp_path_factory):
    with module_api(tmp_path_factory, LEASE_SECONDS="0.5", REAP_INTERVAL="0.2", MAX_ATTEMPTS="3") as server:
        root = f"http://127.0.0.1:{server.port}{BASE}"
        names: list[str] = []
        lock, stop = threading.Lock(), threading.Event()
        answered: list[int] = []
        threads = [threading.Thread(target=lambda i=i: answered.append(churn(root, i, names, stop, lock)))
                   for i in range(12)]
        for t in threads:
            t.start()
        master = server.process.proc.pid
        killed = 0
        try:
            for _ in range(4):
                time.sleep(1.5)
                workers = procstat.children(master)
                assert workers, "gunicorn has no worker processes"
                os.kill(random.choice(workers), signal.SIGKILL)   # mid-request: 12 clients keep it busy
                killed += 1
            time.sleep(1.5)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert killed == 4 and sum(answered) > 200
        conn = server_db(server)
        try:
            # Leases of 0.5 s: the reaper returns (or fails) every task the churn left started.
            wait_for_reaper(conn)
            with conn.cursor() as cur:
                cur.execute("SELECT action, COUNT(*) FROM pipeline_transitions GROUP BY action")
                actions = dict(cur.fetchall())
            conn.commit()
            assert {"claim", "done", "reap", "register"} <= set(actions), actions
            kept, scanned = kept_and_scanned(conn)
        finally:
            conn.close()
        assert kept == scanned
        summary = requests.get(f"{root}/metrics/summary", timeout=10).json()
        assert "by_stage" in summary, (summary, server.process.output()[-3000:])
        for stage in STAGES:
            for status, n in summary["by_stage"][stage.column].items():
                assert n == sum(v for (s, _, st), v in scanned.items() if s == stage and st == status)
        for stage in WORK_STAGES:
            assert summary["stages"][stage.column]["ready"] == sum(
                v for (s, _, st), v in scanned.items() if s == stage and st == "ready")
        assert summary["total"] == sum(v for (s, _, st), v in scanned.items() if s == "event-ingest") >= len(names) * 2


def test_summary_is_fresh_after_every_transition(tmp_path_factory):
    """No cached answer: a claimed task shows as started at once, and as done right after."""
    with module_api(tmp_path_factory) as server:
        root = f"http://127.0.0.1:{server.port}{BASE}"
        for _ in range(3):
            name = new_name()
            requests.post(f"{root}/files/register", json={"filename": name, "shards": [0]}, timeout=10)
            requests.post(f"{root}/stages/event-ingest/done", json={"filename": name}, timeout=10)
            got = requests.post(f"{root}/queues/shard-splitter/claim", json={"worker": "w"}, timeout=10).json()
            assert [i["filename"] for i in got["items"]] == [name]
            assert requests.get(f"{root}/metrics/summary", timeout=10).json()["by_stage"]["shard_splitter"][
                "started"] == 1
            requests.post(f"{root}/stages/shard-splitter/done", json={"filename": name, "shard": 0, "worker": "w"},
                          timeout=10)
            assert requests.get(f"{root}/metrics/summary", timeout=10).json()["by_stage"]["shard_splitter"][
                "started"] == 0


def test_the_migration_counts_the_rows_already_there(make_database):
    url = make_database("counts")
    conn = db.connect(url)
    try:
        migrations = db.migrations("tracking")
        with conn.cursor() as cur:
            for m in migrations[:3]:
                for statement in m.statements():
                    cur.execute(statement)
            rng = random.Random(4)
            statuses = ("new", "started", "done", "failed")
            cur.executemany("INSERT INTO pipeline_tracking (filename, shard, event_ingest_status, shard_splitter_status,"
                            " shard_worker_status, mysql_sender_status) VALUES (%s,%s,%s,%s,%s,%s)",
                            [(f"2025{i:010d}", i % 3, *(rng.choice(statuses) for _ in range(4))) for i in range(500)])
        conn.commit()
        assert [m.version for m in db.migrate(conn, "tracking")] == [1, 2, 3, 4, 5, 6, 7]  # 1-3 adopted, 4 to 7 run
        kept, scanned = kept_and_scanned(conn)
        assert kept == scanned and sum(v for (s, _, st), v in kept.items() if s == "event-ingest") == 500
        with conn.cursor() as cur:   # and the triggers keep them from there
            cur.execute("UPDATE pipeline_tracking SET shard_worker_status='done' WHERE shard_splitter_status='done'")
            cur.execute("DELETE FROM pipeline_tracking WHERE shard=2")
            cur.execute("UPDATE pipeline_tracking SET shard=1 WHERE shard=0 AND mysql_sender_status='new'")
        conn.commit()
        kept, scanned = kept_and_scanned(conn)
        assert kept == scanned
    finally:
        conn.close()


def test_every_single_status_move_from_every_state_is_counted_exactly(make_database):
    """The triggers' short paths (migration 0005: registration, ingest done, claim, done) and
    their general statement (everything else) against a scan: rows registered in each of the
    256 combinations of statuses, each moved from there to every status of every column (and
    back), then two columns at once and across shards."""
    url = make_database("moves")
    # Each pass of 512 moves is one transaction (the commits below; with autocommit each UPDATE
    # was a commit and a log flush of its own) sent 128 statements a round trip, each still its
    # own statement with its triggers fired row by row.
    conn = db.connect(url, multi_statements=True)
    try:
        db.migrate(conn, "tracking")
        statuses = ("new", "started", "done", "failed")
        columns = [s.status_column for s in STAGES]
        combos = [(a, b, c, d) for a in statuses for b in statuses for c in statuses for d in statuses]
        with conn.cursor() as cur:
            cur.executemany(f"INSERT INTO pipeline_tracking (filename, shard, {', '.join(columns)}) "
                            "VALUES (%s,%s,%s,%s,%s,%s)",
                            [(f"2025{i:010d}", i % 2, *combo) for i, combo in enumerate(combos)])
            cur.execute("SELECT id FROM pipeline_tracking ORDER BY id")
            ids = [r[0] for r in cur.fetchall()]
        conn.commit()
        kept, scanned = kept_and_scanned(conn)
        assert kept == scanned
        conn.autocommit(False)
        rng = random.Random(5)
        with conn.cursor() as cur:
            for column in columns:
                for status in statuses:   # from each of the 256 states, this column to this status
                    moves = []
                    for row, combo in zip(ids, combos):
                        moves.append(cur.mogrify(f"UPDATE pipeline_tracking SET {column}=%s WHERE id=%s",
                                                 (status, row)))
                        moves.append(cur.mogrify(f"UPDATE pipeline_tracking SET "
                                                 f"{', '.join(f'{c}=%s' for c in columns)} WHERE id=%s",
                                                 (*combo, row)))
                    for at in range(0, len(moves), 128):
                        cur.execute(";\n".join(moves[at:at + 128]))
                        while cur.nextset():
                            pass
                    conn.commit()
                    kept, scanned = kept_and_scanned(conn)
                    assert kept == scanned, (column, status)
            for row in ids:
                a, b = rng.sample(columns, 2)
                cur.execute(f"UPDATE pipeline_tracking SET {a}=%s, {b}=%s WHERE id=%s",
                            (rng.choice(statuses), rng.choice(statuses), row))
                cur.execute("UPDATE pipeline_tracking SET shard=%s, shard_worker_status=%s WHERE id=%s",
                            (rng.randrange(3), rng.choice(statuses), rng.choice(ids)))
        conn.commit()
        kept, scanned = kept_and_scanned(conn)
        assert kept == scanned
    finally:
        conn.close()
