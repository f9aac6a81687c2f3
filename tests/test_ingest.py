"""event-ingest: the contract's line format, reproducibility, coherent data, registration that
survives the API being down, one-shot and import modes (real API, real subprocesses)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from decimal import Decimal
from pathlib import Path

import orjson
import pytest

from app import layout
from app.ingest.generator import Rates, generate_files
from tests import servers

FIXTURE = servers.ROOT.parent / "shared" / "fixtures" / "original-generator" / "20261126221520.event-ingest.txt"
if not FIXTURE.exists():
    FIXTURE = Path("/work/shared/fixtures/original-generator/20261126221520.event-ingest.txt")
TIME = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}$")
ALL_CASES = Rates(duplicate=0.03, later_duplicate=0.03, return_first=0.03, return_first_later=0.02,
                  over_balance=0.02, malformed=0.03, unroutable_return=0.03, shopless_return=0.03)


def fixture_shapes() -> dict[int, list[tuple[str, type]]]:
    shapes = {}
    for line in FIXTURE.read_bytes().splitlines():
        event = orjson.loads(line)
        shapes.setdefault(event["event_type"], [(k, type(v)) for k, v in event["payload"].items()])
    return shapes


def read_events(directory: Path, names) -> list[tuple[str, int, bytes]]:
    return [(n, no, line) for n in names
            for no, line in enumerate(layout.source_file(directory.parent, n).read_bytes().splitlines(), 1)]


def test_format_is_the_fixtures(tmp_path):
    events = tmp_path / "events"
    names = generate_files(events, 3, 600, seed=1, rates=ALL_CASES, start="20260101120000")
    assert names == ["20260101120000", "20260101120001", "20260101120002"]
    broken = {(c.filename, c.line_no) for c in names.truth if c.kind.startswith("malformed")}
    shapes = fixture_shapes()
    assert set(shapes) == {0, 1, 2, 3, 4}
    seen_types, shopless = set(), 0
    for name, no, line in read_events(events, names):
        if (name, no) in broken:
            continue
        event = orjson.loads(line)
        assert list(event) == ["event_type", "payload", "saved_at", "timestamp"]
        etype, payload = event["event_type"], event["payload"]
        seen_types.add(etype)
        shape = [(k, type(v)) for k, v in payload.items()]
        if etype == 3 and "shop_id" in payload:
            shape.remove(("shop_id", int))
            assert list(payload)[2] == "shop_id"
        elif etype == 3:
            shopless += 1
        assert shape == shapes[etype], (etype, payload)
        assert TIME.match(event["saved_at"]) and TIME.match(event["timestamp"])
        assert event["timestamp"] >= event["saved_at"] or etype == 1
        if etype in (1, 3):
            assert 2**53 < payload["order_id"] < 2**63
    assert seen_types == {0, 1, 2, 3, 4} and shopless > 0
    for name in names:
        saved = {orjson.loads(line)["saved_at"] for n, no, line in read_events(events, [name])
                 if (n, no) not in broken}
        assert saved == {f"{name[:4]}-{name[4:6]}-{name[6:8]} {name[8:10]}:{name[10:12]}:{name[12:]}.000"}


def test_reproducible_with_a_seed(tmp_path):
    a = generate_files(tmp_path / "a", 3, 300, seed=42, rates=ALL_CASES, start="20260101000000")
    b = generate_files(tmp_path / "b", 3, 300, seed=42, rates=ALL_CASES, start="20260101000000")
    c = generate_files(tmp_path / "c", 3, 300, seed=43, rates=ALL_CASES, start="20260101000000")
    files = lambda d, names: [(tmp_path / d / f"{n}.event-ingest.txt").read_bytes() for n in names]  # noqa: E731
    assert files("a", a) == files("b", b)
    assert [i.as_dict() for i in a.truth] == [i.as_dict() for i in b.truth]
    assert files("a", a) != files("c", c)


def test_data_are_coherent_and_faults_are_where_the_truth_says(tmp_path):
    """Replay the files in written order: everything not injected as a fault satisfies the
    worker's rules, whatever order the shards are applied in."""
    events = tmp_path / "events"
    names = generate_files(events, 5, 800, seed=9, rates=ALL_CASES, start="20260101000000")
    truth = {(c.filename, c.line_no): c for c in names.truth}
    opening = Decimal("1000.00")
    purchases, spent, stock, active, returned = {}, defaultdict(Decimal), defaultdict(int), {}, set()
    pending_returns = {}
    for name, no, line in read_events(events, names):
        case = truth.get((name, no))
        kind = case.kind.split(":")[0] if case else None
        if kind in ("malformed", "duplicate", "later_duplicate", "unroutable_return"):
            if kind == "later_duplicate":
                assert orjson.loads(line)["payload"]["order_id"] in purchases
            continue
        event = orjson.loads(line)
        etype, p = event["event_type"], event["payload"]
        if kind == "over_balance":
            assert Decimal(str(p["price_at_order"])) > 2 * opening
            continue
        if etype == 0:
            stock[(p["shop_id"], p["good_id"])] += p["delta_count"]
            assert stock[(p["shop_id"], p["good_id"])] >= 0
            assert (p["sub_event_type"] == "restock") == (p["delta_count"] > 0)
        elif etype == 1:
            assert p["order_id"] not in purchases
            assert active.get(p["shop_id"], True), "purchase in an inactive shop"
            stock[(p["shop_id"], p["good_id"])] -= p["qty"]
            assert stock[(p["shop_id"], p["good_id"])] >= 0
            spent[p["user_id"]] += Decimal(str(p["price_at_order"]))
            assert spent[p["user_id"]] <= opening, "debits beyond the opening balance"
            purchases[p["order_id"]] = p
            if p["order_id"] in pending_returns:
                assert pending_returns.pop(p["order_id"]) in ("return_first", "return_first_later")
        elif etype == 2:
            assert p["new_price"] > 0
        elif etype == 3:
            assert p["order_id"] not in returned
            returned.add(p["order_id"])
            if p["order_id"] not in purchases:
                pending_returns[p["order_id"]] = kind
                continue
            buy = purchases[p["order_id"]]
            assert (buy["user_id"], buy["good_id"]) == (p["user_id"], p["good_id"])
            assert p.get("shop_id", buy["shop_id"]) == buy["shop_id"]
            assert ("shop_id" in p) == (kind != "shopless_return")
            assert p["qty"] <= buy["qty"]
            assert Decimal(str(p["refund_amount"])) <= Decimal(str(buy["price_at_order"]))
        else:
            active[p["shop_id"]] = p["active"]
    assert not pending_returns, "a return whose purchase never came"
    assert len(returned) > 50 and len(purchases) > 300


