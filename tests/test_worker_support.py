"""What the shard-worker tests share: event lines, feeding splitter output through the real API,
running the real worker (in a thread with the shared daemon loop, or as a subprocess), and
reading its outputs and its state. No tests here."""
from __future__ import annotations

import random
import struct
import threading
from datetime import datetime, timedelta
from pathlib import Path

import orjson
import pytest

from app import layout
from app.config import Settings
from app.daemon import Daemon
from app.worker.ledger import ALL_BALANCES
from app.worker.stage import WorkerStage
from tests import servers

T0 = datetime(2026, 3, 1, 12, 0, 0)
SPLITTER = "test-splitter"


def ts(ms: int) -> str:
    """A timestamp `ms` milliseconds after T0."""
    return (T0 + timedelta(milliseconds=ms)).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def line(etype: int, at: int, **payload) -> bytes:
    return orjson.dumps({"event_type": etype, "payload": payload, "saved_at": ts(0), "timestamp": ts(at)})


def restock(at, shop, good, delta, sub="restock"):
    return line(0, at, shop_id=shop, good_id=good, delta_count=delta, reason="test", sub_event_type=sub)


def purchase(at, order, user, shop, good=1, qty=1, price=10.0):
    return line(1, at, order_id=order, user_id=user, shop_id=shop, good_id=good, qty=qty, price_at_order=price)


def price_change(at, shop, good, price):
    return line(2, at, shop_id=shop, good_id=good, new_price=price)


def refund(at, order, user, good=1, qty=1, amount=10.0, shop=None):
    payload = dict(order_id=order, user_id=user, good_id=good, qty=qty, refund_amount=amount)
    if shop is not None:
        payload["shop_id"] = shop
    return line(3, at, **payload)


def shop_status(at, shop, active):
    return line(4, at, shop_id=shop, active=active)


def mixed(n: int, seed: int, shard: int = 0, start_ms: int = 0) -> list[bytes]:
    """A deterministic shard file hitting most rules: duplicates, overspending, stock going
    negative, inactive shops, returns before their purchase, orphans, malformed lines."""
    rng = random.Random(seed)
    shops = [s for s in range(20) if s % 2 == shard]
    out: list[bytes] = []
    bought: list[tuple[int, int, int, float]] = []
    later: dict[int, bytes] = {}
    for i in range(n):
        at = start_ms + i * 7
        if i in later:
            out.append(later.pop(i))
            continue
        r = rng.random()
        shop, good = rng.choice(shops), rng.randint(1, 4)
        if r < 0.01:
            out.append(b'{"event_type":1,"payload":')
        elif r < 0.04 and out:
            out.append(rng.choice(out[-50:]))
        elif r < 0.25:
            out.append(restock(at, shop, good, rng.choice([5, 3, -2, -4, 1])))
        elif r < 0.60:
            order = rng.getrandbits(63)
            user = rng.randint(1, 30)
            price = round(rng.uniform(1, 120), 2)
            bought.append((order, user, shop, price))
            out.append(purchase(at, order, user, shop, good=1, price=price))
        elif r < 0.68:
            out.append(price_change(at, shop, good, rng.choice([9.99, 12.5, 0])))
        elif r < 0.85:
            kind = rng.random()
            if kind < 0.6 and bought:
                order, user, shop, price = bought.pop(rng.randrange(len(bought)))
                out.append(refund(at, order, user, amount=price, shop=shop if rng.random() < 0.5 else None))
            elif kind < 0.85:
                order, user = rng.getrandbits(63), rng.randint(1, 30)
                out.append(refund(at, order, user, amount=5.0, shop=shop))
                later[i + rng.randint(1, 30)] = purchase(at + 5, order, user, shop, price=5.0)
            else:
                out.append(refund(at, rng.getrandbits(63), rng.randint(1, 30), amount=3.0, shop=shop))
        else:
            out.append(shop_status(at, shop, rng.random() > 0.2))
    return out


