"""shard-splitter as it runs: `python -m app.splitter` subprocesses against the real API and
MariaDB: every line accounted for, crashes, SIGTERM, replicas, flat memory, missing sources."""
from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import orjson
import pytest

from app import layout
from app.atomic import TMP_MARK
from app.ingest.generator import Rates, generate_files
from tests import servers

FIXTURE = servers.ROOT.parent / "shared" / "fixtures" / "original-generator" / "20261126221520.event-ingest.txt"
if not FIXTURE.exists():
    FIXTURE = Path("/work/shared/fixtures/original-generator/20261126221520.event-ingest.txt")
ALL_CASES = Rates(duplicate=0.03, later_duplicate=0.03, return_first=0.03, return_first_later=0.02,
                  over_balance=0.02, malformed=0.04, unroutable_return=0.03, shopless_return=0.04)


@pytest.fixture
def pipeline(api_factory, pipeline_db, shared_dir, shard_dbs):
    """No test here waits for a lease to run out; a 30 s lease keeps a splitter starved of CPU
    on a loaded machine (its heartbeats late) from losing its task to the reaper mid-file."""
    env = servers.service_env(pipeline_db, shared_dir, servers.free_port(), shard_dbs,
                              LEASE_SECONDS="30", REAP_INTERVAL="0.2", POLL_MAX_SECONDS="0.1")
    return api_factory(env)


class Splitters:
    def __init__(self, api, log_dir: Path):
        self.api, self.log_dir, self.started = api, log_dir, []

    def start(self, name: str = "a", **env) -> servers.Process:
        env = {**self.api.process.env, "WORKER_ID": f"splitter-{name}", **{k: str(v) for k, v in env.items()}}
        proc = servers.Process("app.splitter", [], env, self.log_dir / f"splitter-{name}.log").start()
        self.started.append(proc)
        return proc


@pytest.fixture
def splitters(pipeline, tmp_path):
    s = Splitters(pipeline, tmp_path / "logs")
    yield s
    for proc in s.started:
        proc.stop()


def announce(client, names):
    for name in names:
        client.register(name)
        client.ingest_done(name)


def statuses(client, name) -> list[str]:
    return [s["shard_splitter_status"] for s in client.file(name)["shards"]]


def wait_status(client, names, status="done", timeout=60.0, proc=None):
    def ready():
        if proc is not None and proc.proc.poll() is not None:
            raise AssertionError(f"splitter exited:\n{proc.output()[-3000:]}")
        return all(statuses(client, n) == [status, status] for n in names)
    servers.wait_until(ready, timeout, 0.05, what=f"{names[:3]}... {status}")


def expected_split(paths: list[Path]) -> dict:
    """An independent oracle: each file's lines per shard, and rejected line numbers, with
    shop-less returns routed by any purchase seen earlier (files split in order)."""
    seen: dict[int, int] = {}
    out = {}
    for path in paths:
        shards = {0: b"", 1: b""}
        rejected = []
        for no, line in enumerate(path.read_bytes().splitlines(keepends=True), 1):
            try:
                event = orjson.loads(line)
                payload, etype = event["payload"], event["event_type"]
                assert isinstance(payload, dict) and etype in (0, 1, 2, 3, 4) and type(etype) is int
            except Exception:
                rejected.append(no)
                continue
            shop = payload.get("shop_id")
            if shop is None and etype == 3:
                shop = seen.get(payload.get("order_id"))
            if type(shop) is not int or shop < 0:
                rejected.append(no)
                continue
            if etype == 1:
                seen[payload["order_id"]] = shop
            shards[shop % 2] += line
        out[path.name.split(".")[0]] = (shards, rejected)
    return out


def actual_split(shared: Path, name: str):
    shards = {s: layout.splitter_output(shared, name, s).read_bytes() for s in (0, 1)}
    rej = layout.splitter_rejected(shared, name)
    records = [orjson.loads(x) for x in rej.read_bytes().splitlines()] if rej.exists() else []
    return shards, records


