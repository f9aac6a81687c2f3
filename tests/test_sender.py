"""mysql-sender as supervisord runs it: `python -m app.sender --shard N` against the real API and
real shard servers, killed, stopped and restarted."""
from __future__ import annotations

import shutil
import signal
import time

import orjson
import pytest

from app import layout
from app.atomic import atomic_write
from tests import servers

SHARDS = 2


def prepared_rows(filename: str, shard: int, n: int, start: int = 0) -> list[dict]:
    rows = []
    for i in range(start, start + n):
        shop = 2 * (i % 97) + shard
        order = (1 << 62) + i * 7919 + shard
        rows.append({"event_key": f"1:{order}", "event_type": 1, "shop_id": shop, "user_id": i % 1000,
                     "timestamp": f"2026-11-26 22:{(i // 1000) % 60:02d}:{i % 60:02d}.{i % 1000:03d}",
                     "shard": shard, "order_id": order, "good_id": i % 50, "qty": 1 + i % 3,
                     "amount": f"{1 + i % 500}.{i % 100:02d}", "source_file": filename,
                     "payload": {"order_id": order, "user_id": i % 1000, "shop_id": shop, "good_id": i % 50,
                                 "qty": 1 + i % 3, "price_at_order": float(f"{1 + i % 500}.{i % 100:02d}")}})
    return rows


def write_prepared(shared, filename: str, shard: int, rows: list) -> None:
    with atomic_write(layout.worker_output(shared, filename, shard)) as f:
        for row in rows:
            f.write(row if isinstance(row, bytes) else orjson.dumps(row) + b"\n")


def ready_for_sender(client, filename: str, events: dict[int, int]) -> None:
    """Register the file and take it through splitter and worker as those stages would."""
    client.register(filename, sorted(events))
    client.ingest_done(filename)
    for shard, count in events.items():
        for stage in ("shard-splitter", "shard-worker"):
            client.start(stage, filename, shard, "test")
            client.done(stage, filename, shard, "test", events=count)


def task(client, filename: str, shard: int) -> dict:
    return next(s for s in client.file(filename)["shards"] if s["shard"] == shard)


def wait_sender(client, filename: str, shard: int, status: str = "done", timeout: float = 60.0) -> dict:
    def reached():
        t = task(client, filename, shard)
        if t["mysql_sender_status"] == "failed" and status != "failed":
            raise AssertionError(f"task failed: {t['last_error']}")
        return t if t["mysql_sender_status"] == status else None
    return servers.wait_until(reached, timeout, 0.05, what=f"{filename}/{shard} mysql-sender {status}")


def shard_query(url, sql, args=()):
    conn = servers.admin_connect(url.host, url.port, url.database)
    with conn.cursor() as cur:
        cur.execute(sql, args)
        rows = cur.fetchall()
    conn.close()
    return rows


def loaded(url, filename: str) -> tuple[int, int]:
    """(rows of the file in events, distinct event keys of it)."""
    try:
        return shard_query(url, "SELECT COUNT(*), COUNT(DISTINCT event_key) FROM events WHERE source_file=%s",
                           (filename,))[0]
    except Exception as exc:  # the schema is not there yet
        if "doesn't exist" in str(exc) or "Unknown database" in str(exc):
            return 0, 0
        raise


def start_sender(env: dict, shard: int, log_dir, tag: str = "") -> servers.Process:
    env = {**env, "WORKER_ID": f"test-sender-{shard}"}
    return servers.Process("app.sender", ["--shard", str(shard)], env,
                           log_dir / f"sender-{shard}{tag}.log").start()


def sender_env(api_env: dict, **extra) -> dict:
    return {**api_env, "LEASE_SECONDS": "5", "POLL_MAX_SECONDS": "0.1", "SENDER_CHUNK_ROWS": "1000",
            **{k: str(v) for k, v in extra.items()}}


