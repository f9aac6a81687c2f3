"""The worker's fast path (app/worker/fast.py, `rules.validate`) against the exact path
(`rules.validate_exact`): the same Event or the same rejection for every line, and the same
prepared line byte for byte as orjson prints the line's dict, on the fixtures, the generator's
lines with every injected case, and lines made to be unusual."""
from __future__ import annotations

import hashlib
import io
import itertools
import random
import re
from datetime import datetime
from pathlib import Path

from decimal import Decimal

import msgspec
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.ingest.generator import Generator
from app.worker import rules
from app.worker.rules import RETURN, Bad, Event, valid_time, validate, validate_exact
from app.worker.rules import ACCEPTED, HELD
from app.worker.stage import PAUSE_LINES, Counts, FileRun, PreparedLines, prepared_line, rejected_line
from app.worker.state import Hold

FIXTURES = Path("/work/shared/fixtures")
T = "2026-05-01 10:00:00.123"
SOURCE = "20260501100000"
FIELDS = ("etype", "ts", "key", "dkey", "shop_id", "user_id", "order_id", "good_id", "qty", "amount", "active")


def reference_line(ev: Event, shard: int) -> bytes:
    """The prepared line as the worker printed it before the fast path: orjson, a dict."""
    amount = ev.amount
    return orjson.dumps({
        "event_key": ev.key, "event_type": ev.etype, "shop_id": ev.shop_id, "user_id": ev.user_id,
        "timestamp": ev.ts, "shard": shard, "order_id": ev.order_id, "good_id": ev.good_id, "qty": ev.qty,
        "amount": None if amount is None else str(amount), "source_file": SOURCE, "payload": ev.payload,
    }, option=orjson.OPT_APPEND_NEWLINE)


def compare(raw: bytes, shard: int, shard_count: int = 2, **limits) -> bool:
    """Both paths agree on `raw`; whether the fast path took it."""
    fast, exact = validate(raw, shard, shard_count, **limits), validate_exact(raw, shard, shard_count, **limits)
    assert type(fast) is type(exact), raw
    if type(exact) is Bad:
        assert (fast.code, fast.detail) == (exact.code, exact.detail), raw
        return False
    assert [getattr(fast, f) for f in FIELDS] == [getattr(exact, f) for f in FIELDS], raw
    assert exact.payload_json is None and fast.payload == exact.payload, raw
    assert prepared_line(fast, fast.shop_id, shard, SOURCE) == reference_line(exact, shard), raw
    assert prepared_line(exact, exact.shop_id, shard, SOURCE) == reference_line(exact, shard), raw
    return fast.payload_json is not None