def test_fixture_through_the_daemon(pipeline, splitters, shared_dir):
    name = "20261126221520"
    events = layout.events_dir(shared_dir)
    events.mkdir()
    shutil.copy(FIXTURE, layout.source_file(shared_dir, name))
    client = pipeline.client()
    announce(client, [name])
    proc = splitters.start()
    wait_status(client, [name], proc=proc)
    shards, records = actual_split(shared_dir, name)
    (expected, rejected), = expected_split([FIXTURE]).values()
    assert shards == expected
    assert [r["line_no"] for r in records] == rejected and {r["reason"] for r in records} == {"unroutable"}
    info = {s["shard"]: s for s in client.file(name)["shards"]}
    for shard in (0, 1):
        stats = info[shard]["stats"]["shard-splitter"]
        assert stats["events"] == expected[shard].count(b"\n")
        assert stats["lines_in"] == 82
        assert stats["lines_by_shard"] == {"0": expected[0].count(b"\n"), "1": expected[1].count(b"\n")}
        assert stats["rejected"] == {"unroutable": len(rejected)}
    assert sum(stats["lines_by_shard"].values()) + stats["rejected_total"] == 82
    assert info[0]["stats"]["shard-splitter"]["rejected_file_written"] is True
    assert info[1]["stats"]["shard-splitter"]["rejected_file_written"] is False


def test_generated_files_with_every_case(pipeline, splitters, shared_dir):
    events = layout.events_dir(shared_dir)
    names = generate_files(events, 4, 400, seed=11, rates=ALL_CASES, start="20260301000000")
    kinds = {i.kind.split(":")[0] for i in names.truth}
    assert kinds >= {"duplicate", "later_duplicate", "return_first", "return_first_later", "over_balance",
                     "malformed", "unroutable_return", "shopless_return"}
    client = pipeline.client()
    announce(client, names)
    proc = splitters.start(CLAIM_LIMIT="2")
    wait_status(client, names, proc=proc)
    oracle = expected_split([layout.source_file(shared_dir, n) for n in names])
    for name in names:
        shards, records = actual_split(shared_dir, name)
        expected, rejected = oracle[name]
        assert shards == expected, name
        assert [r["line_no"] for r in records] == rejected, name
        reason = {r["line_no"]: r["reason"] for r in records}
        for case in (c for c in names.truth if c.filename == name):
            if case.kind.startswith("malformed") or case.kind == "unroutable_return":
                assert reason[case.line_no] == case.expect, case
            else:
                assert case.line_no not in reason, case
    routed = sum(client.file(n)["shards"][0]["stats"]["shard-splitter"]["returns_routed_by_order"] for n in names)
    assert routed == sum(c.kind == "shopless_return" for c in names.truth) > 0


def test_missing_source_fails_then_retry_gives_the_same_output(pipeline, splitters, shared_dir):
    name = "20261126221520"
    layout.events_dir(shared_dir).mkdir()
    client = pipeline.client()
    announce(client, [name])
    proc = splitters.start()
    wait_status(client, [name], "failed", proc=proc)
    assert {s["last_error"] for s in client.file(name)["shards"]} == {"source missing"}
    time.sleep(0.3)
    assert statuses(client, name) == ["failed", "failed"]          # no crash loop, no retry by itself
    shutil.copy(FIXTURE, layout.source_file(shared_dir, name))
    for shard in (0, 1):
        client.retry("shard-splitter", name, shard)
    wait_status(client, [name], proc=proc)
    first = actual_split(shared_dir, name)
    (expected, rejected), = expected_split([FIXTURE]).values()
    assert first[0] == expected
    # Split again from scratch (output lost, task rewound by the worker): identical bytes.
    proc.stop()
    assert not layout.splitter_output(shared_dir, name, 0).exists()    # folder emptied at stop
    for shard in (0, 1):
        client.rewind("shard-worker", name, shard, "test", "splitter output lost")
    proc = splitters.start("b")
    wait_status(client, [name], proc=proc)
    assert actual_split(shared_dir, name) == first


