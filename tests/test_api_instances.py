"""Several pipeline-apid instances over one database, behind a comma-separated PIPELINE_URL:
daemons fail over when one dies, and claims, transitions and the reaper stay correct with two
real API processes racing (each reaps on its own thread and on claims)."""
from __future__ import annotations

import random
import threading
import time
from collections import Counter

import pytest
import requests

from app.client import PipelineClient
from app.config import ConfigError, Settings
from tests import servers

LEASE = 1.0


def two_apis(api_factory, pipeline_db, shared_dir, shard_dbs, **extra):
    env = servers.service_env(pipeline_db, shared_dir, servers.free_port(), shard_dbs, **extra)
    a = api_factory(env)
    b = api_factory({**env, "PIPELINE_API_PORT": str(servers.free_port())})
    return a, b


def test_pipeline_url_takes_several_instances_and_checks_each():
    s = Settings.from_env({"PIPELINE_URL": "http://a:1/api/v1/pipeline/, http://b:2/api/v1/pipeline"})
    assert s.pipeline_url == "http://a:1/api/v1/pipeline,http://b:2/api/v1/pipeline"
    with pytest.raises(ConfigError, match="PIPELINE_URL"):
        Settings.from_env({"PIPELINE_URL": "http://a:1/x,ftp://b"})


def test_a_client_fails_over_to_the_next_instance_when_one_dies(api_factory, pipeline_db, shared_dir, shard_dbs):
    a, b = two_apis(api_factory, pipeline_db, shared_dir, shard_dbs)
    dead = f"http://127.0.0.1:{servers.free_port()}/api/v1/pipeline"
    # Nothing listens at the first address: the request goes on to the next one at once, even
    # for a caller that allows no retry at all (the dashboard's polls).
    client = PipelineClient(f"{dead},{a.base},{b.base}", max_wait=0)
    assert client.register("20260101000001")["created"] is True
    assert client.base == a.base
    a.process.kill_group()
    a.process.proc.wait(10)
    began = time.monotonic()
    assert client.register("20260101000002")["created"] is True
    failover = time.monotonic() - began
    assert client.base == b.base
    assert client.file("20260101000001")["filename"] == "20260101000001"
    print(f"failover to the second instance took {failover:.3f}s")


def test_two_instances_racing_claims_and_reaping_hand_each_task_out_once_at_a_time(
        api_factory, pipeline_db, shared_dir, shard_dbs):
    a, b = two_apis(api_factory, pipeline_db, shared_dir, shard_dbs,
                    LEASE_SECONDS=str(LEASE), REAP_INTERVAL="0.1", MAX_ATTEMPTS="1000")
    setup = a.client()
    names = [f"202601010{n:05d}" for n in range(12)]
    for name in names:
        setup.register(name)
        setup.ingest_done(name, events=1)
    tasks = {(name, shard) for name in names for shard in (0, 1)}
    stage = "shard-splitter"
    done: Counter = Counter()
    holding: dict = {}
    overlaps: list = []
    errors: list = []
    lock = threading.Lock()
    gate = threading.Barrier(8)

    def worker(i: int) -> None:
        # Alternate instances per worker; a third of the claims are abandoned (the worker
        # "dies" holding them), so both instances' reapers hand them back while others claim.
        client = PipelineClient(b.base if i % 2 else a.base, max_wait=10)
        rng = random.Random(i)
        life = 0
        me = f"host-{i % 3}/shard-splitter-{i}.{life}"
        gate.wait()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with lock:
                if sum(done.values()) >= len(tasks):
                    return
            try:
                got = client.claim(stage, me, limit=1)
            except Exception as exc:
                errors.append(repr(exc))
                return
            if not got:
                time.sleep(0.05)
                continue
            task = got[0].key
            with lock:
                other = holding.get(task)
                if other and other[0] != me and time.monotonic() < other[1]:
                    overlaps.append((task, other[0], me))
                holding[task] = (me, time.monotonic() + LEASE * 0.5)
            if rng.random() < 0.33:  # abandoned: only the lease's expiry gives it back
                life += 1              # (a claim by the same owner would get it back at once)
                me = f"host-{i % 3}/shard-splitter-{i}.{life}"
                continue
            try:
                client.done(stage, task[0], task[1], worker=me)
            except Exception as exc:  # a 409 here would mean the task was taken from a live owner
                errors.append(repr(exc))
                return
            with lock:
                done[task] += 1
                holding.pop(task, None)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors[:3]
    assert not overlaps, overlaps[:3]
    assert done == Counter({t: 1 for t in tasks})
    for server in (a, b):
        summary = requests.get(f"{server.base}/metrics/summary", timeout=10).json()
        assert summary["by_stage"]["shard_splitter"]["done"] == len(tasks)
        assert summary["by_stage"]["shard_splitter"]["started"] == 0
    conn = servers.admin_connect(database=pipeline_db.database)
    with conn.cursor() as cur:
        cur.execute("SELECT filename, shard FROM pipeline_transitions WHERE action='done' AND stage=%s", (stage,))
        assert Counter(cur.fetchall()) == Counter({t: 1 for t in tasks})
        cur.execute("SELECT COUNT(*) FROM pipeline_transitions WHERE action='reap' AND stage=%s", (stage,))
        reaped = cur.fetchone()[0]
    conn.close()
    assert reaped > 0  # the abandoned claims came back through the reapers


def test_hosts_lists_each_host_with_its_programs_from_owner_ids(api_factory, pipeline_db, shared_dir, shard_dbs):
    a, b = two_apis(api_factory, pipeline_db, shared_dir, shard_dbs)
    ca, cb = a.client(), b.client()
    for n in range(3):
        ca.register(f"2026010200000{n}")
        ca.ingest_done(f"2026010200000{n}", events=1, worker="host-i/event-ingest")
    [t0] = ca.claim("shard-splitter", "host-a/shard-splitter-0")
    ca.done("shard-splitter", t0.filename, t0.shard, worker="host-a/shard-splitter-0")
    [held] = cb.claim("shard-splitter", "host-b/shard-splitter-0")
    cb.heartbeat("shard-splitter", held.filename, held.shard, "host-b/shard-splitter-0")
    for client in (ca, cb):  # every instance answers the same, from the database
        view = client.hosts(minutes=5)
        hosts = {h["host"]: h for h in view["hosts"]}
        assert set(hosts) == {"host-a", "host-b", "host-i"}
        assert [(p["program"], p["done"], p["holding"]) for p in hosts["host-a"]["programs"]] == [
            ("shard-splitter-0", 1, 0)]
        [bp] = hosts["host-b"]["programs"]
        assert (bp["program"], bp["holding"], bp["lease_expired"]) == ("shard-splitter-0", 1, False)
        assert bp["lease_until"] and hosts["host-b"]["holding"] == 1
        assert [p["stages"] for p in hosts["host-i"]["programs"]] == [["event-ingest"]]
        assert all(h["last_seen"] for h in hosts.values())
