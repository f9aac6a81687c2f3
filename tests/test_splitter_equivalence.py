"""The splitter's fast path changes no output byte and no rejection reason: split_file (real
MariaDB index) against a plain line-by-line reference of the routing rules, on the fixture,
on generated files, and on hostile lines (every field of an event replaced by every kind of
value, broken JSON, bad UTF-8, deep nesting, long lines, CR, a missing final newline), with
the default buffers and with tiny ones (many segments, lookups, purchases out of memory)."""
from __future__ import annotations

import base64
import json
import random
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest

from app import layout
from app.ingest.generator import generate_files
from app.splitter import order_index, stage
from app.splitter.order_index import OrderIndex
from app.splitter.stage import split_file
from tests.test_splitter_routing import FIXTURE, write_source

LIMIT = 4096
MAX_ID = 2**63 - 1


class _P(msgspec.Struct):
    shop_id: Any = None
    order_id: Any = None


class _E(msgspec.Struct):
    event_type: Any = None
    payload: _P | None = None


_LOOSE = msgspec.json.Decoder(_E)


def reference(files: list[tuple[str, bytes]], shard_count: int = 2):
    """Per file: {shard: bytes}, [(line_no, reason)] by the rules of docs/splitter.md, one
    line at a time, every purchase remembered (nothing pruned, files split in order)."""
    earlier: dict[int, int] = {}       # order -> shop of its first purchase in the earliest file
    out = {}
    for name, data in files:
        lines = lines_of(data)
        shards = {s: b"" for s in range(shard_count)}
        rejected = []
        own: dict[int, int] = {}
        for no, raw in enumerate(lines, 1):
            line = raw + b"\n"       # a last line without one gets it
            if len(raw) > LIMIT:
                rejected.append((no, "too_large"))
                continue
            reason, shard = None, None
            try:
                ev = _LOOSE.decode(line)
                line.decode("utf-8")
            except (msgspec.DecodeError, UnicodeDecodeError):
                reason = "empty_line" if not line.strip() else "malformed_json"
            except RecursionError:
                reason = "malformed_json"
            else:
                p, t = ev.payload, ev.event_type
                in_range = lambda v: type(v) is int and -MAX_ID - 1 <= v <= MAX_ID  # noqa: E731
                if p is None:
                    reason = "malformed_json"
                elif type(t) is not int or t not in (0, 1, 2, 3, 4):
                    reason = "unknown_event_type"
                elif type(p.shop_id) is int:
                    if 0 <= p.shop_id <= MAX_ID:
                        shard = p.shop_id % shard_count
                        if t == 1 and in_range(p.order_id):
                            own[p.order_id] = p.shop_id
                    else:
                        reason = "shop_id_out_of_range"
                elif p.shop_id is None and t == 3:
                    shop = own.get(p.order_id, earlier.get(p.order_id)) if in_range(p.order_id) else None
                    if shop is None:
                        reason = "unroutable"
                    else:
                        shard = shop % shard_count
                elif p.shop_id is None:
                    reason = "missing_shop_id"
                else:
                    reason = "non_integer_shop_id"
            if reason:
                rejected.append((no, reason))
            else:
                shards[shard] += line
        for order, shop in own.items():
            earlier.setdefault(order, first_purchase(lines, order, shop))
        out[name] = shards, rejected
    return out


def lines_of(data: bytes) -> list[bytes]:
    """The lines without their newline, a BOM at the very start left out."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines.pop()
    return lines


def first_purchase(lines, order, last_shop):
    """The shop of a file's first purchase of `order` (own[] kept the nearest, i.e. the last)."""
    for raw in lines:
        try:
            ev = _LOOSE.decode(raw)
        except Exception:
            continue
        p = ev.payload
        if (p is not None and ev.event_type == 1 and type(ev.event_type) is int and p.order_id == order
                and type(p.order_id) is int and type(p.shop_id) is int and 0 <= p.shop_id <= MAX_ID):
            return p.shop_id
    return last_shop


VALUES = [0, 1, 3, 4, 7, -1, 2**63 - 1, 2**63, -2**63, -2**63 - 1, 2**64, 1.0, 1.5, 1e400, True, False, None,
          "1", "", [], [1], {}, {"a": 1}]


