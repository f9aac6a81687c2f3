"""Every byte the shard worker's Python makes of a set of lines, written to one file, so two
checkouts' can be compared with `cmp` (a check of a change that must keep outputs identical;
not a test).

    .venv/bin/python bench/worker_outputs.py --out FILE [--root DIR] [--events 100000]

For both shards, over the project's generator lines (every injected case, all shards: the other
shard's lines are `wrong_shard`), `bench.worker.harsh` lines (duplicates, returns before their
purchases, rejected prices, inactive shops, broken lines) and every fixture, cut into files of
--file-lines lines decided one after the other (orders, balances, stock, shops, holds and keys
carried from file to file, as the database would give them back): each line's Event (every
field, the payload's text) or rejection, each file's codes, the LOAD DATA rows and statements
of its writes (`WorkerState.add_seen`, `Ledger.add_writes`), its prepared and rejected lines
(`FileRun._emit`, resolved holds due among them) and its counts. `--root DIR`: the app code of
another checkout (e.g. a `git archive` of the base).
"""
from __future__ import annotations

import argparse
import io
import random
import sys
import tempfile
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path("/work/shared/fixtures")
FIELDS = ("etype", "ts", "key", "dkey", "shop_id", "user_id", "order_id", "good_id", "qty", "amount", "active")


class Collect:
    deferred = True

    def __init__(self, out: list):
        self.out = out

    def write(self, data) -> None:
        self.out.append(bytes(data))

    def flush(self) -> None:
        pass


def sources(events: int) -> dict[str, list[bytes]]:
    from app.ingest.generator import Generator
    from bench.worker import harsh
    gen, buffer = Generator(seed=11), io.BytesIO()
    for i in range(events // 2000):
        gen.write(buffer, f"20260101{i // 3600:02d}{i // 60 % 60:02d}{i % 60:02d}", 2000)
    out = {"generator": buffer.getvalue().splitlines(keepends=True)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "harsh.txt"
        harsh(path, events // 2, seed=5)
        out["harsh"] = [x + b"\n" for x in path.read_bytes().splitlines()]
    out["fixtures"] = [x + b"\n" for p in sorted(FIXTURES.rglob("*.txt")) for x in p.read_bytes().splitlines()]
    return out


def event_text(ev) -> bytes:
    if type(ev).__name__ == "Bad":
        return b"bad %d %r\n" % (ev.code, ev.detail)
    payload = ev.payload_json
    return repr([getattr(ev, f) for f in FIELDS]).encode() + b" " + (
        bytes(payload) if payload is not None else repr(ev.payload).encode()) + b"\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--root", type=Path, default=ROOT)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--file-lines", type=int, default=5_000)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    inputs = sources(args.events)
    from bench.worker_python import load
    m = load(args.root)
    settings = m["config"].Settings.from_env({"SHARD_COUNT": "2", "HOLD_SECONDS": "30"})
    FileRun, Batch, ShopOf, Counts = m["stage"].FileRun, m["stage"].Batch, m["stage"].ShopOf, m["stage"].Counts
    written = 0
    with open(args.out, "wb") as dump:
        for shard in (0, 1):
            for name, raws in inputs.items():
                stage = object.__new__(m["stage"].WorkerStage)
                stage.settings, stage.shard = settings, shard
                stage.ledger = m["ledger"].Ledger(settings.opening_balance)
                state = object.__new__(m["state"].WorkerState)
                state.shard, state.use_infile = shard, True
                orders, balances, stock, shops, seen = {}, {}, {}, {}, set()
                holds, newest, seq = m["state"].HoldBook(), None, 0
                rng = random.Random(shard)
                for k in range(0, len(raws), args.file_lines):
                    run = object.__new__(FileRun)
                    run.stage, run.settings, run.rules, run.shard = stage, settings, settings.rules, shard
                    run.filename, run.file_id, run.seq = f"2026010{shard}{k:06d}", k + 1, seq
                    run.validate = m["rules"].validator(shard, 2, settings.max_line_bytes, settings.max_json_depth)
                    if hasattr(m["rules"], "lines_validator"):
                        run.validate_lines = m["rules"].lines_validator(shard, 2, settings.max_line_bytes,
                                                                        settings.max_json_depth)
                    run.prepare = m["stage"].PreparedLines(shard, run.filename)
                    lines = raws[k:k + args.file_lines]
                    lines, events, plan, digest, _ = run._batch(lines, True)
                    for u in plan.users | {e.user_id for e in plan.returns}:
                        if u not in balances:   # some users start poor: insufficient balances
                            balances[u] = settings.opening_balance if rng.random() < 0.9 else Decimal("3.00")
                    run.orders, run.balances, run.stock, run.holds, run.newest = orders, balances, stock, holds, newest
                    run.b = b = Batch()
                    codes, batch_newest = run._decide_lines(lines, events, 1, seen, set(), shops)
                    seen.update(b.new_keys)
                    holds, newest, seq = run.holds, run.newest, run.seq
                    for o in b.new_orders:
                        o.stored_at = (run.file_id, o.line)
                    writes = m["db"].Script()
                    state.add_seen(writes, "seen", b.new_keys, b.return_minutes)
                    stage.ledger.add_writes(writes, None, shard, run.file_id, b.new_orders,
                                            list(b.credited.values()), balances, b.changed_users, set(), infile=True)
                    out, rej = [], []
                    run.out, run.rej, run.counts, run.pending = Collect(out), Collect(rej), Counts(), {}
                    run._emit_batch((lines, 1, bytes(codes), events, ShopOf(orders), b.resolved), helper=False)
                    parts = [f"== shard {shard} {name} file {k} digest {digest.hex()} newest {batch_newest}\n".encode()]
                    parts += map(event_text, events)
                    parts.append(bytes(codes) + b"\n")
                    for tag, sql, _, is_load in writes.items:
                        parts.append(f"{tag} {sql} {is_load}\n".encode())
                    parts += [writes.offered[n] + b"\n" for n in sorted(writes.offered)] if hasattr(
                        writes, "offered") else []
                    parts += out + rej
                    parts.append(repr(run.counts.stats()).encode() + b"\n")
                    data = b"".join(parts)
                    dump.write(data)
                    written += len(data)
    print(f"{args.root}: {written:,} bytes to {args.out}")


if __name__ == "__main__":
    main()
