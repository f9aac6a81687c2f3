"""The shard worker's business rules as pure functions: what makes a line a usable event, and
which reason rejects an event given the state it meets (see docs/business-rules.md).

No database here: the worker fetches the state a batch needs, asks these functions line by
line, and writes the changes back. Decisions are stored as one code byte per line, so the
codes below are a persistent format: append new reasons, never renumber.
"""
from __future__ import annotations

import hashlib
import re
import struct
from datetime import datetime, timedelta
from decimal import Decimal

from typing import Any, Optional

import msgspec
import orjson

try:   # CPython's own MD5: for 10-byte inputs 0.26 µs where OpenSSL's (hashlib.md5) takes 0.41
    from _md5 import md5 as _md5
except ImportError:  # pragma: no cover - a Python built without it
    _md5 = hashlib.md5

from ..config import Rules, Settings
from ..events import MAX_ID, PRICE_CHANGE, PURCHASE, RESTOCK, RETURN, SHOP_STATUS, TIME_FORMAT
from ..lines import TooLarge, too_deep
from . import fast

ACCEPTED = 0
HELD = 1
REASONS = (
    "duplicate",                # the business key was seen on this shard within DEDUP_WINDOW
    "malformed",                # not an event: bad JSON, missing or mistyped field, bad timestamp
    "wrong_shard",              # shop_id % SHARD_COUNT is not this worker's shard
    "non_positive_price",       # price_at_order, new_price or refund_amount <= 0
    "non_positive_qty",         # a purchase's or return's qty <= 0
    "insufficient_balance",     # the purchase would take the user's balance below zero
    "negative_stock",           # the stock change (or purchase) would take stock below zero
    "shop_inactive",            # a purchase in a shop whose latest status is inactive
    "orphan_return",            # a held return whose purchase did not come in time
    "purchase_rejected",        # a return whose purchase was seen but not accepted
    "refund_exceeds_purchase",  # refund_amount above the purchase's amount, or qty above its qty
    "already_refunded",         # a second return of one order (only reachable with RULE_DEDUP off)
    "return_mismatch",          # the return's user, good or shop differ from its purchase's
    "too_large",                # the line, or the prepared line it would make, is over MAX_LINE_BYTES
)
CODE = {reason: i + 2 for i, reason in enumerate(REASONS)}
REASON = {code: reason for reason, code in CODE.items()}
DUPLICATE, MALFORMED, WRONG_SHARD = CODE["duplicate"], CODE["malformed"], CODE["wrong_shard"]
NON_POSITIVE_PRICE, NON_POSITIVE_QTY = CODE["non_positive_price"], CODE["non_positive_qty"]
INSUFFICIENT_BALANCE, NEGATIVE_STOCK = CODE["insufficient_balance"], CODE["negative_stock"]
SHOP_INACTIVE, ORPHAN_RETURN = CODE["shop_inactive"], CODE["orphan_return"]
PURCHASE_REJECTED, REFUND_EXCEEDS = CODE["purchase_rejected"], CODE["refund_exceeds_purchase"]
ALREADY_REFUNDED, RETURN_MISMATCH = CODE["already_refunded"], CODE["return_mismatch"]
TOO_LARGE = CODE["too_large"]

CENT = Decimal("0.01")
ZERO = Decimal(0)                 # (a Decimal compares with a Decimal faster than with an int)
MAX_AMOUNT = Decimal("1e13")      # far below DECIMAL(18,2), so sums of a batch cannot overflow
BALANCE_MIN = Decimal("-9999999999999999.99")   # what worker_balances.balance (DECIMAL(18,2)) holds
ID_MAX = MAX_ID                   # BIGINT
QTY_MAX = fast.QTY_MAX            # INT
TIME_LEN = 23                     # YYYY-MM-DD HH:MM:SS.mmm
TIME_MIN, TIME_MAX = "1000-01-01 00:00:00.000", "9999-12-31 23:59:59.999"   # DATETIME(3)
# What a prepared line adds to its payload, at most: the other fields at their widest and a
# 64-character source_file. A payload prints at most 8 times as long as it was read (`1e9`
# prints `1000000000.0`), so only lines longer than (MAX_LINE_BYTES - PREPARED_EXTRA) / 8
# need their prepared size worked out.
PREPARED_EXTRA = 1024
MAX_LINE_BYTES, MAX_JSON_DEPTH = Settings.max_line_bytes, Settings.max_json_depth