def generator_lines(n: int = 6000) -> list[bytes]:
    gen = Generator(seed=3)
    out = io.BytesIO()
    for i in range(n // 500):
        gen.write(out, f"202605011000{i:02d}", 500)
    return out.getvalue().splitlines(keepends=True)


def test_the_generators_lines_and_the_fixtures_agree_and_ordinary_lines_take_the_fast_path():
    lines = generator_lines() + [x for p in sorted(FIXTURES.rglob("*.txt")) for x in p.read_bytes().splitlines()]
    assert len(lines) > 6000
    taken = [compare(raw, shard) for raw in lines for shard in (0, 1)]
    assert sum(taken) > len(lines) * 0.8     # each valid line is on one of the two shards


BASES = [
    {"event_type": 1, "payload": {"order_id": 9000000000000000001, "user_id": 7, "shop_id": 4, "good_id": 2,
                                  "qty": 2, "price_at_order": 199.99}, "saved_at": T, "timestamp": T},
    {"event_type": 3, "payload": {"order_id": -5, "user_id": 7, "shop_id": 4, "good_id": 2, "qty": 1,
                                  "refund_amount": 12.5}, "saved_at": T, "timestamp": T},
    {"event_type": 3, "payload": {"order_id": 12, "user_id": 7, "good_id": 2, "qty": 1, "refund_amount": 3},
     "saved_at": T, "timestamp": T},
    {"event_type": 0, "payload": {"shop_id": 6, "good_id": 1, "delta_count": -3, "reason": "générateur",
                                  "sub_event_type": "loss"}, "saved_at": T, "timestamp": T},
    {"event_type": 0, "payload": {"shop_id": 6, "good_id": 1, "delta_count": 5}, "timestamp": T},
    {"event_type": 2, "payload": {"shop_id": 8, "good_id": 3, "new_price": 0.1}, "saved_at": T, "timestamp": T},
    {"event_type": 4, "payload": {"shop_id": 2, "active": False}, "saved_at": T, "timestamp": T},
]
# Raw JSON texts put in place of a payload field's value, or added as a field
VALUES = [b"0", b"-0", b"1", b"-1", b"10.50", b"10.5", b"1e2", b"1E2", b"1.0e1", b"-0.0", b"0.001", b"0.01",
          b"9999999999999.99", b"10000000000000", b"99999999999999.99", b"1e400", b"-1e400", b"1.7976931348623157e308",
          b"9223372036854775807", b"9223372036854775808", b"-9223372036854775808", b"-9223372036854775809",
          b"2147483647", b"2147483648", b"-2147483647", b"-2147483648", b"123456789012345678901234567890",
          b"true", b"false", b"null", b'"5"', b'"x"', b'"\\u0041"', b'"\\n"', b'"\xc3\xa9"', b'"\xff"', b'"\xed\xa0\x80"',
          b"[]", b"{}", b"[1,[2,[3]]]", b'{"a":{"b":{"c":1}}}', b"NaN", b"Infinity", b"01", b"1.", b".5", b"+1"]


def mutations(base: dict):
    text = orjson.dumps(base)
    payload = base["payload"]
    body = orjson.dumps(payload)
    yield text
    yield text + b"\n"
    yield text + b"\r\n"
    yield text.replace(b",", b", ")
    yield text.replace(b":", b" : ", 3)
    yield b" " + text
    yield text + b" x"
    yield text[:-1]
    for name in payload:                                   # each field: every value, then gone
        old = orjson.dumps(payload[name])
        for value in VALUES:
            yield text.replace(b'"%s":%s' % (name.encode(), old), b'"%s":%s' % (name.encode(), value), 1)
        yield orjson.dumps({**base, "payload": {k: v for k, v in payload.items() if k != name}})
    for value in VALUES:                                    # extra fields, in the payload and at the top
        yield text.replace(body, body[:-1] + b',"extra":' + value + b"}", 1)
        yield text[:-1] + b',"extra":' + value + b"}"
    yield orjson.dumps({**base, "payload": dict(reversed(list(payload.items())))})
    yield text.replace(b'"payload":', b'"payload":{"order_id":1},"payload":', 1)       # duplicate keys
    yield text[:-1] + b',"event_type":2}'
    yield text.replace(body, body[:-1] + b',"shop_id":' + orjson.dumps(payload.get("shop_id", 1)) + b"}", 1)
    for etype in (b"-1", b"5", b"1.0", b"true", b'"1"', b"null"):
        yield text.replace(b'"event_type":%d' % base["event_type"], b'"event_type":' + etype, 1)
    for ts in (b'"2026-02-30 00:00:00.000"', b'"0999-12-31 23:59:59.999"', b'"2026-05-01T10:00:00.000"',
               b'"9999-12-31 23:59:59.999"', b'"1000-01-01 00:00:00.000"', b'"1969-12-31 23:59:59.999"', b"5",
               b'"2026-05-01 10:00:00.12"', b'"2026-05-01 10:00:00.1234"', b'"2026-05-01 24:00:00.000"'):
        yield text.replace(b'"timestamp":"%s"' % T.encode(), b'"timestamp":' + ts, 1)
    for other in (b'"saved_at":5', b'"saved_at":null', b'"saved_at":"\\u0041"', b'"saved_at":[' * 40 + b"]" * 40):
        yield text[:-1] + b"," + other + b"}"
    yield text.replace(b'"payload":' + body, b'"payload":[' + body + b"]", 1)
    yield text.replace(b'"payload":' + body, b'"payload":null', 1)
    yield b"[" + text + b"]"
    yield b'"' + text.replace(b'"', b'\\"') + b'"'


def test_unusual_lines_agree_on_both_shards_and_at_the_limits():
    lines = list(itertools.chain.from_iterable(mutations(b) for b in BASES))
    assert len(lines) > 800
    taken = sum(compare(raw, shard) for raw in lines for shard in (0, 1))
    assert taken >= len(BASES)
    for raw in lines[:: 7]:
        compare(raw, 0, max_line_bytes=4096, max_depth=2)
        compare(raw, 1, 3)


@pytest.mark.parametrize("size", [400, 500, 520, 600])
def test_lines_near_the_prepared_size_limit_agree(size):
    base = dict(BASES[3], payload=dict(BASES[3]["payload"], reason="r" * size))
    raw = orjson.dumps(base)
    compare(raw, 0, max_line_bytes=4096)


@pytest.mark.parametrize("source", ["2026%d05%s", 'odd "name" \\ é'])
def test_a_prepared_line_quotes_any_source_file_name_as_orjson_does(source):
    raw = orjson.dumps({"event_type": 1, "timestamp": T, "payload": {
        "order_id": 7, "user_id": 1, "shop_id": 2, "good_id": 3, "qty": 1, "price_at_order": 9.5}})
    ev = validate(raw, 0, 2)
    line = prepared_line(ev, ev.shop_id, 0, source)
    assert orjson.loads(line)["source_file"] == source
    assert line == reference_line(ev, 0).replace(orjson.dumps(SOURCE), orjson.dumps(source))


@pytest.mark.parametrize("source", [SOURCE, "2026%d05%s", 'odd "name" \\ é'])
def test_lines_rendered_a_batch_at_a_time_are_the_lines_rendered_one_by_one(source):
    """`PreparedLines.lines` (a template per event type, one format for many lines) against the
    generic one-line template, on every valid line of the tests above, from both paths, mixed."""
    raws = (generator_lines(2000) + [x for p in sorted(FIXTURES.rglob("*.txt")) for x in p.read_bytes().splitlines()]
            + list(itertools.chain.from_iterable(mutations(b) for b in BASES)))
    for shard in (0, 1):
        events = [ev for raw in raws for ev in (validate(raw, shard, 2), validate_exact(raw, shard, 2))
                  if type(ev) is Event]
        assert {ev.etype for ev in events} == {0, 1, 2, 3, 4} and any(ev.payload_json is None for ev in events)
        shop_of = {ev.order_id: 1000 + i for i, ev in enumerate(events) if ev.etype == RETURN}
        render = PreparedLines(shard, source)
        one_by_one = [render(ev, shop_of[ev.order_id] if ev.etype == RETURN else ev.shop_id) for ev in events]
        assert render.lines(events, shop_of) == b"".join(one_by_one)
        assert render.lines(events[:1], shop_of) == one_by_one[0] and render.lines([], shop_of) == b""


_MAYBE_ID = st.one_of(st.none(), st.integers(-2**63, 2**63 - 1))
_AMOUNTS = st.one_of(st.none(), st.decimals(allow_nan=True, allow_infinity=True), st.integers(-10**15, 10**15).map(
    lambda c: Decimal(c).scaleb(-2)))


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), _MAYBE_ID, _MAYBE_ID, _MAYBE_ID, _MAYBE_ID, _MAYBE_ID, _AMOUNTS,
                          st.booleans(), st.integers(0, 2**63 - 1)), max_size=12),
       st.sampled_from([0, 1]), st.sampled_from([SOURCE, "2026%d05%s", 'odd "name" \\ é']))