def ingest(env: dict, args: list[str], log: Path) -> servers.Process:
    return servers.Process("app.ingest", args, env, log).start()


def api_view(client, name):
    info = client.file(name)
    return [s["event_ingest_status"] for s in info["shards"]]


def test_one_shot_writes_and_registers(api, tmp_path, shared_dir):
    env = {**api.process.env}
    out = subprocess.run([sys.executable, "-m", "app.ingest", "--files", "3", "--events", "40", "--seed", "7",
                          "--truth", str(tmp_path / "truth.jsonl")],
                         cwd=servers.ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr + out.stdout
    names = re.findall(r"^(\d{14})$", out.stdout, re.M)
    assert len(names) == 3 and names == sorted(set(names))
    client = api.client()
    for name in names:
        path = layout.source_file(shared_dir, name)
        assert path.read_bytes().count(b"\n") == 40
        assert api_view(client, name) == ["done", "done"]
        ingest_done = [h for h in client.file(name)["shards"][0]["history"] if h["stage"] == "event-ingest"
                       and h["to"] == "done"]
        assert ingest_done[0]["events"] == 40
    assert (tmp_path / "truth.jsonl").exists()
    assert not [p for p in (shared_dir / "events").iterdir() if ".tmp-" in p.name]


def test_nothing_lost_while_the_api_is_down(api_factory, api_env, tmp_path, shared_dir):
    """Files written before a crash (never registered) and while the API is down are all
    registered and done once it is up; a dead run's temporary file is removed."""
    env = {**api_env, "INGEST_INTERVAL": "0.2", "EVENTS_PER_FILE": "20", "INGEST_SEED": "3"}
    crashed = subprocess.run([sys.executable, "-m", "app.ingest", "--files", "2", "--events", "10",
                              "--no-register", "--start", "20250101000000"],
                             cwd=servers.ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert crashed.returncode == 0, crashed.stderr
    events = shared_dir / "events"
    dead_tmp = events / f"20250101000009.event-ingest.txt.tmp-{2**22 + 12345}"
    dead_tmp.write_bytes(b'{"event_type":0,"payload"')
    proc = ingest(env, [], tmp_path / "ingest.log")
    try:
        servers.wait_until(lambda: len(list(events.glob("*.event-ingest.txt"))) >= 3, 20, what="a file with API down")
        assert proc.proc.poll() is None
        api = api_factory(api_env)
        client = api.client()

        def all_registered():
            names = [p.name.split(".")[0] for p in events.glob("*.event-ingest.txt")]
            return len(names) >= 6 and all(api_view(client, n) == ["done", "done"] for n in names)
        servers.wait_until(all_registered, 30, 0.1, what="every file registered")
        proc.signal(signal.SIGTERM)
        assert proc.proc.wait(20) == 0
    finally:
        proc.stop()
    names = sorted(p.name.split(".")[0] for p in events.glob("*.event-ingest.txt"))
    assert names[:2] == ["20250101000000", "20250101000001"]
    assert all(api_view(client, n) == ["done", "done"] for n in names)
    assert not dead_tmp.exists()
    assert not [p for p in events.iterdir() if ".tmp-" in p.name]
    assert [p.name for p in (shared_dir / "event-ingest").iterdir()] == ["activity.log"]


def test_import_copies_and_registers(api, tmp_path, shared_dir):
    env = {**api.process.env}
    run = lambda *paths: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "app.ingest", "--import", *map(str, paths)], cwd=servers.ROOT, env=env,
        capture_output=True, text=True, timeout=60)
    out = run(FIXTURE)
    assert out.returncode == 0, out.stdout + out.stderr
    name = "20261126221520"
    assert layout.source_file(shared_dir, name).read_bytes() == FIXTURE.read_bytes()
    client = api.client()
    assert api_view(client, name) == ["done", "done"]
    assert run(FIXTURE).returncode == 0                        # again: idempotent
    other = tmp_path / "in" / f"{name}.event-ingest.txt"
    other.parent.mkdir()
    other.write_bytes(b"different\n")
    out = run(other)
    assert out.returncode == 2 and "different content" in out.stdout
    bad = tmp_path / "in" / "events.json"
    bad.write_bytes(b"{}\n")
    out = run(bad)
    assert out.returncode == 2 and "must be named" in out.stdout