def hostile_lines(rng: random.Random, count: int) -> list[bytes]:
    """Lines of every kind: events with one or two fields replaced, removed or duplicated,
    broken JSON, bad bytes; purchases and shop-less returns of a few orders, to route."""
    orders = [2**60 + i for i in range(40)] + [5, -5, 0]
    out = []
    for _ in range(count):
        kind = rng.random()
        payload = {"shop_id": rng.randrange(8), "order_id": rng.choice(orders), "user_id": 1, "good_id": 1}
        event = {"event_type": rng.choice([0, 1, 1, 2, 3, 3, 4]), "payload": payload,
                 "timestamp": "2026-01-01 00:00:00.000"}
        if kind < 0.25 and event["event_type"] == 3:
            del payload["shop_id"]
        elif kind < 0.55:
            target, key = rng.choice([(event, "event_type"), (payload, "shop_id"), (payload, "order_id"),
                                      (event, "payload")])
            if rng.random() < 0.15:
                del target[key]
            else:
                target[key] = rng.choice(VALUES)
        line = json.dumps(event, separators=(",", ":")).encode()     # 1e400 as Infinity: not JSON
        if 0.55 <= kind < 0.6:   # a duplicated key, the second one different
            line = line.replace(b'"shop_id":', b'"shop_id":"x","shop_id":', 1) if rng.random() < 0.5 else \
                line.replace(b'"shop_id":', b'"shop_id":1,"shop_id":', 1)
        elif 0.6 <= kind < 0.66:
            line = rng.choice([b"", b"   ", b"\t", b"not json", b"{", b"[1,2]", b"null", b"1", b'"s"',
                               b'{"event_type":1}', b'{"event_type":1,"payload":null}',
                               b'{"event_type":1,"payload":[]}', b'{"payload":{"shop_id":1}}',
                               b'{"event_type":0,"payload":{"shop_id":1,"x":"\xff"}}',
                               b'{"event_type":0,"payload":{"shop_id":1,"x":"\xc3"}}',
                               b'{"event_type":0,"payload":{"shop_id":1,"x":"caf\xc3\xa9"}}',
                               b'{"event_type":0,"payload":{"shop_id":1},"x":"\xe2\x82"}',
                               b'{"event_type":0,"payload":{"shop_id":2,"x":"\x00"}}',
                               b"\xef\xbb\xbf" + b'{"event_type":0,"payload":{"shop_id":1}}',
                               b'{"event_type":0,"payload":{"shop_id":1,"deep":' + b"[" * 2000 + b"]" * 2000 + b"}}",
                               b'{"event_type":0,"payload":{"shop_id":3,"deep":' + b"[" * 40 + b"]" * 40 + b"}}",
                               b'{"event_type":0,"payload":{"shop_id":1,"pad":"' + b"x" * LIMIT + b'"}}',
                               b'{"event_type":0,"payload":{"shop_id":1,"pad":"' + b"x" * (LIMIT - 44) + b'"}}',
                               b'{"event_type":3,"payload":{"order_id":1e3}}',
                               b'{"event_type":1,"payload":{"shop_id":1,"order_id":"7"}}',
                               b'{"event_type": 1 , "payload" : { "shop_id" : 6 , "order_id" : 5 } }',
                               b'{"event_type":01,"payload":{"shop_id":1}}',
                               b'{"event_type":1,"payload":{"shop_id":-0,"order_id":-0}}',
                               b'{"event_type":1,"payload":{"shop_id":1E2}}'])
        if rng.random() < 0.05:
            line += b"\r"
        out.append(line + b"\n")
    return out


def both(shared: Path, index: OrderIndex, files: list[tuple[str, bytes]]):
    expected = reference(files)
    for name, data in files:
        write_source(shared, name, [data])
    for name, _ in files:
        split_file(layout.source_file(shared, name), name, shared, 2, [0, 1], [0, 1], index, True,
                   max_line_bytes=LIMIT)
        shards = {s: layout.splitter_output(shared, name, s).read_bytes() for s in (0, 1)}
        rej = layout.splitter_rejected(shared, name)
        records = [orjson.loads(x) for x in rej.read_bytes().splitlines()] if rej.exists() else []
        exp_shards, exp_rejected = expected[name]
        assert shards == exp_shards, name
        assert [(r["line_no"], r["reason"]) for r in records] == exp_rejected, name
        lines = lines_of(dict(files)[name])
        for r in records:
            raw = lines[r["line_no"] - 1]
            if r.get("line_truncated"):
                assert raw.startswith(base64.b64decode(r["line_base64"]) if "line_base64" in r else r["line"].encode())
            else:
                assert (base64.b64decode(r["line_base64"]) if "line_base64" in r else r["line"].encode()) == raw


@pytest.fixture
def index(pipeline_db, shared_dir):
    layout.splitter_dir(shared_dir).mkdir(parents=True)
    idx = OrderIndex(pipeline_db)
    yield idx
    idx.close()


@pytest.mark.parametrize("tiny", [False, True], ids=["default-buffers", "tiny-buffers"])
def test_fixture_generated_and_hostile_lines_route_as_the_rules_say(shared_dir, index, monkeypatch, tmp_path, tiny):
    if tiny:
        monkeypatch.setattr(stage, "BUFFER_LINES", 37)
        monkeypatch.setattr(stage, "BUFFER_BYTES", 3000)
        monkeypatch.setattr(order_index, "CHUNK", 5)
        monkeypatch.setattr(order_index, "MAX_INFLIGHT", 1)
    rng = random.Random(12 if tiny else 11)
    gen = layout.events_dir(tmp_path)
    generated = [layout.source_file(tmp_path, n).read_bytes()
                 for n in generate_files(gen, 2, 3000, seed=5, start="20260301000000")]
    files = [("20261126221520", FIXTURE.read_bytes())]
    files += [(f"2026030100000{i}", data) for i, data in enumerate(generated)]
    for i in range(4):
        lines = hostile_lines(rng, 1500)
        data = b"".join(lines)
        if i == 1:
            data = b"\xef\xbb\xbf" + data
        if i == 2:
            data = data[:-1]                         # no final newline
        if i == 3:
            data += b'{"event_type":3,"payload":{"order_id":1152921504606846977}}'
        files.append((f"2026040100000{i}", data))
    both(shared_dir, index, files)