def wait_mid_load(url, filename: str, rows: int, proc: servers.Process, timeout: float = 30.0) -> None:
    """Until the sender has sent at least `rows` rows of `filename` and not committed them (its
    uncommitted rows are visible to a READ UNCOMMITTED reader): it is mid-load."""
    def reached():
        if proc.proc.poll() is not None:
            raise AssertionError(f"sender exited:\n{proc.output()[-3000:]}")
        try:
            conn = servers.admin_connect(url.host, url.port, url.database)
        except Exception:
            return False
        try:
            with conn.cursor() as cur:
                cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ UNCOMMITTED")
                cur.execute("SELECT COUNT(*) FROM events WHERE source_file=%s", (filename,))
                return cur.fetchone()[0] >= rows
        except Exception as exc:  # the schema is not there yet
            if "doesn't exist" in str(exc):
                return False
            raise
        finally:
            conn.close()
    servers.wait_until(reached, timeout, 0.002, what=f"{rows} rows of {filename} sent")


def assert_rows(url, filename: str, rows: list[dict]) -> None:
    got = shard_query(url, "SELECT event_key, order_id, DATE_FORMAT(`timestamp`, '%%Y-%%m-%%d %%H:%%i:%%s.%%f'), "
                           "amount, shard FROM events WHERE source_file=%s ORDER BY id", (filename,))
    assert [(k, o, t[:23], str(a), s) for k, o, t, a, s in got] == [
        (r["event_key"], r["order_id"], r["timestamp"], r["amount"], r["shard"]) for r in rows]


def test_two_shard_databases_on_one_server(api, api_env, shared_dir, shard_dbs, tmp_path):
    client = api.client()
    files = {"20250101000001": {0: 40, 1: 25}, "20250101000002": {0: 0, 1: 30}}
    rows = {}
    for offset, (name, counts) in enumerate(files.items()):
        ready_for_sender(client, name, counts)
        for shard, n in counts.items():
            rows[name, shard] = prepared_rows(name, shard, n, start=1000 * offset)
            write_prepared(shared_dir, name, shard, rows[name, shard])
    env = sender_env(api_env)
    senders = [start_sender(env, shard, tmp_path) for shard in range(SHARDS)]
    try:
        for (name, shard), expected in rows.items():
            t = wait_sender(client, name, shard)
            # counts reconcile: what the worker accepted == what the sender loaded == rows in the shard
            assert t["stats"]["shard-worker"]["events"] == t["stats"]["mysql-sender"]["events"] == len(expected)
            assert loaded(shard_dbs[shard], name) == (len(expected), len(expected))
            assert t["stats"]["mysql-sender"]["loaded"] == len(expected)
            assert t["stats"]["mysql-sender"]["method"] == "load_data"
            assert_rows(shard_dbs[shard], name, expected)
        for shard in range(SHARDS):
            total = sum(len(r) for (_, s), r in rows.items() if s == shard)
            assert shard_query(shard_dbs[shard], "SELECT COUNT(*), SUM(shop_id %% 2 = %s) FROM events",
                               (shard,))[0] == (total, total)
            assert shard_query(shard_dbs[shard], "SELECT COUNT(*) FROM loaded_files")[0][0] == 2
    finally:
        for s in senders:
            assert s.stop() == 0, s.output()[-2000:]