class Event(msgspec.Struct, gc=False, eq=False):
    """One valid event line, its fields checked and typed. On the fast path `payload_json` is
    the payload's text, exactly as orjson prints the dict (a `msgspec.Raw` of the line: not
    copied, and printed into the prepared line as it is), and `payload` is parsed only if asked.
    A Struct, not a class with __slots__: made in one C call with all its fields (a line's
    Event cost as much as decoding the line), compared and hashed by identity as before."""

    etype: int
    ts: str
    payload_json: Optional[msgspec.Raw] = None
    _payload: Optional[dict] = None
    key: str = ""                  # the business key as the contract writes it (app.events.event_key)
    dkey: Any = None               # what dedup stores: the order id of a purchase or return, else (minute, 64-bit hash)
    shop_id: Optional[int] = None
    user_id: Optional[int] = None
    order_id: Optional[int] = None
    good_id: Optional[int] = None
    qty: Optional[int] = None
    amount: Optional[Decimal] = None
    active: Optional[bool] = None

    @property
    def payload(self) -> dict:
        if self._payload is None:
            self._payload = orjson.loads(memoryview(self.payload_json))
        return self._payload


class Bad:
    """A line rejected before any state is consulted (malformed, wrong shard)."""

    __slots__ = ("code", "detail")

    def __init__(self, code: int, detail: str):
        self.code, self.detail = code, detail


class _Invalid(Exception):
    pass


def _id(payload: dict, name: str, signed: bool = False) -> int:
    value = payload.get(name)
    if type(value) is not int:
        raise _Invalid(f"payload.{name} must be an integer" if name in payload else f"payload.{name} is missing")
    if not (-ID_MAX - 1 if signed else 0) <= value <= ID_MAX:
        raise _Invalid(f"payload.{name} is out of the 64-bit range")
    return value


def _qty(payload: dict, name: str) -> int:
    value = payload.get(name)
    if type(value) is not int:
        raise _Invalid(f"payload.{name} must be an integer" if name in payload else f"payload.{name} is missing")
    if not -QTY_MAX <= value <= QTY_MAX:
        raise _Invalid(f"payload.{name} is out of range")
    return value


_amounts: dict = {}


def money(value) -> Decimal:
    """An amount from a JSON number, exactly: a double prints back as the decimal literal it was
    parsed from when that literal has at most 15 significant digits (DBL_DIG), which every
    amount of at most 13 integer digits and 2 decimals has; more decimals are refused.
    Remembered per value: prices repeat, but a fifth of a day's prices are new (`_cents`)."""
    kind = type(value)
    if kind is not float and kind is not int:
        raise TypeError
    amount = _amounts.get(value)
    if amount is None:
        amount = _cents(value) if kind is float else None
        if amount is None:
            amount = _money_exact(value)
        if len(_amounts) > 100_000:
            _amounts.clear()
        _amounts[value] = amount
    return amount


def _cents(value: float) -> Decimal | None:
    """`_money_exact` of a double that is a whole number of cents c != 0 below MAX_AMOUNT, in
    three float and int operations (the Decimal of its repr, a tuple and a quantize cost 3x as
    much); None for any other value. Exact: `c / 100` is the double nearest c/100, so the
    double is that decimal's, which has at most 15 significant digits; two such decimals never
    share a double (DBL_DIG), so its repr is that decimal, and `CENT * c` is c/100 with exponent
    -2, as quantize makes it. (c == 0 is left out: -0.0 keeps its sign in `_money_exact`.)"""
    if not -1e13 < value < 1e13:    # (NaN too)
        return None
    c = round(value * 100)          # off by < 0.25 below 1e13 (ulps of value and of the product): round finds c
    if c and c / 100 == value:
        return CENT * c
    return None


def _money_exact(value) -> Decimal:
    """`money` without the cache or the shortcut: the definition."""
    amount = Decimal(value) if type(value) is int else Decimal(repr(value))
    if not amount.is_finite() or abs(amount) >= MAX_AMOUNT or amount.as_tuple().exponent < -2:
        raise ValueError
    return amount.quantize(CENT)