def test_lines_render_every_field_an_event_holds_as_one_by_one(fields, shard, source):
    """`PreparedLines.lines` prints each field the Event holds, whatever its type, as the
    one-line template does: it takes no type's null fields on trust (a restock with a user, a
    purchase without a qty, an amount in any Decimal's form); payloads as copied text or parsed."""
    events, shop_of = [], {}
    for etype, shop, user, order, good, qty, amount, copied, key in fields:
        payload = {"n": key, "s": "é\"\\"}
        ev = Event(etype, T, msgspec.Raw(orjson.dumps(payload)) if copied else None, None if copied else payload,
                   f"{etype}:h{key:x}", None, shop, user, order, good, qty, amount)
        if etype == RETURN:
            shop_of[order] = shop if shop is not None else key
        events.append(ev)
    render = PreparedLines(shard, source)
    one_by_one = [render(ev, shop_of[ev.order_id] if ev.etype == RETURN else ev.shop_id) for ev in events]
    assert render.lines(events, shop_of) == b"".join(one_by_one)


def reference_time(ts) -> bool:
    """What `valid_time` means, without its caches."""
    if type(ts) is not str or not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}", ts):
        return False
    try:
        datetime.strptime(ts, "%Y-%m-%d %H:%M:%S.%f")
    except ValueError:
        return False
    return ts >= "1000-01-01 00:00:00.000"