def test_one_server_per_shard(api_factory, pipeline_db, shared_dir, private_mariadb, tmp_path):
    second = servers.new_private_mariadb()
    try:
        shard_dbs = [private_mariadb.url("shop_shard_0"), second.url("shop_shard_1")]
        env = servers.service_env(pipeline_db, shared_dir, servers.free_port(), shard_dbs)
        client = api_factory(env).client()
        name = "20250101000003"
        ready_for_sender(client, name, {0: 120, 1: 80})
        expected = {shard: prepared_rows(name, shard, n) for shard, n in ((0, 120), (1, 80))}
        for shard, rows in expected.items():
            write_prepared(shared_dir, name, shard, rows)
        senders = [start_sender(sender_env(env), shard, tmp_path) for shard in range(SHARDS)]
        try:
            for shard, rows in expected.items():
                assert wait_sender(client, name, shard)["stats"]["mysql-sender"]["events"] == len(rows)
                assert_rows(shard_dbs[shard], name, rows)
                # each server holds its own shard's database only
                other = (second if shard == 0 else private_mariadb).url("x")
                assert not shard_query(other.with_database("information_schema"),
                                       "SELECT 1 FROM SCHEMATA WHERE SCHEMA_NAME=%s", (f"shop_shard_{shard}",))
        finally:
            for s in senders:
                assert s.stop() == 0, s.output()[-2000:]
    finally:
        second.stop()
        shutil.rmtree(second.datadir, ignore_errors=True)


def test_kill_9_mid_load_then_restart_loads_exactly_once(api, api_env, shared_dir, shard_dbs, tmp_path):
    client = api.client()
    name, n = "20250101000004", 60_000
    ready_for_sender(client, name, {0: n})
    rows = prepared_rows(name, 0, n)
    write_prepared(shared_dir, name, 0, rows)
    env = sender_env(api_env)
    first = start_sender(env, 0, tmp_path, "-first")
    wait_mid_load(shard_dbs[0], name, 4000, first)
    first.kill_group(signal.SIGKILL)
    first.proc.wait(10)
    assert loaded(shard_dbs[0], name) == (0, 0)  # what was sent is not committed
    assert task(client, name, 0)["mysql_sender_status"] == "started"
    second = start_sender(env, 0, tmp_path, "-second")
    try:
        t = wait_sender(client, name, 0, timeout=90)
        assert loaded(shard_dbs[0], name) == (n, n)
        assert t["stats"]["mysql-sender"]["events"] == n
        assert shard_query(shard_dbs[0], "SELECT line_count, loaded_count FROM loaded_files") == ((n, n),)
    finally:
        assert second.stop() == 0, second.output()[-2000:]


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_shard_server_stopped_mid_load_catches_up_alone(api_factory, pipeline_db, shared_dir, private_mariadb,
                                                        tmp_path, how):
    """A clean shutdown, or a crash (kill -9, InnoDB recovery at the next start)."""
    shard_url = private_mariadb.url("shop_shard_0")
    env = servers.service_env(pipeline_db, shared_dir, servers.free_port(), [shard_url, shard_url])
    client = api_factory(env).client()
    name, n = "20250101000005", 40_000
    ready_for_sender(client, name, {0: n})
    write_prepared(shared_dir, name, 0, prepared_rows(name, 0, n))
    sender = start_sender(sender_env(env), 0, tmp_path)
    try:
        wait_mid_load(shard_url, name, 4000, sender)
        private_mariadb.stop() if how == "stop" else private_mariadb.kill()
        time.sleep(1.5)  # the sender finds the server gone, hands the task back and backs off
        assert task(client, name, 0)["mysql_sender_status"] in ("new", "started")
        private_mariadb.start()
        t = wait_sender(client, name, 0, timeout=90)
        assert loaded(shard_url, name) == (n, n)
        assert t["stats"]["mysql-sender"]["events"] == n
        assert sender.proc.poll() is None, "the sender must survive the outage, not crash"
        log = sender.output()
        assert "backing off" in log and "Traceback" not in log, log[-3000:]
    finally:
        assert sender.stop() == 0, sender.output()[-2000:]


