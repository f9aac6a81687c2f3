"""The shard worker's Python per line, without a database (prints figures; not a test).

    .venv/bin/python bench/worker_lines.py [--events 200000] [--reps 3] [--root DIR]

Takes the shard-0 lines of the project's generator (as bench/worker.py does) and times, in this
process (`time.process_time`, best of --reps, the cyclic GC off as in the worker), the work the
worker's helper threads and its decision loop do per line that no SQL is part of:

- `validate`: `rules.validator` over the lines, 256 at a time as the read-ahead thread does,
  `money`'s cache emptied first (a fifth of a day's prices are new to it);
- `emit`: `FileRun._emit` of 8,000-line batches to a null writer, codes drawn as the generator's
  data has them (~96% accepted), a resolved hold due every ~70 lines;
- `orders`: an `Order` and its `buyer_of` for each purchase (per line of the file);
- `writes`: `Ledger.add_writes` of those orders and their users' balances, by 8,000-line batch,
  into a script that is not run (the LOAD DATA rows rendered; per line of the file).

`--root DIR`: the app code of another checkout (e.g. a `git archive` of the base), to compare two
versions back to back; run them alternated, the machine is shared.
"""
from __future__ import annotations

import argparse
import gc
import random
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Null:
    def write(self, data) -> None:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--root", type=Path, default=ROOT)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from bench import wire
    from bench.worker import from_generator
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lines.txt"
        from_generator(path, args.events)
        raws = path.read_bytes().splitlines(keepends=True)
    wire.use_app_of(args.root)   # bench.worker imported this checkout's app.layout
    from app.worker import rules
    from app import db
    from app.worker.ledger import Ledger
    from app.worker.rules import Event, Order, buyer_of
    from app.worker.stage import Counts, FileRun, PreparedLines
    from app.worker.state import Hold

    gc.disable()
    check = rules.validator(0, 2)
    best: dict[str, float] = {}

    def keep(name: str, seconds: float) -> None:
        best[name] = min(best.get(name, float("inf")), seconds / len(raws) * 1e6)

    for _ in range(args.reps):
        rules._amounts.clear()
        t = time.process_time()
        events: list = []
        for i in range(0, len(raws), 256):
            events.extend(map(check, raws[i:i + 256]))
        keep("validate", time.process_time() - t)

        rng = random.Random(1)
        codes = bytes((0 if rng.random() < 0.96 else rng.choice([1, 2, 7])) if type(e) is Event else e.code
                      for e in events)
        returns = [(i, e) for i, e in enumerate(events) if type(e) is Event and e.etype == rules.RETURN]
        run = object.__new__(FileRun)
        run.out, run.rej, run.counts, run.filename = Null(), Null(), Counts(), "20260101000000"
        run.prepare, run.validate, run.pending = PreparedLines(0, run.filename), check, {}
        for k, (i, e) in enumerate(returns[::5]):
            h = Hold(1, k, "older", e.order_id, raws[i], e.ts, e.ts)
            h.event = e
            h.resolve("released", rules.ACCEPTED, 1, i + 1 + rng.randrange(50), k)
            run.pending.setdefault(h.resolved_line, []).append(h)
        shop_of = {e.order_id: 0 for _, e in returns}
        t = time.process_time()
        for i in range(0, len(raws), 8000):
            FileRun._emit(run, raws[i:i + 8000], i + 1, codes[i:i + 8000], events[i:i + 8000], shop_of)
        keep("emit", time.process_time() - t)

        purchases = [e for e in events if type(e) is Event and e.etype == rules.PURCHASE]
        t = time.process_time()
        for e in purchases:
            o = Order(e.order_id, e.user_id, e.amount, e.shop_id, e.good_id, e.qty, True, line=5)
            buyer_of(o.user_id, o.good_id)
        keep("orders", time.process_time() - t)

        orders = [Order(e.order_id, e.user_id, e.amount, e.shop_id, e.good_id, e.qty, True, line=5) for e in purchases]
        balances = {e.user_id: e.amount * 3 for e in purchases}
        t = time.process_time()
        for i in range(0, len(orders), 8000 * len(orders) // len(raws)):
            chunk = orders[i:i + 8000 * len(orders) // len(raws)]
            users = {o.user_id for o in chunk}
            Ledger(Decimal("1000.00")).add_writes(db.Script(), None, 0, 1, chunk, [], balances, users,
                                                  set(list(users)[::4]))
        keep("writes", time.process_time() - t)
    print(f"{args.root}: {len(raws):,} lines; µs per line, best of {args.reps}: "
          + ", ".join(f"{k} {v:.3f}" for k, v in best.items()))


if __name__ == "__main__":
    main()
