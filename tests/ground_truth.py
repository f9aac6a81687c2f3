"""What the pipeline must make of a set of input files, computed independently of app/.

A small sequential model of the documented rules (docs/splitter.md, docs/business-rules.md):
it reads the source files in registration order and says, for every line, whether it is
rejected by the splitter (and why), rejected by the worker (and why), or accepted — and, for
the accepted ones, the exact row the shard database must hold. It shares no code with the
services, so a bug in a service shows up as a disagreement here.

The generator keeps its ordinary data valid in any order the shard workers apply them, so one
sequential pass gives the same answer as two workers running side by side.
"""
from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path

SUFFIX = ".event-ingest.txt"
ORDER_TYPES = (1, 3)
BOM = b"\xef\xbb\xbf"
MAX_LINE_BYTES = 1 << 20      # the defaults of MAX_LINE_BYTES and MAX_JSON_DEPTH
MAX_JSON_DEPTH = 32
ID_MAX, QTY_MAX = (1 << 63) - 1, (1 << 31) - 1
TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}")


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _json(text: bytes):
    return json.loads(text, parse_float=Decimal, parse_constant=_no_constant)


def _depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def _worker_malformed(ev: dict) -> bool:
    """A routed line the worker must reject as `malformed` (docs/business-rules.md: the event's
    fields, its timestamp, its nesting), checked before any rule."""
    if _depth(ev) > MAX_JSON_DEPTH:
        return True
    ts = ev.get("timestamp")
    if not isinstance(ts, str) or not TIME.fullmatch(ts) or ts < "1000":
        return True
    try:
        datetime.strptime(ts, "%Y-%m-%d %H:%M:%S.%f")
    except ValueError:
        return True
    p = ev["payload"]

    def whole(name, lo, hi, optional=False):
        v = p.get(name)
        return (optional and v is None) or (type(v) is int and lo <= v <= hi)

    def money(name):
        v = p.get(name)
        if type(v) is int:
            v = Decimal(v)
        return isinstance(v, Decimal) and v.is_finite() and abs(v) < Decimal("1e13") and v.as_tuple().exponent >= -2
    ids = {name: whole(name, 0, ID_MAX) for name in ("user_id", "shop_id", "good_id")}
    t = ev["event_type"]
    if t == 0:
        ok = ids["shop_id"] and ids["good_id"] and whole("delta_count", -QTY_MAX, QTY_MAX)
    elif t in ORDER_TYPES:
        ok = (whole("order_id", -ID_MAX - 1, ID_MAX) and ids["user_id"] and ids["good_id"]
              and whole("qty", -QTY_MAX, QTY_MAX) and money("price_at_order" if t == 1 else "refund_amount")
              and (ids["shop_id"] if t == 1 else whole("shop_id", 0, ID_MAX, optional=True)))
    elif t == 2:
        ok = ids["shop_id"] and ids["good_id"] and money("new_price")
    else:
        ok = ids["shop_id"] and (type(p.get("active")) is bool or p.get("active") in (0, 1))
    return not ok


def file_lines(path: Path) -> tuple[list[bytes], bool]:
    """A source file's lines as the splitter reads them (split at `\n` only; a last line
    without one gets one), and whether a leading BOM was skipped."""
    data = path.read_bytes()
    bom = data.startswith(BOM)
    lines = data[len(BOM) if bom else 0:].split(b"\n")
    last = lines.pop()
    return [line + b"\n" for line in lines] + ([last + b"\n"] if last else []), bom


def canonical(payload: dict) -> str:
    return json.dumps(payload, sort_keys=True, default=str)


@dataclass
class Truth:
    shard_count: int
    # (filename, line_no in the source file) -> "accepted" | reason
    fate: dict[tuple[str, int], str] = field(default_factory=dict)
    # shard -> Counter of row tuples the shard's `events` table must hold
    rows: dict[int, Counter] = field(default_factory=lambda: defaultdict(Counter))
    splitter_rejected: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    # (filename, shard) -> Counter of worker reasons, and accepted count (released ones included)
    worker_rejected: dict[tuple[str, int], Counter] = field(default_factory=lambda: defaultdict(Counter))
    worker_accepted: Counter = field(default_factory=Counter)
    worker_in: Counter = field(default_factory=Counter)
    shard_lines: dict[tuple[str, int], list[bytes]] = field(default_factory=lambda: defaultdict(list))
    balances: dict[int, Decimal] = field(default_factory=dict)
    opening_balance: Decimal = Decimal("1000.00")
    pending_holds: int = 0

    def accepted_total(self) -> int:
        return sum(sum(c.values()) for c in self.rows.values())