def test_import_logs_one_line_per_file(api, tmp_path, shared_dir):
    """A file imported and registered is one line of the log (the copy and the registration),
    not two: the importer's per-file cost counts its log records."""
    src = tmp_path / "in"
    src.mkdir()
    for name in ("20250102000000", "20250102000001"):
        (src / f"{name}.event-ingest.txt").write_bytes(FIXTURE.read_bytes())
    out = subprocess.run([sys.executable, "-m", "app.ingest", "--import", str(src)], cwd=servers.ROOT,
                         env={**api.process.env}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = FIXTURE.read_bytes().count(b"\n")
    per_file = [line for line in out.stdout.splitlines() if "20250102" in line]
    assert [line.split(": ", 1)[1] for line in per_file] == [
        f"imported {src / name}.event-ingest.txt, registered {name} ({lines} events)"
        for name in ("20250102000000", "20250102000001")], out.stdout
    activity = (shared_dir / "event-ingest" / "activity.log").read_text()
    assert sum("20250102000000" in line for line in activity.splitlines()) == 1

@pytest.mark.parametrize("variable,value", [("INGEST_RATE_NOPE", "0.1"), ("INGEST_RATE_DUPLICATE", "2")])
def test_bad_rate_settings_are_named(tmp_path, variable, value):
    env = {**os.environ, "SHARED_DIR": str(tmp_path), variable: value}
    out = subprocess.run([sys.executable, "-m", "app.ingest", "--files", "1", "--no-register"],
                         cwd=servers.ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "INGEST_RATE_" in out.stderr + out.stdout


def test_start_finishes_stale_registered_files_only(api, shared_dir):
    """A file registered but never marked done (a crash between the calls, or the original
    generator's lost best-effort call) is marked done at start once it is stale; a recent one
    may still be being written by the original generator and is left alone."""
    events = shared_dir / "events"
    stale, recent = generate_files(events, 2, 5, seed=1, start="20250101000000")
    client = api.client()
    client.register(stale)
    client.register(recent)
    old = time.time() - 120
    os.utime(layout.source_file(shared_dir, stale), (old, old))
    out = subprocess.run([sys.executable, "-m", "app.ingest", "--files", "1", "--events", "5"],
                         cwd=servers.ROOT, env={**api.process.env}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert api_view(client, stale) == ["done", "done"]
    assert api_view(client, recent) == ["started", "started"]