def test_valid_time_caches_per_second_but_checks_every_character():
    seconds = ["2026-05-01 10:00:00.", "2026-02-29 23:59:59.", "2024-02-29 23:59:59.", "1000-01-01 00:00:00.",
               "0999-12-31 23:59:59.", "9999-12-31 23:59:59.", "2026-05-01 10:00:60.", "2026-05-01 24:00:00.",
               "2026-13-01 00:00:00.", "2026-05-01T10:00:00.", "2026-05-0\u0661 10:00:00.", "２026-05-01 10:00:00."]
    millis = ["000", "123", "999", "12", "1234", "12a", "1\u0663", "\u0661\u0662\u0663", "12\n", " 12", "-12", "+12",
              "1.2", "", "0000"]
    cases = [s + m for s in seconds for m in millis] + [None, 5, b"2026-05-01 10:00:00.000", "", "2026-05-01"]
    for ts in cases + cases[::-1]:   # the second time round, from the cache, in the other order
        assert valid_time(ts) == reference_time(ts), repr(ts)
    assert sum(map(valid_time, cases)) == 4 * 3


def reference_money(value):
    """What `rules.money` means, without its cache or its shortcut: the Decimal of the number's
    shortest repr, at most 2 decimals and 13 integer digits, quantized to cents."""
    if type(value) not in (int, float):
        raise TypeError
    amount = Decimal(value) if type(value) is int else Decimal(repr(value))
    if not amount.is_finite() or abs(amount) >= Decimal("1e13") or amount.as_tuple().exponent < -2:
        raise ValueError
    return amount.quantize(Decimal("0.01"))


def same_money(value) -> None:
    rules._amounts.clear()
    try:
        want = reference_money(value)
    except (TypeError, ValueError) as exc:
        with pytest.raises(type(exc)):
            rules.money(value)
        return
    got = rules.money(value)
    assert got.as_tuple() == want.as_tuple() and str(got) == str(want), value
    assert rules.money(value).as_tuple() == want.as_tuple(), value    # from the cache


MONEY_EDGES = [0.0, -0.0, 0, -0, 0.01, -0.01, 0.005, 0.015, 0.1, 0.3, 1e-5, 5e-324, 0.29, 1.15, 2.675, 1.005,
               9999999999999.99, -9999999999999.99, 9999999999999.995, 1e13, -1e13, 9999999999999.98,
               99999999999999.9, 1e15, 1e16, 1e300, float("inf"), float("-inf"), float("nan"), 123456789012.345,
               0.07, 10**13, 10**13 - 1, -(10**13) + 1, 2**53, 2**53 + 1, 1, -1, True, None, "1.00", Decimal("1")]


@settings(max_examples=2000, deadline=None)
@given(st.one_of(st.integers(-10**15, 10**15).map(lambda c: c / 100), st.integers(-10**16, 10**16).map(lambda c: c / 1000),
                 st.floats(allow_nan=True, allow_infinity=True), st.integers(-2 * 10**13, 2 * 10**13),
                 st.sampled_from(MONEY_EDGES)))
def test_money_is_the_decimal_of_the_numbers_repr_whatever_the_number(value):
    same_money(value)


def test_money_on_every_cent_near_the_edges_and_the_generators_prices():
    for base in (0, 1, 100, 2**20, 10**12, 10**15 - 10**4):
        for c in range(base - 300, base + 300):
            same_money(c / 100)
            same_money(-c / 100)
            same_money(c / 1000)
    for raw in generator_lines(2000):
        try:
            body = orjson.loads(raw)["payload"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            continue
        for name in ("price_at_order", "refund_amount", "new_price"):
            if type(body) is dict and name in body:
                same_money(body[name])


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 2**63 - 1), st.integers(0, 2**63 - 1))
def test_buyer_of_is_the_first_8_bytes_of_openssls_md5(user, good):
    digest = hashlib.md5(b"%d %d" % (user, good)).digest()
    assert rules.buyer_of(user, good) == int.from_bytes(digest[:8], "big", signed=True)