def row_tuple(event_type, shop_id, user_id, timestamp: str, order_id, good_id, qty, amount, payload: dict,
              source_file: str) -> tuple:
    amount = None if amount is None else Decimal(str(amount)).quantize(Decimal("0.01"))
    return (event_type, shop_id, user_id, timestamp, order_id, good_id, qty, amount, canonical(payload),
            source_file)


def compute(files: list[Path], shard_count: int = 2, opening_balance: Decimal = Decimal("1000.00")) -> Truth:
    truth = Truth(shard_count, opening_balance=opening_balance)
    order_shop: dict[int, int] = {}          # purchases seen by the splitter (routing)
    seen_keys: dict[int, set] = defaultdict(set)
    orders: dict[int, dict] = {}             # order_id -> purchase decision
    credited: set[int] = set()
    holds: dict[int, list] = defaultdict(list)  # order_id -> held returns
    stock: Counter = Counter()
    inactive: set[int] = set()
    balance: dict[int, Decimal] = {}

    def bal(user: int) -> Decimal:
        return balance.setdefault(user, opening_balance)

    def accept(shard, filename, ev, shop_id, amount):
        p = ev["payload"]
        t = ev["event_type"]
        qty = p.get("qty") if t in ORDER_TYPES else (p.get("delta_count") if t == 0 else None)
        truth.rows[shard][row_tuple(t, shop_id, p.get("user_id") if t in ORDER_TYPES else None, ev["timestamp"],
                                    p.get("order_id") if t in ORDER_TYPES else None,
                                    p.get("good_id"), qty, amount, p, filename)] += 1
        truth.worker_accepted[(filename, shard)] += 1

    def decide_return(shard, filename, ev, released: bool) -> str:
        """A return whose purchase is known; `released`: it was held until now."""
        p = ev["payload"]
        purchase = orders[p["order_id"]]
        if not purchase["accepted"]:
            fate = "purchase_rejected"
        elif p["refund_amount"] > purchase["amount"] or p["qty"] > purchase["qty"]:
            fate = "refund_exceeds_purchase"
        elif p["order_id"] in credited:
            fate = "already_refunded"
        else:
            fate = "accepted"
            credited.add(p["order_id"])
            balance[purchase["user"]] = bal(purchase["user"]) + p["refund_amount"]
            accept(shard, filename, ev, purchase["shop"], p["refund_amount"])
        if fate != "accepted" and released:
            truth.worker_rejected[(filename, shard)][fate] += 1
        return fate

    for path in sorted(files, key=lambda q: q.name):
        filename = path.name[: -len(SUFFIX)]
        lines, _ = file_lines(path)
        # -- the splitter --------------------------------------------------------------------
        routed: list[tuple[int, int, dict]] = []
        for no, line in enumerate(lines, 1):
            if len(line) - 1 > MAX_LINE_BYTES:
                truth.fate[(filename, no)] = "too_large"
                truth.splitter_rejected[filename]["too_large"] += 1
                continue
            if not line.strip():
                truth.fate[(filename, no)] = "empty_line"
                truth.splitter_rejected[filename]["empty_line"] += 1
                continue
            try:
                ev = None if line.startswith(BOM) else _json(line)   # past the start, a BOM is data
            except (ValueError, RecursionError):                     # too deep for any parser: malformed
                ev = None
            if not isinstance(ev, dict) or not isinstance(ev.get("payload"), dict):
                reason = "malformed_json"
            else:
                t, p = ev.get("event_type"), ev["payload"]
                shop = p.get("shop_id")
                if not (type(t) is int and 0 <= t <= 4):
                    reason = "unknown_event_type"
                elif t == 3 and shop is None:
                    shop = order_shop.get(p.get("order_id"))
                    reason = None if shop is not None else "unroutable"
                elif shop is None:
                    reason = "missing_shop_id"
                elif type(shop) is not int:
                    reason = "non_integer_shop_id"
                elif not 0 <= shop <= ID_MAX:
                    reason = "shop_id_out_of_range"
                else:
                    reason = None
                if reason is None and t == 1 and type(p.get("order_id")) is int \
                        and -ID_MAX - 1 <= p["order_id"] <= ID_MAX:
                    order_shop.setdefault(p["order_id"], shop)
            if reason:
                truth.fate[(filename, no)] = reason
                truth.splitter_rejected[filename][reason] += 1
                continue
            shard = shop % shard_count
            truth.shard_lines[(filename, shard)].append(line)
            routed.append((no, shard, ev))
        # -- the workers ---------------------------------------------------------------------
        for no, shard, ev in routed:
            truth.worker_in[(filename, shard)] += 1
            if _worker_malformed(ev):   # rejected before any rule: no state, no key
                truth.fate[(filename, no)] = "malformed"
                truth.worker_rejected[(filename, shard)]["malformed"] += 1
                continue
            t, p = ev["event_type"], ev["payload"]
            key = (t, p["order_id"]) if t in ORDER_TYPES else (t, canonical(p), ev["timestamp"])
            if key in seen_keys[shard]:
                fate = "duplicate"
            else:
                seen_keys[shard].add(key)
                fate = _decide(t, p, ev, shard, filename, orders, holds, stock, inactive, bal, balance,
                               accept, decide_return, no)
            truth.fate[(filename, no)] = fate
            if fate not in ("accepted", "held"):
                truth.worker_rejected[(filename, shard)][fate] += 1
    truth.pending_holds = sum(len(v) for v in holds.values())
    truth.balances = dict(balance)
    return truth