def big_file(shared: Path, name: str, copies: int) -> Path:
    path = layout.source_file(shared, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(FIXTURE.read_bytes() * copies)
    return path


def wait_for_temp_output(folder: Path, proc, timeout=30.0):
    def found():
        if proc.proc.poll() is not None:
            raise AssertionError(f"splitter exited:\n{proc.output()[-3000:]}")
        return [p for p in folder.glob(f"*.shard-splitter.*{TMP_MARK}*")]
    return servers.wait_until(found, timeout, 0.002, what="a temporary shard file")


def test_crash_mid_write_leaves_nothing_complete_and_recovers(pipeline, splitters, shared_dir):
    name = "20260401000000"
    big_file(shared_dir, name, 4000)                               # 328,000 lines
    client = pipeline.client()
    announce(client, [name])
    proc = splitters.start()
    wait_for_temp_output(layout.splitter_dir(shared_dir), proc)
    proc.kill_group(signal.SIGKILL)
    proc.proc.wait(10)
    folder = layout.splitter_dir(shared_dir)
    assert not [p for p in folder.glob("*.shard-splitter.*.txt")]    # nothing looks complete
    assert [p for p in folder.iterdir() if TMP_MARK in p.name]     # only the dead process's temp files
    assert statuses(client, name) == ["started", "started"]
    proc = splitters.start()                                       # same WORKER_ID: resumes its tasks
    wait_status(client, [name], proc=proc)
    assert not [p for p in folder.iterdir() if TMP_MARK in p.name]
    shards, records = actual_split(shared_dir, name)
    assert shards[0].count(b"\n") == 33 * 4000 and shards[1].count(b"\n") == 33 * 4000
    assert len(records) == 16 * 4000


def test_sigterm_mid_file_hands_the_task_back(pipeline, splitters, shared_dir):
    name = "20260401000001"
    big_file(shared_dir, name, 4000)
    client = pipeline.client()
    announce(client, [name])
    proc = splitters.start()
    folder = layout.splitter_dir(shared_dir)
    wait_for_temp_output(folder, proc)
    proc.signal(signal.SIGTERM)
    assert proc.proc.wait(20) == 0
    assert [p.name for p in folder.iterdir()] == ["activity.log"]
    assert statuses(client, name) == ["new", "new"]
    history = client.file(name)["shards"][0]["history"]
    assert [h["action"] for h in history if h["stage"] == "shard-splitter"] == ["claim", "release"]
    proc = splitters.start("b")
    wait_status(client, [name], proc=proc)
    assert actual_split(shared_dir, name)[0][0].count(b"\n") == 33 * 4000


def test_two_replicas_never_do_a_task_twice(pipeline, splitters, shared_dir, pipeline_db):
    names = generate_files(layout.events_dir(shared_dir), 12, 300, seed=5, start="20260501000000")
    client = pipeline.client()
    a = splitters.start("a", CLAIM_LIMIT="1")
    b = splitters.start("b", CLAIM_LIMIT="1")
    servers.wait_until(lambda: all("starting as" in p.output() for p in (a, b)), 30, what="both replicas up")
    announce(client, names)
    wait_status(client, names, proc=a)
    assert b.proc.poll() is None
    conn = servers.admin_connect(database=pipeline_db.database)
    with conn.cursor() as cur:
        cur.execute("SELECT filename, shard, SUM(to_status='done') FROM pipeline_transitions "
                    "WHERE stage='shard-splitter' GROUP BY filename, shard")
        rows = cur.fetchall()
        cur.execute("SELECT DISTINCT actor FROM pipeline_transitions WHERE stage='shard-splitter'")
        actors = {r[0] for r in cur.fetchall()}
    conn.close()
    assert len(rows) == 24 and all(r[2] == 1 for r in rows), rows
    assert actors == {"splitter-a", "splitter-b"}
    oracle = expected_split([layout.source_file(shared_dir, n) for n in names])
    for name in names:
        assert actual_split(shared_dir, name)[0] == oracle[name][0]


def peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_memory_does_not_grow_with_file_size(pipeline, splitters, shared_dir):
    events = layout.events_dir(shared_dir)
    small = generate_files(events, 1, 5_000, seed=3, start="20260601000000")
    large = generate_files(events, 1, 200_000, seed=4, start="20260602000000")
    client = pipeline.client()
    peaks = {}
    for label, names in (("small", small), ("large", large)):
        proc = splitters.start(label)
        announce(client, names)
        wait_status(client, names, proc=proc)
        peaks[label] = peak_rss_kb(proc.proc.pid)
        proc.stop()
    assert peaks["large"] <= 1.25 * peaks["small"], peaks