def reference_emit(run, raws, first_line, codes, events, shop_of) -> None:
    """`FileRun._emit` as it was, one Python step per line (without the pauses)."""
    out, rej, counts, lines = run.out, run.rej, run.counts, run.prepare.lines
    pending = run.pending
    counts.lines += len(raws)
    accepted: list = []
    for i, code in enumerate(codes):
        if not i % PAUSE_LINES and accepted:
            out.write(lines(accepted, shop_of))
            counts.accepted += len(accepted)
            accepted.clear()
        line = first_line + i
        after = None
        if pending and line in pending:
            after = run._emit_resolved(pending.pop(line), accepted, before=True)
        if code == ACCEPTED:
            accepted.append(events[i])
        elif code == HELD:
            counts.held += 1
        else:
            detail = None
            if code in (rules.MALFORMED, rules.WRONG_SHARD, rules.TOO_LARGE):
                bad = events[i]
                detail = bad.detail if type(bad) is Bad else None
            rej.write(rejected_line(raws[i], code, detail, run.filename, line))
            counts.reject(code)
        if after:
            run._emit_resolved(after, accepted, before=False)
    if accepted:
        out.write(lines(accepted, shop_of))
        counts.accepted += len(accepted)


def emit_run(seed: int, emit) -> tuple:
    """A FileRun without a stage, its outputs in memory, writing one batch of the generator's
    lines with codes and resolved holds drawn at random (`seed`) through `emit`."""
    rng = random.Random(seed)
    raws = EMIT_LINES[: rng.choice([1, 5, 255, 256, 257, 700, len(EMIT_LINES)])]
    events = [validate(raw, 0, 2) for raw in raws]
    weights = rng.choice([(1, 0, 0), (20, 1, 1), (1, 1, 1), (0, 1, 1)])
    codes = bytes(rng.choices([ACCEPTED, HELD, rng.choice(range(2, 16))], weights)[0]
                  if type(ev) is Event else ev.code for ev in events)
    run = object.__new__(FileRun)
    out, rej = io.BytesIO(), io.BytesIO()
    run.out, run.rej, run.counts, run.filename = out, rej, Counts(), SOURCE
    run.prepare, run.validate = PreparedLines(0, SOURCE), rules.validator(0, 2)
    first_line = rng.choice([1, 1000])
    run.pending = {}
    returns = [raw for raw in EMIT_LINES if type(ev := validate(raw, 0, 2)) is Event and ev.etype == RETURN]
    for k in range(rng.choice([0, 1, 3, 40])):
        line = first_line + rng.randrange(-5, len(raws) + 5)
        h = Hold(1, k + 1, "older", 0, rng.choice(returns), T, T)
        h.resolve(rng.choice(["expired", "released"]), rng.choice([ACCEPTED, ACCEPTED, rules.ORPHAN_RETURN]), 2,
                  line, k)
        run.pending.setdefault(line, []).append(h)
    shop_of = {validate(raw, 0, 2).order_id: 5 for raw in returns}
    emit(run, raws, first_line, codes, events, shop_of)
    c = run.counts
    return (out.getvalue(), rej.getvalue(), c.stats(), c.lines, c.accepted, sorted(run.pending))


EMIT_LINES = generator_lines(1000)


@pytest.mark.parametrize("seed", range(60))
def test_emit_by_stretches_writes_what_the_line_by_line_loop_wrote(seed):
    fast = emit_run(seed, lambda run, *args: FileRun._emit(run, *args))
    assert fast == emit_run(seed, lambda run, *args: reference_emit(run, *args))


# -- property tests: any line, both paths ------------------------------------------------------

FIELD_NAMES = ["order_id", "user_id", "shop_id", "good_id", "qty", "price_at_order", "refund_amount", "delta_count",
               "reason", "sub_event_type", "new_price", "active", "extra"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=False),
                    st.sampled_from([0.01, 199.99, 1e13, 12.345, -0.0, 2147483648]), st.text(max_size=8))
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                             st.dictionaries(st.sampled_from(FIELD_NAMES), inner,
                                                                             max_size=3)), max_leaves=40)