def _decide(t, p, ev, shard, filename, orders, holds, stock, inactive, bal, balance, accept, decide_return, no):
    if t == 0:
        k = (p["shop_id"], p["good_id"])
        if stock[k] + p["delta_count"] < 0:
            return "negative_stock"
        stock[k] += p["delta_count"]
        accept(shard, filename, ev, p["shop_id"], None)
        return "accepted"
    if t == 2:
        if p["new_price"] <= 0:
            return "non_positive_price"
        accept(shard, filename, ev, p["shop_id"], p["new_price"])
        return "accepted"
    if t == 4:
        (inactive.discard if p["active"] else inactive.add)(p["shop_id"])
        accept(shard, filename, ev, p["shop_id"], None)
        return "accepted"
    if t == 1:
        amount = p["price_at_order"]
        if amount <= 0:
            fate = "non_positive_price"
        elif p["qty"] <= 0:
            fate = "non_positive_qty"
        elif p["shop_id"] in inactive:
            fate = "shop_inactive"
        elif bal(p["user_id"]) - amount < 0:
            fate = "insufficient_balance"
        else:
            fate = "accepted"
        orders[p["order_id"]] = {"accepted": fate == "accepted", "amount": amount, "qty": p["qty"],
                                 "user": p["user_id"], "shop": p["shop_id"]}
        if fate == "accepted":
            balance[p["user_id"]] = bal(p["user_id"]) - amount
            accept(shard, filename, ev, p["shop_id"], amount)
        for held_file, held_no, held_ev, fates in holds.pop(p["order_id"], []):
            # A released return belongs to the file being processed now.
            fates[(held_file, held_no)] = decide_return(shard, filename, held_ev, True)
        return fate
    # a return
    if p["order_id"] in orders:
        return decide_return(shard, filename, ev, False)
    return _Hold(holds, p["order_id"], filename, no, ev)


class _Hold(str):
    """The fate 'held'; remembers where the decision must be written when it is released."""

    def __new__(cls, holds, order_id, filename, no, ev):
        obj = super().__new__(cls, "held")
        obj.fates = {}
        holds[order_id].append((filename, no, ev, obj.fates))
        return obj


def resolved_fates(truth: Truth) -> dict[tuple[str, int], str]:
    """Every line's final fate: a held return takes the fate it got when released."""
    out = {}
    for where, fate in truth.fate.items():
        if isinstance(fate, _Hold):
            out[where] = fate.fates.get(where, "held")
        else:
            out[where] = str(fate)
    return out