def _money(payload: dict, name: str) -> Decimal:
    try:
        return money(payload.get(name))
    except TypeError:
        raise _Invalid(f"payload.{name} must be a number" if name in payload else f"payload.{name} is missing") \
            from None
    except (ValueError, ArithmeticError):
        raise _Invalid(f"payload.{name} must have at most 2 decimals and 13 integer digits") from None


_hours: dict[str, bool] = {}
_seconds: dict[str, bool] = {}
_MILLIS = frozenset(f"{i:03d}" for i in range(1000))
_TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:[0-5]\d:[0-5]\d\.\d{3}", re.ASCII).fullmatch


def valid_time(ts) -> bool:
    """`YYYY-MM-DD HH:MM:SS.mmm` and a real instant; fixed width, so such strings sort as
    times do. Checked once per second seen (`_valid_time` of its first millisecond: whether
    the rest of a line's text is a time does not depend on its milliseconds), then its three
    ASCII digits of milliseconds looked up: events come many to a second."""
    if type(ts) is not str or len(ts) != TIME_LEN:
        return False
    head = ts[:20]
    ok = _seconds.get(head)
    if ok is None:
        ok = _valid_time(head + "000")
        if len(_seconds) > 100_000:
            _seconds.clear()
        _seconds[head] = ok
    return ok and ts[20:] in _MILLIS


def _valid_time(ts: str) -> bool:
    """valid_time without the cache: the pattern, then the calendar part once per hour seen."""
    if _TIME(ts) is None or ts < TIME_MIN:
        return False
    head = ts[:13]
    ok = _hours.get(head)
    if ok is None:
        try:
            ok = datetime.fromisoformat(head + ":00") is not None
        except ValueError:
            ok = False
        if len(_hours) > 10_000:
            _hours.clear()
        _hours[head] = ok
    return ok


def add_seconds(ts: str, seconds: float) -> str:
    """`ts` moved by `seconds`, kept within what DATETIME(3) holds (a return held at the
    end of year 9999 expires at its last instant instead of overflowing)."""
    try:
        moved = datetime.fromisoformat(ts) + timedelta(seconds=seconds)
    except OverflowError:
        return TIME_MAX if seconds > 0 else TIME_MIN
    return min(max(moved.strftime(TIME_FORMAT)[:-3], TIME_MIN), TIME_MAX)


# Fields of each event type: (name, kind); kinds: "order" signed 64-bit, "id" 0..2^63-1,
# "qty" 32-bit signed, "money" an amount, "bool". `shop_id` of a return is optional.
FIELDS = {
    PURCHASE: (("order_id", "order"), ("user_id", "id"), ("shop_id", "id"), ("good_id", "id"), ("qty", "qty"),
               ("price_at_order", "money")),
    RETURN: (("order_id", "order"), ("user_id", "id"), ("good_id", "id"), ("qty", "qty"),
             ("refund_amount", "money")),
    RESTOCK: (("shop_id", "id"), ("good_id", "id"), ("delta_count", "qty")),
    PRICE_CHANGE: (("shop_id", "id"), ("good_id", "id"), ("new_price", "money")),
    SHOP_STATUS: (("shop_id", "id"), ("active", "bool")),
}
_ORDER_MIN = -ID_MAX - 1


def _explain(etype: int, payload: dict) -> str:
    """Why a payload failed the fast checks (the slow path of `validate`)."""
    fields = FIELDS[etype]
    if etype == RETURN and payload.get("shop_id") is not None:
        fields = fields + (("shop_id", "id"),)
    try:
        for name, kind in fields:
            if kind == "order":
                _id(payload, name, signed=True)
            elif kind == "id":
                _id(payload, name)
            elif kind == "qty":
                _qty(payload, name)
            elif kind == "money":
                _money(payload, name)
            elif type(payload.get(name)) is not bool and not (type(payload.get(name)) is int
                                                              and payload.get(name) in (0, 1)):
                raise _Invalid(f"payload.{name} must be true or false")
    except _Invalid as exc:
        return str(exc)
    return "invalid payload"