PAYLOADS = st.dictionaries(st.sampled_from(FIELD_NAMES), st.one_of(SCALARS, JSON_VALUES), max_size=8)
NUMBERS = st.one_of(st.integers(-5, 2**63 + 5), st.integers(-2**63, 2**63 - 1), st.integers(1, 10**6).map(lambda c: c / 100),
                    st.floats(-1e14, 1e14), st.sampled_from([0, -0.0, 1e13, 2147483647, 2147483648, 12.345]))
KIND_VALUES = {"order": NUMBERS, "id": NUMBERS, "qty": NUMBERS, "money": NUMBERS, "bool": st.booleans()}


@st.composite
def typed_payloads(draw):
    """A payload with the fields of an event type (`rules.FIELDS`), values mostly in range,
    now and then a field dropped, added or moved: lines the fast path takes or nearly does."""
    etype = draw(st.integers(0, 4))
    fields = list(rules.FIELDS[etype])
    if etype == rules.PURCHASE:
        fields.insert(2, ("shop_id", "id"))
    elif etype == rules.RETURN and draw(st.booleans()):
        fields.insert(2, ("shop_id", "id"))
    payload = {name: draw(KIND_VALUES[kind]) for name, kind in fields}
    if etype == rules.RESTOCK and draw(st.booleans()):
        payload.update(reason=draw(st.text(max_size=5)), sub_event_type=draw(st.sampled_from(["loss", "restock"])))
    if draw(st.integers(0, 9)) == 0:
        payload.pop(draw(st.sampled_from(sorted(payload))))
    if draw(st.integers(0, 9)) == 0:
        payload[draw(st.sampled_from(FIELD_NAMES))] = draw(SCALARS)
    if draw(st.integers(0, 9)) == 0:
        payload = dict(reversed(list(payload.items())))
    return etype, payload
TIMES = st.one_of(st.just(T), st.sampled_from(["2026-02-29 10:00:00.000", "2024-02-29 23:59:59.999", "2026-05-01"]),
                  st.text(max_size=24))
LINES = st.builds(lambda etype, payload, ts, saved: {"event_type": etype, "payload": payload, "timestamp": ts,
                                                     **({"saved_at": saved} if saved is not None else {})},
                  st.one_of(st.integers(-1, 5), st.sampled_from([1.0, True, "1", None])),
                  st.one_of(PAYLOADS, JSON_VALUES), TIMES, st.one_of(st.none(), TIMES, SCALARS))


@settings(max_examples=600, deadline=None)
@given(LINES, st.sampled_from([0, 1]), st.booleans())
def test_any_line_of_json_agrees_on_both_paths(obj, shard, small_limits):
    raw = orjson.dumps(obj)
    compare(raw, shard)
    if small_limits:
        compare(raw, shard, max_line_bytes=4096, max_depth=2)


@settings(max_examples=1500, deadline=None)
@given(typed_payloads(), TIMES, st.sampled_from([0, 1]))
def test_lines_shaped_like_events_agree_on_both_paths(typed, ts, shard):
    etype, payload = typed
    compare(orjson.dumps({"event_type": etype, "payload": payload, "saved_at": T, "timestamp": ts}), shard)


def edit(raw: bytes, edits: list) -> bytes:
    for pos, cut, insert in edits:
        pos %= len(raw) + 1
        raw = raw[:pos] + insert + raw[pos + cut:]
    return raw


EDIT_BYTES = st.one_of(st.binary(max_size=3), st.sampled_from([b'"', b"\\", b"{", b"}", b"[", b"]", b",", b":", b"0",
                                                           b"-", b".", b"e", b" ", b"\n", b"\xff", b"\xc3\xa9", b"null"]))


@settings(max_examples=600, deadline=None)
@given(st.integers(0, 10**6), st.lists(st.tuples(st.integers(0, 400), st.integers(0, 3), EDIT_BYTES), max_size=4),
       st.sampled_from([0, 1]))
def test_the_generators_lines_with_any_bytes_changed_agree_on_both_paths(which, edits, shard):
    raw = edit(EMIT_LINES[which % len(EMIT_LINES)], edits)
    compare(raw, shard)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 60), st.sampled_from([0, 1]))
def test_any_bytes_and_any_depth_agree_on_both_paths(noise, depth, shard):
    compare(noise, shard)
    base = orjson.dumps(BASES[0])
    nested = base.replace(b'"price_at_order":199.99', b'"price_at_order":' + b"[" * depth + b"1" + b"]" * depth, 1)
    compare(nested, shard)
    compare(nested, shard, max_depth=max(2, depth - 1))


