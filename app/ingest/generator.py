"""The event generator's data model: coherent shops, stock, prices, users and orders, written
in the contract's exact line format, with the faults the pipeline must handle injected at
configurable rates. A seed makes the bytes reproducible.

Coherence is kept conservative so the data stay valid in ANY order the shard workers apply
them (shards run independently): a user's spendable money counts debits but never refunds,
stock counts purchases but never returns, and a shop holding a delayed purchase is never
deactivated. So every event not injected as a fault is accepted by the worker's rules, and
every injected fault is recorded in `Generator.truth` with what should become of it.
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import BinaryIO, Mapping

import orjson

from .. import layout
from ..safefiles import Folder, under

TICK_FORMAT = "%Y%m%d%H%M%S"
# Source files are the contract's interface: other tools (an original splitter) may read them.
SOURCE_MODE = 0o644
ORDER_ID_RANGE = (2**53, 2**63)   # like the original's: above 2^53, so a float would corrupt them


@dataclass(frozen=True)
class Rates:
    """Per-line probabilities of each injected case (0 <= rate, sum < 1)."""

    duplicate: float = 0.01           # an exact copy of an earlier line of the same file
    later_duplicate: float = 0.01     # a purchase of an earlier file, again
    return_first: float = 0.01        # a return written just before its purchase (same file)
    return_first_later: float = 0.005  # a return written one file before its purchase
    over_balance: float = 0.005       # a purchase beyond any balance the user can have
    malformed: float = 0.005          # broken JSON, bad or missing shop_id, unknown event_type
    unroutable_return: float = 0.005  # a return without shop_id of an order never seen (the original's)
    shopless_return: float = 0.0      # a real return without shop_id (routed by its order)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def env_name(cls, name: str) -> str:
        return f"INGEST_RATE_{name.upper()}"

    def replace(self, changes: Mapping[str, float]) -> "Rates":
        unknown = set(changes) - set(self.names())
        if unknown:
            raise ValueError(f"unknown rate(s) {sorted(unknown)}; known: {', '.join(self.names())}")
        values = {**{n: getattr(self, n) for n in self.names()}, **changes}
        return Rates(**values)

    def __post_init__(self):
        for name in self.names():
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"rate {name} must be in [0, 1), got {value!r}")
        if sum(getattr(self, n) for n in self.names()) >= 0.9:
            raise ValueError("the rates add up to 0.9 or more: too few ordinary events left")


NO_FAULTS = Rates(**{n: 0.0 for n in Rates.names()})

# Malformed kinds and the splitter's reason for each (app/splitter/reasons.py).
MALFORMED_KINDS = {"truncated": "malformed_json", "string_shop_id": "non_integer_shop_id",
                   "unknown_type": "unknown_event_type", "no_shop_id": "missing_shop_id"}


# Cases whose lines an exact duplicate must not copy (its fate would no longer be `duplicate`).
NOT_REPEATED = {"malformed", "unroutable_return", "over_balance", "shopless_return"}


@dataclass
class Injected:
    """One injected case: where it is and what the pipeline should make of it."""

    filename: str
    line_no: int
    kind: str
    expect: str               # splitter reason, or the worker's outcome
    order_id: int | None = None
    related: tuple[str, int] | None = None   # the other line of the case (filename, line_no)

    def as_dict(self) -> dict:
        return {"filename": self.filename, "line_no": self.line_no, "kind": self.kind, "expect": self.expect,
                "order_id": self.order_id, "related": list(self.related) if self.related else None}


@dataclass
class _Purchase:
    order_id: int
    user_id: int
    shop_id: int
    good_id: int
    qty: int
    unit_cents: int
    ts: int
    line: bytes = b""
    filename: str = ""
    returned: bool = False


def tick_of(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime(TICK_FORMAT)


def parse_tick(tick: str) -> datetime:
    return datetime.strptime(tick, TICK_FORMAT).replace(tzinfo=timezone.utc)


def _money(cents: int) -> float:
    """The original writes amounts as JSON numbers (199.99); cents/100 prints exactly so."""
    return cents / 100


@dataclass
class World:
    shops: int = 20
    goods: int = 10
    users: int = 200


class Generator:
    """Generates files one after another; the state carries over from file to file."""

    def __init__(self, seed: int | None = None, rates: Rates | None = None,
                 opening_balance: Decimal = Decimal("1000.00"), world: World | None = None):
        self.seed = seed if seed is not None else random.SystemRandom().randrange(2**63)
        self.rng = random.Random(self.seed)
        self.rates = rates or Rates()
        self.world = world or World()
        self.opening_cents = int(opening_balance * 100)
        w = self.world
        self.active = {s: True for s in range(1, w.shops + 1)}
        self.stock = {(s, g): 0 for s in range(1, w.shops + 1) for g in range(1, w.goods + 1)}
        self.price = {(s, g): self.rng.randrange(500, 30000) for s in range(1, w.shops + 1)
                      for g in range(1, w.goods + 1)}
        self.spendable: dict[int, int] = {u: self.opening_cents for u in range(1, w.users + 1)}
        self.next_user = w.users + 1
        self.recent: list[_Purchase] = []        # open orders, for returns (bounded)
        self.history: list[_Purchase] = []       # purchases of earlier files, for later duplicates
        self.delayed: list[_Purchase] = []       # purchases whose return was written in the last file
        self.locked_shops: dict[int, int] = {}   # shop -> delayed purchases it holds
        self.clock_ms = 0
        self.truth: list[Injected] = []
        self._second_cache: tuple[int, str] = (-1, "")

    # -- formatting ------------------------------------------------------------------------

    def _time(self, ms: int) -> str:
        second, milli = divmod(ms, 1000)
        if self._second_cache[0] != second:
            text = datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
            self._second_cache = (second, text)
        return f"{self._second_cache[1]}.{milli:03d}"

    def _line(self, event_type, payload: dict, ts: int) -> bytes:
        return orjson.dumps({"event_type": event_type, "payload": payload, "saved_at": self._saved_at,
                             "timestamp": self._time(ts)}) + b"\n"

    def _tick(self) -> int:
        self.clock_ms += 1
        return self.clock_ms

    # -- ordinary events ---------------------------------------------------------------------

    def _restock(self, shop: int | None = None, good: int | None = None) -> bytes:
        rng = self.rng
        shop = shop or rng.randint(1, self.world.shops)
        good = good or rng.randint(1, self.world.goods)
        have = self.stock[(shop, good)]
        kind = rng.choices(("restock", "defect", "loss"), (8, 1, 1))[0]
        if kind == "restock" or have == 0:
            kind, delta = "restock", rng.randint(1, 20)
        else:
            delta = -rng.randint(1, min(have, 3))
        self.stock[(shop, good)] = have + delta
        return self._line(0, {"shop_id": shop, "good_id": good, "delta_count": delta, "reason": "generator",
                              "sub_event_type": kind}, self._tick())

    def _price_change(self) -> bytes:
        rng = self.rng
        key = (rng.randint(1, self.world.shops), rng.randint(1, self.world.goods))
        new = max(100, self.price[key] + rng.randint(-1000, 1000))
        self.price[key] = new
        return self._line(2, {"shop_id": key[0], "good_id": key[1], "new_price": _money(new)}, self._tick())

    def _shop_status(self) -> bytes:
        rng = self.rng
        shop = rng.randint(1, self.world.shops)
        active_now = sum(self.active.values())
        if self.active[shop] and (shop in self.locked_shops or active_now <= self.world.shops * 0.7):
            shop = rng.choice([s for s, a in self.active.items() if not a] or [shop])
            self.active[shop] = True
        else:
            self.active[shop] = not self.active[shop]
        return self._line(4, {"shop_id": shop, "active": self.active[shop]}, self._tick())

    def _new_purchase(self) -> _Purchase | None:
        """A purchase the rules accept: active shop, stock, money; the model is updated."""
        rng = self.rng
        shop = rng.randint(1, self.world.shops)
        if not self.active[shop]:
            return None
        good = rng.randint(1, self.world.goods)
        qty = rng.randint(1, 3)
        if self.stock[(shop, good)] < qty:
            return None
        unit = self.price[(shop, good)]
        user = rng.randint(1, self.next_user - 1)
        if self.spendable[user] < unit * qty:
            user = self.next_user            # a new customer, with the opening balance
            self.next_user += 1
            self.spendable[user] = self.opening_cents
            if self.spendable[user] < unit * qty:
                return None
        self.spendable[user] -= unit * qty
        self.stock[(shop, good)] -= qty
        return _Purchase(rng.randrange(*ORDER_ID_RANGE), user, shop, good, qty, unit, self._tick())

    def _purchase_line(self, p: _Purchase) -> bytes:
        return self._line(1, {"order_id": p.order_id, "user_id": p.user_id, "shop_id": p.shop_id,
                              "good_id": p.good_id, "qty": p.qty, "price_at_order": _money(p.unit_cents * p.qty)},
                          p.ts)

    def _return_line(self, p: _Purchase, with_shop: bool = True, ts: int | None = None) -> bytes:
        qty = self.rng.randint(1, p.qty)
        payload = {"order_id": p.order_id, "user_id": p.user_id}
        if with_shop:
            payload["shop_id"] = p.shop_id
        payload.update(good_id=p.good_id, qty=qty, refund_amount=_money(p.unit_cents * qty))
        p.returned = True
        return self._line(3, payload, ts or self._tick())

    def _remember(self, p: _Purchase) -> None:
        self.recent.append(p)
        if len(self.recent) > 4000:
            del self.recent[:1000]

    def _ordinary(self) -> bytes:
        rng = self.rng
        kind = rng.choices(("restock", "purchase", "price", "return", "status"), (20, 45, 10, 17, 8))[0]
        if kind == "purchase":
            p = self._new_purchase()
            if p is None:
                return self._restock()
            p.line, p.filename = self._purchase_line(p), self._filename
            self._remember(p)
            return p.line
        if kind == "return":
            p = self._open_order()
            return self._return_line(p) if p else self._restock()
        if kind == "price":
            return self._price_change()
        if kind == "status":
            return self._shop_status()
        return self._restock()

    def _open_order(self) -> _Purchase | None:
        for _ in range(4):
            if not self.recent:
                return None
            i = self.rng.randrange(len(self.recent))
            p = self.recent[i]
            if not p.returned and p.line:
                return p
            self.recent[i] = self.recent[-1]
            self.recent.pop()
        return None

    # -- injected cases ------------------------------------------------------------------------

    def _note(self, kind: str, expect: str, order_id: int | None = None, related=None, offset: int = 0) -> None:
        self.truth.append(Injected(self._filename, self._n + 1 + offset, kind, expect, order_id, related))

    def _inject(self, kind: str, room: int, last_file: bool) -> list[bytes] | None:
        rng = self.rng
        if kind == "duplicate":
            if not self._file_lines:
                return None
            line = rng.choice(self._file_lines)
            self._note("duplicate", "duplicate")
            return [line]
        if kind == "later_duplicate":
            if not self.history:
                return None
            p = rng.choice(self.history)
            self._note("later_duplicate", "duplicate", p.order_id)
            return [orjson.dumps({**orjson.loads(p.line), "saved_at": self._saved_at}) + b"\n"]
        if kind in ("return_first", "return_first_later"):
            later = kind == "return_first_later"
            if (not later and room < 2) or (later and last_file):
                return None
            p = self._new_purchase()
            if p is None:
                return None
            p.line, p.filename = self._purchase_line(p), self._filename
            r = self._return_line(p, ts=self._tick())
            if later:
                self.delayed.append(p)
                self.locked_shops[p.shop_id] = self.locked_shops.get(p.shop_id, 0) + 1
                self._note(kind, "accepted", p.order_id)
            else:
                self._note(kind, "accepted", p.order_id, (self._filename, self._n + 2))
                self._remember(p)
                return [r, p.line]
            return [r]
        if kind == "over_balance":
            shop = rng.choice([s for s, a in self.active.items() if a])
            good = rng.randint(1, self.world.goods)
            unit = self.price[(shop, good)]
            limit = 2 * self.opening_cents + 1   # above any balance in any order of application
            qty = -(-limit // unit)
            user = rng.randint(1, self.next_user - 1)
            order = rng.randrange(*ORDER_ID_RANGE)
            self._note("over_balance", "insufficient_balance", order)
            return [self._line(1, {"order_id": order, "user_id": user, "shop_id": shop, "good_id": good,
                                   "qty": qty, "price_at_order": _money(unit * qty)}, self._tick())]
        if kind == "malformed":
            how = rng.choice(sorted(MALFORMED_KINDS))
            shop, good = rng.randint(1, self.world.shops), rng.randint(1, self.world.goods)
            ts = self._tick()
            if how == "truncated":
                line = self._line(0, {"shop_id": shop, "good_id": good, "delta_count": 1, "reason": "generator",
                                      "sub_event_type": "restock"}, ts)
                line = line[: rng.randint(5, len(line) - 10)] + b"\n"
            elif how == "string_shop_id":
                line = self._line(2, {"shop_id": str(shop), "good_id": good, "new_price": 1.0}, ts)
            elif how == "unknown_type":
                line = self._line(9, {"shop_id": shop, "good_id": good}, ts)
            else:
                line = self._line(2, {"good_id": good, "new_price": 1.0}, ts)
            self._note(f"malformed:{how}", MALFORMED_KINDS[how])
            return [line]
        if kind == "unroutable_return":
            order = rng.randrange(*ORDER_ID_RANGE)
            self._note("unroutable_return", "unroutable", order)
            return [self._line(3, {"order_id": order, "user_id": rng.randint(1, self.next_user - 1),
                                   "good_id": rng.randint(1, self.world.goods), "qty": 1, "refund_amount": 9.99},
                               self._tick())]
        if kind == "shopless_return":
            p = self._open_order()
            if p is None:
                return None
            self._note("shopless_return", "accepted", p.order_id)
            return [self._return_line(p, with_shop=False)]
        raise ValueError(kind)

    # -- files -----------------------------------------------------------------------------------

    def write(self, out: BinaryIO, filename: str, lines: int, last_file: bool = False) -> int:
        """Write one file's lines to `out`; returns how many were written (at least `lines`,
        more only if purchases delayed from the last file do not fit)."""
        self._filename = filename
        tick_ms = int(parse_tick(filename).timestamp()) * 1000 if filename.isdigit() else int(time.time() * 1000)
        self.clock_ms = max(self.clock_ms, tick_ms)
        self._saved_at = self._time(tick_ms)
        self._n = 0
        self._file_lines: list[bytes] = []
        for p in self.delayed:
            p.line, p.filename = self._purchase_line(p), filename
            self._emit(out, p.line)
            self._remember(p)
            self.locked_shops[p.shop_id] -= 1
            if not self.locked_shops[p.shop_id]:
                del self.locked_shops[p.shop_id]
        self.delayed = []
        names = Rates.names()
        weights = [getattr(self.rates, n) for n in names]
        while self._n < lines:
            pick, acc = self.rng.random(), 0.0
            chosen = None
            for name, w in zip(names, weights):
                acc += w
                if pick < acc:
                    chosen = name
                    break
            produced = self._inject(chosen, lines - self._n, last_file) if chosen else None
            reusable = not produced or chosen not in NOT_REPEATED
            for line in produced or [self._ordinary()]:
                self._emit(out, line, reusable)
        self.history.extend(p for p in self.recent if p.filename == filename and p.line)
        if len(self.history) > 4000:
            del self.history[: len(self.history) - 4000]
        return self._n

    def _emit(self, out: BinaryIO, line: bytes, reusable: bool = True) -> None:
        out.write(line)
        self._n += 1
        if not reusable:
            return
        if len(self._file_lines) < 512:
            self._file_lines.append(line)
        elif self.rng.random() < 0.01:
            self._file_lines[self.rng.randrange(512)] = line

    def next_tick(self, after: str | None, at_least: datetime | None = None) -> str:
        """A tick after `after` and after every event time written so far."""
        seconds = -(-self.clock_ms // 1000)
        candidates = [seconds]
        if after:
            candidates.append(int(parse_tick(after).timestamp()) + 1)
        if at_least is not None:
            candidates.append(int(at_least.timestamp()))
        return tick_of(datetime.fromtimestamp(max(candidates), timezone.utc))


def _exists(folder: Folder, name: str) -> bool:
    try:
        folder.lstat(name)
    except FileNotFoundError:
        return False
    return True


def publish(folder: Folder, tmp: str, final: str) -> None:
    """Make `tmp` appear as `final` atomically, never replacing an existing file."""
    folder.link(tmp, final)
    folder.unlink(tmp, missing_ok=False)
    folder.fsync()


def is_tick(name: str) -> bool:
    """Whether a filename is a UTC tick `YYYYMMDDHHMMSS` (the generator's names; others may be
    imported, docs/ingest.md "File names")."""
    if len(name) != 14 or not name.isdigit() or not name.isascii():
        return False
    try:
        parse_tick(name)
    except ValueError:
        return False
    return True


def write_event_file(generator: Generator, directory: Path, filename: str, lines: int,
                     last_file: bool = False, root: Path | None = None,
                     move_on: bool = False) -> tuple[Path, int]:
    """Write `<directory>/<filename>.event-ingest.txt` whole or not at all (`root`: the trusted
    folder above `directory`; no link below it is followed, see app/safefiles.py).

    The name is claimed by link(2), which fails when it exists: two generators (two ingest
    hosts sharing the folder) never overwrite or share a file. With `move_on`, a name taken by
    another generator (before or while this one writes) moves the file to the next free second
    instead of failing; the path says which name it got."""
    taken = 0
    with Folder(directory, under(directory, root), create=True) as folder:
        while _exists(folder, f"{filename}{layout.SOURCE_SUFFIX}"):
            if not move_on or taken >= MAX_TAKEN:
                raise FileExistsError(f"{directory / filename}{layout.SOURCE_SUFFIX} exists already; "
                                      f"event files are never overwritten")
            filename, taken = _next_second(filename), taken + 1
        final = f"{filename}{layout.SOURCE_SUFFIX}"
        fd, tmp = folder.create_temp(final, SOURCE_MODE)
        try:
            with os.fdopen(fd, "wb", buffering=1 << 20) as out:
                count = generator.write(out, filename, lines, last_file)
                out.flush()
                os.fsync(out.fileno())
            while True:
                try:
                    publish(folder, tmp, final)
                    break
                except FileExistsError:
                    if not move_on or taken >= MAX_TAKEN:
                        raise
                    filename, taken = _next_second(filename), taken + 1
                    final = f"{filename}{layout.SOURCE_SUFFIX}"
        except BaseException:
            folder.unlink(tmp)
            raise
    return directory / final, count


MAX_TAKEN = 3600  # seconds a generator moves on past names other generators took


def _next_second(filename: str) -> str:
    return tick_of(parse_tick(filename) + timedelta(seconds=1))


class Generated(list):
    """The filenames written, in order; `.truth` lists the injected cases, `.generator` the state."""

    truth: list[Injected]
    generator: Generator


def generate_files(directory: Path | str, n_files: int, events: int, seed: int | None = None,
                   rates: Rates | None = None, start: datetime | str | None = None,
                   opening_balance: Decimal = Decimal("1000.00"), world: World | None = None,
                   generator: Generator | None = None) -> Generated:
    """Write `n_files` files of `events` lines each to `directory` (successive distinct ticks
    from `start`, default now) and return their filenames. The last file delays nothing to a
    next one, so every case recorded in `.truth` is complete."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    gen = generator or Generator(seed, rates, opening_balance, world)
    if isinstance(start, str):
        start = parse_tick(start)
    at_least = start or datetime.now(timezone.utc)
    names = Generated()
    tick = None
    for i in range(n_files):
        tick = gen.next_tick(tick, at_least)
        path, _ = write_event_file(gen, directory, tick, events, last_file=i == n_files - 1)
        tick = path.name[: -len(layout.SOURCE_SUFFIX)]
        names.append(tick)
    names.truth = gen.truth
    names.generator = gen
    return names


def existing_ticks(directory: Path) -> list[str]:
    """The ticks of the files in `directory`, oldest first (other names are not ticks)."""
    suffix = layout.SOURCE_SUFFIX
    return sorted(p.name[: -len(suffix)] for p in directory.glob(f"*{suffix}") if is_tick(p.name[: -len(suffix)]))