def validate(raw: bytes, shard: int, shard_count: int, max_line_bytes: int = MAX_LINE_BYTES,
             max_depth: int = MAX_JSON_DEPTH) -> Event | Bad:
    """The event of a splitter line, or why it is not one: the fast path (`fast.py`) for an
    ordinary line, `validate_exact` for everything else; both give the same answer."""
    return validator(shard, shard_count, max_line_bytes, max_depth)(raw)


def validator(shard: int, shard_count: int, max_line_bytes: int = MAX_LINE_BYTES,
              max_depth: int = MAX_JSON_DEPTH):
    """`validate` for one shard and limits, a line at a time (`lines_validator`'s answer for
    a list of one: a held return's line, looked at again)."""
    many = lines_validator(shard, shard_count, max_line_bytes, max_depth)
    return lambda raw: many((raw,))[0]


def lines_validator(shard: int, shard_count: int, max_line_bytes: int = MAX_LINE_BYTES,
                    max_depth: int = MAX_JSON_DEPTH):
    """`validate` of each of a list of lines, for one shard and limits, as the worker calls it
    per batch: the fast path with `validate_exact` as its fallback (a partial with keywords
    built a dict of them for every call, and a check calling the fast path was a Python call
    more a line)."""
    def exact(raw: bytes) -> Event | Bad:
        return validate_exact(raw, shard, shard_count, max_line_bytes, max_depth)
    return fast_lines_validator(shard, shard_count, (max_line_bytes - PREPARED_EXTRA) // 8, exact)


def validate_fast(raw: bytes, shard: int, shard_count: int) -> Event | None:
    """The Event of a line msgspec decodes into the Structs of `fast.py` and whose payload
    prints back to its own bytes (then `Event.payload` is those bytes); None for any other
    line, whatever is wrong or unusual about it (a backslash in it, or a line far from
    MAX_LINE_BYTES, included)."""
    return fast_validator(shard, shard_count)(raw)


def _none(raw: bytes) -> None:
    return None


_HEAD64 = struct.Struct(">q").unpack_from   # int.from_bytes(digest[:8], "big", signed=True), for half its cost


def fast_validator(shard: int, shard_count: int, fast_up_to: int = 0, other=_none):
    """`validate_fast` for one shard, a line at a time: `fast_lines_validator`'s answer for a
    list of one."""
    many = fast_lines_validator(shard, shard_count, fast_up_to, other)
    return lambda raw: many((raw,))[0]


def fast_lines_validator(shard: int, shard_count: int, fast_up_to: int = 0, other=_none):
    """`validate_fast` of each of a list of lines, for one shard: one Python loop over the
    lines (a closure called per line from `map` was a call from C into Python each), everything
    it uses bound in the closure (a global and an attribute looked up per name and line were a
    tenth of it), the Event made with positional fields (keywords cost 0.08 µs more), and
    `valid_time`'s, `minute_of`'s and `money`'s caches asked inline, their functions called on a
    miss only; the dedup key's digest made inline (`fast.BLAKE2B_16`). A line it does not take,
    and one with a backslash or longer than `fast_up_to` bytes (when given), is answered by
    `other` (by default: None)."""
    line_decode, payloads, decode_error, encode = fast.LINE.decode, fast.PAYLOADS.get, fast.DecodeError, fast.ENCODE
    blake2b, key_text, unset, make, head64, raw_of = fast.BLAKE2B_16, fast.SORTED, fast.UNSET, Event, _HEAD64, msgspec.Raw
    purchase_key, return_key = f"{PURCHASE}:", f"{RETURN}:"
    seconds, millis, amounts, minutes = _seconds.get, _MILLIS, _amounts.get, _minutes.get
    up_to = fast_up_to or float("inf")

    def take(raws) -> list:
        out: list = []
        add = out.append
        for raw in raws:
            if type(raw) is not bytes or len(raw) > up_to or 92 in raw:
                add(other(raw))
                continue
            try:
                line = line_decode(raw)
                etype = line.event_type
                decoder = payloads(etype)
                if decoder is None:
                    add(other(raw))
                    continue
                body = line.payload
                p = decoder.decode(body)
            except (decode_error, ValueError):   # msgspec raises UnicodeDecodeError for bytes that are not UTF-8
                add(other(raw))
                continue
            ts = line.timestamp
            if len(ts) != TIME_LEN:
                add(other(raw))
                continue
            ok = seconds(ts[:20])
            if ok is None:
                ok = valid_time(ts)
            elif ok:
                ok = ts[20:] in millis
            if not ok or raw_of(encode(p)) != body:   # (Raw compares with a Raw only)
                add(other(raw))
                continue
            try:
                # Event's fields in order: etype, ts, payload_json, _payload, key, dkey, shop_id, user_id,
                # order_id, good_id, qty, amount, active
                if etype == PURCHASE:
                    order, shop = p.order_id, p.shop_id
                    if shop % shard_count != shard:
                        add(other(raw))
                        continue
                    value = p.price_at_order
                    amount = amounts(value)
                    add(make(PURCHASE, ts, body, None, f"{purchase_key}{order}", order, shop, p.user_id, order,
                             p.good_id, p.qty, money(value) if amount is None else amount))
                    continue
                if etype == RETURN:
                    order, shop = p.order_id, p.shop_id
                    if shop is unset:
                        shop = None
                    elif shop % shard_count != shard:
                        add(other(raw))
                        continue
                    value = p.refund_amount
                    amount = amounts(value)
                    add(make(RETURN, ts, body, None, f"{return_key}{order}", order, shop, p.user_id, order,
                             p.good_id, p.qty, money(value) if amount is None else amount))
                    continue
                shop = p.shop_id
                if shop % shard_count != shard:
                    add(other(raw))
                    continue
                h = blake2b()
                h.update(key_text([etype, p, ts]))
                digest = h.digest()
                minute = minutes(ts[:16])
                key, dkey = f"{etype}:h{digest.hex()}", (minute_of(ts) if minute is None else minute, head64(digest)[0])
                if etype == RESTOCK:
                    add(make(RESTOCK, ts, body, None, key, dkey, shop, None, None, p.good_id, p.delta_count))
                elif etype == PRICE_CHANGE:
                    add(make(PRICE_CHANGE, ts, body, None, key, dkey, shop, None, None, p.good_id, None,
                             money(p.new_price)))
                else:
                    add(make(SHOP_STATUS, ts, body, None, key, dkey, shop, None, None, None, None, None, p.active))
            except (TypeError, ValueError, ArithmeticError):
                add(other(raw))
        return out
    return take


def validate_exact(raw: bytes, shard: int, shard_count: int, max_line_bytes: int = MAX_LINE_BYTES,
                   max_depth: int = MAX_JSON_DEPTH) -> Event | Bad:
    """The event of a splitter line, or why it is not one. One combined test per event type;
    `_explain` names the problem of a line that fails it. Nothing a line holds raises out of
    here: a line over the limits is a Bad too, so every event accepted can be hashed, printed
    and stored by the stages after this one."""
    if type(raw) is TooLarge:
        return Bad(TOO_LARGE, raw.detail)
    if too_deep(raw, max_depth):
        return Bad(MALFORMED, f"nested deeper than {max_depth} levels (MAX_JSON_DEPTH)")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return Bad(MALFORMED, "not valid JSON")
    if type(obj) is not dict:
        return Bad(MALFORMED, "not a JSON object")
    payload, etype, ts = obj.get("payload"), obj.get("event_type"), obj.get("timestamp")
    if type(payload) is not dict:
        return Bad(MALFORMED, "payload must be an object")
    if type(etype) is not int or not 0 <= etype <= 4:
        return Bad(MALFORMED, f"unknown event_type {etype!r}")
    if not valid_time(ts):
        return Bad(MALFORMED, "timestamp must be 'YYYY-MM-DD HH:MM:SS.mmm'")
    ev = Event(etype=etype, ts=ts, _payload=payload)
    get = payload.get
    try:
        if etype == PURCHASE:
            order, user, shop, good, qty = get("order_id"), get("user_id"), get("shop_id"), get("good_id"), get("qty")
            if not (type(order) is int and type(user) is int and type(shop) is int and type(good) is int
                    and type(qty) is int and _ORDER_MIN <= order <= ID_MAX and 0 <= user <= ID_MAX
                    and 0 <= shop <= ID_MAX and 0 <= good <= ID_MAX and -QTY_MAX <= qty <= QTY_MAX):
                return Bad(MALFORMED, _explain(etype, payload))
            ev.order_id, ev.user_id, ev.shop_id, ev.good_id, ev.qty = order, user, shop, good, qty
            ev.amount = money(get("price_at_order"))
        elif etype == RETURN:
            order, user, shop, good, qty = get("order_id"), get("user_id"), get("shop_id"), get("good_id"), get("qty")
            if not (type(order) is int and type(user) is int and type(good) is int and type(qty) is int
                    and _ORDER_MIN <= order <= ID_MAX and 0 <= user <= ID_MAX and 0 <= good <= ID_MAX
                    and -QTY_MAX <= qty <= QTY_MAX and (shop is None or (type(shop) is int and 0 <= shop <= ID_MAX))):
                return Bad(MALFORMED, _explain(etype, payload))
            ev.order_id, ev.user_id, ev.shop_id, ev.good_id, ev.qty = order, user, shop, good, qty
            ev.amount = money(get("refund_amount"))
        elif etype == RESTOCK:
            shop, good, delta = get("shop_id"), get("good_id"), get("delta_count")
            if not (type(shop) is int and type(good) is int and type(delta) is int and 0 <= shop <= ID_MAX
                    and 0 <= good <= ID_MAX and -QTY_MAX <= delta <= QTY_MAX):
                return Bad(MALFORMED, _explain(etype, payload))
            ev.shop_id, ev.good_id, ev.qty = shop, good, delta
        elif etype == PRICE_CHANGE:
            shop, good = get("shop_id"), get("good_id")
            if not (type(shop) is int and type(good) is int and 0 <= shop <= ID_MAX and 0 <= good <= ID_MAX):
                return Bad(MALFORMED, _explain(etype, payload))
            ev.shop_id, ev.good_id = shop, good
            ev.amount = money(get("new_price"))
        else:
            shop, active = get("shop_id"), get("active")
            if type(active) is int and active in (0, 1):
                active = bool(active)
            if not (type(shop) is int and 0 <= shop <= ID_MAX and type(active) is bool):
                return Bad(MALFORMED, _explain(etype, payload))
            ev.shop_id, ev.active = shop, active
    except (TypeError, ValueError, ArithmeticError):
        return Bad(MALFORMED, _explain(etype, payload))
    if ev.shop_id is not None and ev.shop_id % shard_count != shard:
        return Bad(WRONG_SHARD, f"shop_id {ev.shop_id} belongs to shard {ev.shop_id % shard_count}")
    if len(raw) * 8 + PREPARED_EXTRA > max_line_bytes:
        size = len(orjson.dumps(payload)) + PREPARED_EXTRA
        if size > max_line_bytes:
            return Bad(TOO_LARGE, f"its prepared line would be up to {size} bytes, over the limit of "
                                  f"{max_line_bytes} (MAX_LINE_BYTES)")
    set_keys(ev)
    return ev


_EPOCH = datetime(1970, 1, 1)
_MINUTE = timedelta(minutes=1)
_INT_MIN, _INT_MAX = -(1 << 31), (1 << 31) - 1
_minutes: dict[str, int] = {}


def minute_of(ts: str) -> int:
    """The state tables' time bucket of an event (`bucket`, db/migrations/worker/0003): whole
    minutes since 1970-01-01, clamped to what an INT holds (years before -2000 and after 6053
    share the ends). Remembered per minute seen."""
    head = ts[:16]
    m = _minutes.get(head)
    if m is None:
        m = min(max((datetime.fromisoformat(head) - _EPOCH) // _MINUTE, _INT_MIN), _INT_MAX)
        if len(_minutes) > 100_000:
            _minutes.clear()
        _minutes[head] = m
    return m


def set_keys(ev: Event) -> None:
    """The event's business key (exactly `app.events.event_key`'s text, which the prepared
    line carries) and its dedup key: a return's order id, or for the others the minute and the
    first 8 bytes (signed) of the same digest the text shows."""
    etype = ev.etype
    if etype == PURCHASE or etype == RETURN:
        ev.key = f"{etype}:{ev.order_id}"
        ev.dkey = ev.order_id
        return
    digest = hashlib.blake2b(orjson.dumps([etype, ev.payload, ev.ts], option=orjson.OPT_SORT_KEYS),
                             digest_size=16).digest()
    ev.key = f"{etype}:h{digest.hex()}"
    ev.dkey = (minute_of(ev.ts), int.from_bytes(digest[:8], "big", signed=True))


# -- decisions on state ------------------------------------------------------------------------

def amounts_check(ev: Event, rules: Rules) -> int:
    """Prices and quantities must be positive (RULE_POSITIVE_PRICE)."""
    if not rules.positive_price:
        return ACCEPTED
    amount = ev.amount
    if amount is not None and amount <= ZERO:
        return NON_POSITIVE_PRICE
    if (ev.etype == PURCHASE or ev.etype == RETURN) and ev.qty <= 0:
        return NON_POSITIVE_QTY
    return ACCEPTED


def stock_change(count: int, delta: int, rules: Rules) -> int:
    """A restock, defect or loss moves stock by its signed `delta_count`."""
    if rules.stock and count + delta < 0:
        return NEGATIVE_STOCK
    return ACCEPTED


def purchase(ev: Event, balance: Decimal, shop_active: bool, stock: int | None, rules: Rules) -> int:
    """A purchase debits price_at_order (the line total) from its user's one balance."""
    code = amounts_check(ev, rules)
    if code:
        return code
    if rules.shop_active and not shop_active:
        return SHOP_INACTIVE
    if rules.purchase_takes_stock and rules.stock and (stock or 0) < ev.qty:
        return NEGATIVE_STOCK
    left = balance - ev.amount
    if rules.balance and left < ZERO:
        return INSUFFICIENT_BALANCE
    if left < BALANCE_MIN:   # with RULE_BALANCE off: what the balance column cannot hold
        return INSUFFICIENT_BALANCE
    return ACCEPTED


def buyer_of(user_id: int, good_id: int) -> int:
    """What the ledger keeps of a purchase's user and good (worker_orders.buyer): a return only
    checks both for equality, so one 8-byte digest does (the first 8 bytes of MD5 of "user good",
    signed; db/migrations/worker/0004 computes the same in SQL)."""
    return _HEAD64(_md5(b"%d %d" % (user_id, good_id)).digest())[0]


class Order(msgspec.Struct, gc=False, eq=False):
    """A decided purchase, as a return is checked against it: debited when it was accepted,
    credited once its return was (`credit` not None). One read from the ledger has no user
    and good (None), only their digest `buyer`. A Struct, as `Event` is: made in one C call
    (a class with __slots__ and an __init__ cost 0.3 µs more per purchase decided)."""

    order_id: int
    user_id: Optional[int]
    amount: Any
    shop_id: int
    good_id: Optional[int]
    qty: int
    debited: bool
    credit: Any = None
    line: int = 0               # decided by this batch, there
    stored_at: Any = None       # (file id, line) of its ledger row, for one read from the database
    buyer: Optional[int] = None


def refund(ev: Event, order: Order, rules: Rules, shard: int, shard_count: int) -> int:
    """A return of an accepted purchase credits refund_amount, at most once per order and never
    more than the purchase's amount. It is output with its purchase's shop, which must be on
    this shard (the sender refuses a row of another shard)."""
    code = amounts_check(ev, rules)
    if code:
        return code
    if order.shop_id % shard_count != shard:
        return WRONG_SHARD
    if order.user_id is None:
        mismatch = buyer_of(ev.user_id, ev.good_id) != order.buyer
    else:
        mismatch = ev.user_id != order.user_id or ev.good_id != order.good_id
    if mismatch or (ev.shop_id is not None and ev.shop_id != order.shop_id):
        return RETURN_MISMATCH
    if order.credit is not None:
        return ALREADY_REFUNDED
    if rules.refund_limit and (ev.amount > order.amount or ev.qty > order.qty):
        return REFUND_EXCEEDS
    return ACCEPTED