def test_a_shards_fast_validator_gives_validate_fasts_event_for_every_line():
    """`rules.fast_validator` (names bound once, positional fields, caches asked inline) gives
    field for field the Event the exact path gives, on both shards, and None where it must."""
    lines = generator_lines() + [x for p in sorted(FIXTURES.rglob("*.txt")) for x in p.read_bytes().splitlines()]
    for shard in (0, 1):
        take = rules.fast_validator(shard, 2)
        taken = 0
        for raw in lines:
            if b"\\" in raw:
                continue
            ev, exact = take(raw), validate_exact(raw, shard, 2)
            if ev is None:
                continue
            taken += 1
            assert type(exact) is Event, raw
            assert [getattr(ev, f) for f in FIELDS] == [getattr(exact, f) for f in FIELDS], raw
            assert ev.payload == exact.payload and ev.payload_json is not None, raw
        assert taken > len(lines) * 0.4


def test_a_fast_paths_payload_is_the_lines_own_text_not_a_copy():
    """The fast path keeps the payload as the `msgspec.Raw` the line's decode gave (its text in
    the line, not copied), which `PreparedLines.lines` prints as it is: a `bytes` copy per line
    and a `Raw` made of it per prepared line were two allocations a line for the same bytes."""
    raw = orjson.dumps(BASES[0])
    ev = rules.validator(4 % 2, 2)(raw)
    assert type(ev) is Event and type(ev.payload_json) is msgspec.Raw
    assert bytes(ev.payload_json) == orjson.dumps(BASES[0]["payload"]) and ev.payload == BASES[0]["payload"]
    assert PreparedLines(0, SOURCE).lines([ev], {}) == reference_line(ev, 0)


def test_a_list_of_lines_is_validated_in_one_call_as_line_by_line():
    """`rules.lines_validator` (the worker's: one Python loop over a batch, not a closure called
    per line from `map`) answers for each line what `validate` answers for it alone, lines the
    fast path takes and lines it hands to the exact path mixed, on both shards."""
    lines = generator_lines(2000) + [x for p in sorted(FIXTURES.rglob("*.txt")) for x in p.read_bytes().splitlines()]
    lines += [b'{"event_type":1,"payload":{"order_id":1,"user_id":1,"shop_id":2,"good_id":1,"qty":1,'
              b'"price_at_order":1.5e1}}', b"\xff", b"[]", b'{"a":"\\u00e9"}']
    random.Random(4).shuffle(lines)
    for shard in (0, 1):
        many = rules.lines_validator(shard, 2)
        got = many(lines) + many(lines[:1]) + many([])
        assert len(got) == len(lines) + 1
        for raw, ev in zip(lines + lines[:1], got):
            one = validate(raw, shard, 2)
            assert type(ev) is type(one), raw
            if type(one) is Bad:
                assert (ev.code, ev.detail) == (one.code, one.detail), raw
            else:
                assert [getattr(ev, f) for f in FIELDS] == [getattr(one, f) for f in FIELDS], raw
                assert ev.payload == one.payload, raw


def test_a_fast_validator_hands_every_line_it_does_not_take_to_its_fallback():
    """`rules.fast_validator` with a fallback (`rules.validator`'s one closure a line): a line
    with a backslash, one longer than its bound, one that is not bytes (TooLarge) and any the
    fast path refuses go to the fallback as they are; the others it answers itself, as
    `validate_fast` does."""
    from app.lines import TooLarge
    lines = generator_lines(2000) + [x for p in sorted(FIXTURES.rglob("*.txt")) for x in p.read_bytes().splitlines()]
    ordinary = lines[0]
    lines += [ordinary.replace(b'"payload"', b'"pay\\u006coad"'), TooLarge(b"{}", 10**6, 1000),
              ordinary.rstrip() + b" " * 200]
    handed: list = []

    def fallback(raw):
        handed.append(raw)
        return "fallback"
    bound = len(ordinary) + 50
    for shard in (0, 1):
        take = rules.fast_validator(shard, 2, bound, fallback)
        handed.clear()
        for raw in lines:
            got, alone = take(raw), rules.validate_fast(raw, shard, 2)
            if type(raw) is not bytes or b"\\" in raw or len(raw) > bound or alone is None:
                assert got == "fallback" and handed[-1] is raw, raw
            else:
                assert [getattr(got, f) for f in FIELDS] == [getattr(alone, f) for f in FIELDS], raw
        assert lines[-1] in handed and lines[-2] in handed and lines[-3] in handed
        assert 0 < len(handed) < len(lines)