def test_bad_prepared_files_fail_with_nothing_loaded(api, api_env, shared_dir, shard_dbs, tmp_path):
    client = api.client()
    malformed, wrong, good = "20250101000006", "20250101000007", "20250101000008"
    for name in (malformed, wrong, good):
        ready_for_sender(client, name, {0: 3000})
    rows = prepared_rows(malformed, 0, 3000)
    write_prepared(shared_dir, malformed, 0, rows[:2500] + [b'{"event_key": "1:1", "event_type": \n'] + rows[2500:])
    rows = prepared_rows(wrong, 0, 3000)
    rows[2700]["shop_id"] = 3
    write_prepared(shared_dir, wrong, 0, rows)
    write_prepared(shared_dir, good, 0, prepared_rows(good, 0, 3000, start=10_000))
    sender = start_sender(sender_env(api_env), 0, tmp_path)
    try:
        t = wait_sender(client, malformed, 0, "failed")
        assert t["last_error"].startswith("malformed prepared line 2501: not JSON"), t["last_error"]
        t = wait_sender(client, wrong, 0, "failed")
        assert t["last_error"].startswith("wrong shard: prepared line 2701: shop_id 3 belongs to shard 1"), t
        wait_sender(client, good, 0)
        assert loaded(shard_dbs[0], malformed) == loaded(shard_dbs[0], wrong) == (0, 0)
        assert loaded(shard_dbs[0], good) == (3000, 3000)
        assert shard_query(shard_dbs[0], "SELECT source_file FROM loaded_files") == ((good,),)
    finally:
        assert sender.stop() == 0, sender.output()[-2000:]


def test_missing_prepared_file_goes_back_to_the_worker(api, api_env, shared_dir, shard_dbs, tmp_path):
    client = api.client()
    name = "20250101000009"
    ready_for_sender(client, name, {0: 10})
    sender = start_sender(sender_env(api_env), 0, tmp_path)
    try:
        def rewound():
            t = task(client, name, 0)
            return t if t["shard_worker_status"] == "new" else None
        t = servers.wait_until(rewound, 30, 0.05, what="the task rewound to shard-worker")
        assert t["mysql_sender_status"] == "new"
        assert any(h["action"] == "rewind" and h["stage"] == "mysql-sender" for h in t["history"])
        # the worker writes the file again; the sender then loads it
        rows = prepared_rows(name, 0, 10)
        write_prepared(shared_dir, name, 0, rows)
        client.start("shard-worker", name, 0, "test")
        client.done("shard-worker", name, 0, "test", events=10)
        wait_sender(client, name, 0)
        assert_rows(shard_dbs[0], name, rows)
    finally:
        assert sender.stop() == 0, sender.output()[-2000:]


def test_stop_mid_load_hands_back_and_empties_only_its_folder(api, api_env, shared_dir, shard_dbs, tmp_path):
    client = api.client()
    name, n = "20250101000010", 60_000
    ready_for_sender(client, name, {0: n})
    write_prepared(shared_dir, name, 0, prepared_rows(name, 0, n))
    others = [layout.sender_dir(shared_dir, 1) / "keep.tsv", shared_dir / "mysql-sender" / "keep.txt",
              layout.worker_dir(shared_dir, 0) / "keep.txt"]
    for path in others:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("not the sender's")
    env = sender_env(api_env)
    sender = start_sender(env, 0, tmp_path)
    own = layout.sender_dir(shared_dir, 0)
    wait_mid_load(shard_dbs[0], name, 3000, sender)
    (own / "scratch.tsv").write_text("the sender's own")
    started = time.monotonic()
    assert sender.stop() == 0, sender.output()[-2000:]
    assert time.monotonic() - started < 10
    assert task(client, name, 0)["mysql_sender_status"] in ("new", "done")  # handed back, or committed first
    assert sorted(p.name for p in own.iterdir()) == ["activity.log"]
    assert all(p.read_text() == "not the sender's" for p in others)
    if task(client, name, 0)["mysql_sender_status"] == "new":
        assert loaded(shard_dbs[0], name) == (0, 0)
        assert "handing the task back" in sender.output()
    again = start_sender(env, 0, tmp_path, "-again")
    try:
        wait_sender(client, name, 0, timeout=90)
        assert loaded(shard_dbs[0], name) == (n, n)
    finally:
        assert again.stop() == 0, again.output()[-2000:]