class WorkerThread:
    """The real worker stage under the real daemon loop, in a thread of the test process."""

    def __init__(self, settings: Settings, shard: int):
        self.stage = WorkerStage(settings, shard)
        self.daemon = Daemon(self.stage, settings)
        self.thread = threading.Thread(target=self.daemon.run, name=f"worker-{shard}", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.daemon.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "the worker did not stop"


class Pipeline:
    """One test's pipeline: its API and pipeline database, its SHARED_DIR, its workers."""

    def __init__(self, api: servers.ApiServer, pipeline_db, shared: Path, logs: Path):
        self.api = api
        self.client = api.client()
        self.db_url = pipeline_db
        self.shared = shared
        self.logs = logs
        self.env = {**api.process.env, "SHARED_DIR": str(shared), "LEASE_SECONDS": "2", "POLL_MAX_SECONDS": "0.05"}
        self.threads: list[WorkerThread] = []
        self.processes: list[servers.Process] = []

    def settings(self, **extra) -> Settings:
        return Settings.from_env({**self.env, **{k: str(v) for k, v in extra.items()}})

    def worker(self, shard: int = 0, **extra) -> WorkerThread:
        w = WorkerThread(self.settings(**extra), shard)
        self.threads.append(w)
        return w

    def worker_process(self, shard: int = 0, **extra) -> servers.Process:
        env = {**self.env, **{k: str(v) for k, v in extra.items()}}
        p = servers.Process("app.worker", ["--shard", str(shard)], env,
                            self.logs / f"worker-{shard}-{len(self.processes)}.log").start()
        self.processes.append(p)
        return p

    def close(self) -> None:
        for w in self.threads:
            if w.thread.is_alive():
                w.stop()
        for p in self.processes:
            p.kill_group()

    # -- feeding the worker -----------------------------------------------------------------

    def write_split(self, filename: str, shard: int, lines: list[bytes]) -> Path:
        path = layout.splitter_output(self.shared, filename, shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"".join(x + b"\n" for x in lines))
        return path

    def feed(self, filename: str, shards: dict[int, list[bytes]]) -> None:
        """Register a file and play the splitter: write each shard's file, mark it done."""
        self.client.register(filename, [0, 1])
        self.client.ingest_done(filename)
        for shard in (0, 1):
            lines = shards.get(shard, [])
            self.write_split(filename, shard, lines)
            self.client.start("shard-splitter", filename, shard, SPLITTER)
            self.client.done("shard-splitter", filename, shard, SPLITTER, events=len(lines))

    def task(self, filename: str, shard: int) -> dict:
        return next(s for s in self.client.file(filename)["shards"] if s["shard"] == shard)

    def wait_done(self, filename: str, shard: int = 0, timeout: float = 60.0) -> dict:
        def done():
            t = self.task(filename, shard)
            if t["shard_worker_status"] == "failed":
                raise AssertionError(f"worker failed {filename}/{shard}: {t['last_error']}")
            return t if t["shard_worker_status"] == "done" else None
        return servers.wait_until(done, timeout, 0.05, f"worker done with {filename} shard {shard}")

    def stats(self, filename: str, shard: int = 0) -> dict:
        return self.task(filename, shard)["stats"]["shard-worker"]

    # -- what the worker wrote and knows ------------------------------------------------------

    def prepared_bytes(self, filename: str, shard: int = 0) -> bytes:
        return layout.worker_output(self.shared, filename, shard).read_bytes()

    def rejected_bytes(self, filename: str, shard: int = 0) -> bytes:
        return layout.worker_rejected(self.shared, filename, shard).read_bytes()

    def prepared(self, filename: str, shard: int = 0) -> list[dict]:
        return [orjson.loads(x) for x in self.prepared_bytes(filename, shard).splitlines()]

    def rejected(self, filename: str, shard: int = 0) -> list[dict]:
        return [orjson.loads(x) for x in self.rejected_bytes(filename, shard).splitlines()]

    def sql(self, query: str, args=()) -> list[tuple]:
        return servers.query(self.db_url, query, args)

    def balance(self, user: int):
        rows = self.sql(f"SELECT balance FROM ({ALL_BALANCES}) b WHERE user_id=%s", (user,))
        return rows[0][0] if rows else None

    def state(self) -> dict:
        """The worker's persistent state, without ids and clock columns."""
        return {
            "balances": self.sql(f"SELECT user_id, balance FROM ({ALL_BALANCES}) b ORDER BY user_id"),
            "orders": self.sql("SELECT order_id, shard, shop_id, buyer, qty, amount, state, line FROM worker_orders "
                               "ORDER BY order_id"),
            "stock": self.sql("SELECT shop_id, good_id, count FROM worker_stock ORDER BY shop_id, good_id"),
            "shops": self.sql("SELECT shop_id, active FROM worker_shops ORDER BY shop_id"),
            "seen": sorted(self.sql("SELECT shard, bucket, hash FROM worker_seen")
                           + [(shard, bucket, h) for shard, bucket, packed in
                              self.sql("SELECT shard, bucket, hashes FROM worker_seen_sealed")
                              for (h,) in struct.iter_unpack(">q", packed)]),
            "return_keys": self.sql("SELECT shard, order_id, bucket FROM worker_return_keys ORDER BY shard, order_id"),
            "holds": self.sql("SELECT f.filename, h.line, h.order_id, h.state, h.code, r.filename, h.resolved_line, "
                              "h.resolved_seq FROM worker_holds h JOIN worker_files f ON f.id=h.file_id "
                              "LEFT JOIN worker_files r ON r.id=h.resolved_file_id ORDER BY f.filename, h.line"),
            "batches": self.sql("SELECT f.filename, b.first_line, b.line_count, b.codes FROM worker_batches b "
                                "JOIN worker_files f ON f.id=b.file_id ORDER BY f.filename, b.first_line"),
        }


WORKER_TABLES = ("worker_shards", "worker_files", "worker_batches", "worker_seen", "worker_seen_sealed",
                 "worker_balances", "worker_balances_young", "worker_ledger",
                 "worker_orders", "worker_stock", "worker_shops", "worker_holds", "worker_return_keys")


@pytest.fixture(scope="module")
def module_api(tmp_path_factory):
    """One API over one database for a module's tests (starting one costs seconds); each test
    starts from empty tables (see `pipeline`)."""
    name = servers.unique_name("wrk")
    conn = servers.admin_connect()
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}`")
    conn.close()
    url = servers.server_url(name)
    tmp = tmp_path_factory.mktemp("worker-api")
    server = servers.start_api(servers.service_env(url, tmp / "shared", servers.free_port()), tmp / "logs")
    yield server, url
    server.process.stop()
    conn = servers.admin_connect()
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    conn.close()


def reset(url) -> None:
    conn = servers.admin_connect(url.host, url.port, url.database)
    with conn.cursor() as cur:
        cur.execute("DELETE FROM pipeline_transitions")
        cur.execute("DELETE FROM pipeline_tracking")
        cur.execute("DELETE FROM pipeline_claim_lock")
        for table in WORKER_TABLES:
            cur.execute(f"DROP TABLE IF EXISTS {table}")
    conn.close()


@pytest.fixture
def pipeline(module_api, tmp_path):
    server, url = module_api
    reset(url)
    shared = tmp_path / "shared"
    shared.mkdir()
    p = Pipeline(server, url, shared, tmp_path / "logs")
    yield p
    p.close()


def reasons(rejected: list[dict]) -> list[str]:
    return [r["reason"] for r in rejected]