def test_buyer_of_and_the_dedup_keys_head_are_the_digests_first_8_bytes_signed():
    """`buyer_of` and the fast path's dedup key take a digest's first 8 bytes as a signed
    big-endian integer (`_HEAD64`), as int.from_bytes did."""
    for digest in (bytes(16), b"\xff" * 16, b"\x80" + bytes(15), b"\x7f" + b"\xff" * 15, hashlib.md5(b"x").digest()):
        assert rules._HEAD64(digest)[0] == int.from_bytes(digest[:8], "big", signed=True)
    ev = next(e for e in map(lambda raw: rules.validate_fast(raw, 0, 1), generator_lines(500))
              if e is not None and e.etype not in (rules.PURCHASE, rules.RETURN))
    digest = hashlib.blake2b(orjson.dumps([ev.etype, ev.payload, ev.ts], option=orjson.OPT_SORT_KEYS),
                             digest_size=16).digest()
    assert ev.key == f"{ev.etype}:h{digest.hex()}" and ev.dkey == (rules.minute_of(ev.ts), rules._HEAD64(digest)[0])


def per_row_orders(orders, file_id: int) -> bytes:
    """The `worker_orders` rows as `Ledger.add_writes` rendered them before, one format per row."""
    from app.worker.ledger import DEBITED, CREDITED, REJECTED, _number
    return "".join("%d\t%d\t%d\t%d\t%d\t%d\t%s\t%d\n" % (
        *(o.stored_at or (file_id, o.line)), o.order_id, o.shop_id,
        rules.buyer_of(o.user_id, o.good_id) if o.buyer is None else o.buyer, o.qty, _number(o.amount),
        REJECTED if not o.debited else DEBITED if o.credit is None else CREDITED) for o in orders).encode()


AMOUNTS = [Decimal("199.99"), Decimal("0.00"), Decimal("-0.00"), Decimal("1000"), Decimal("1E+3"),
           Decimal("1.5E+2"), Decimal("-9999999999999999.99"), Decimal("12.5"), Decimal("3")]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(-2**63, 2**63 - 1), st.sampled_from(AMOUNTS), st.sampled_from([0, 1, 2]),
                          st.booleans(), st.integers(0, 2**63 - 1)), max_size=40))
def test_ledger_rows_rendered_a_chunk_at_a_time_are_the_rows_rendered_one_by_one(rows):
    """`ledger.order_rows` and `ledger.balance_rows` (one format per chunk) print exactly what a
    format per row and `_number` printed, amounts in exponent form included."""
    from app.worker.ledger import _number, balance_rows, order_rows
    orders = []
    for i, (order_id, amount, state, stored, user) in enumerate(rows):
        o = rules.Order(order_id, user, amount, 4, 7, 2, state != 0, line=i + 1)
        if state == 2:
            o.credit = True
        if stored:
            o.stored_at, o.buyer, o.user_id, o.good_id = (3, i + 9), -user, None, None
        orders.append(o)
    assert order_rows(orders, 11) == per_row_orders(orders, 11)
    balances = {user: amount for _, amount, _, _, user in rows}
    users = sorted(balances)
    assert balance_rows(users, balances) == "".join("%d\t%s\n" % (u, _number(balances[u])) for u in users).encode()


@pytest.mark.parametrize("bad", [Decimal("NaN"), Decimal("Infinity"), Decimal("-Infinity"), Decimal("sNaN")])
def test_a_ledger_row_with_an_amount_that_is_not_finite_is_refused(bad):
    from app.worker.ledger import balance_rows, order_rows
    with pytest.raises(ValueError, match="not a finite amount"):
        order_rows([rules.Order(1, 2, bad, 4, 7, 2, True, line=1)], 1)
    with pytest.raises(ValueError, match="not a finite amount"):
        balance_rows([5], {5: bad})
