"""The splitting loop's CPU per line, this checkout against another, alternated in one process
(prints figures; not a test).

    .venv/bin/python bench/split_loop.py --other /var/tmp/x/base [--pairs 6] [--files 20] [--source DIR]

Both checkouts' `app` packages are imported side by side (under other names, through links in
a temporary folder: the package uses relative imports only), so the two `split_stream`s run
in one process, in ABBA order, on the same bytes: what a comparison of two processes would
blur (a checkout's own offset, the machine's load moving between runs) is shared. No
database: the file's index is taken as complete and no lookup answers, as in
`bench/split.py`'s loop alone. CPU per line from `time.process_time` per round.

The inputs: `--files` files of 10,000 lines of the project's generator with the pipeline
bench's rates (or the `*.event-ingest.txt` files of `--source`, e.g. a `var/bench/pipeline-big-*`
folder), then `cmp`: every output byte (both shard files and the rejected records) of both
checkouts compared, on those files and on hostile lines (tests/test_splitter_equivalence.py's,
every field of an event replaced by every kind of value, broken JSON, bad UTF-8, deep
nesting, long lines, CR, no final newline) with MAX_LINE_BYTES at its floor (4096).
"""
from __future__ import annotations

import argparse
import importlib
import io
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HARSH_LIMIT = 4096


class _Answered:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def modules(links: Path, label: str, tree: Path):
    """(stage, order_index, lines) of the checkout at `tree`, imported as package `label`."""
    (links / label).symlink_to(tree.resolve() / "app")
    return tuple(importlib.import_module(f"{label}.{m}") for m in ("splitter.stage", "splitter.order_index", "lines"))


def split_all(mods, datas: list[bytes], limit: int) -> tuple[float, list[bytes]]:
    """CPU µs per line of splitting every file (2 shards, every record written), and the outputs."""
    stage, order_index, lines = mods
    outputs = []
    n = 0
    cpu = time.process_time()
    for data in datas:
        routing = order_index.FileRouting(None, "loop", 1, 0, True)
        routing.lookup_async = lambda orders: _Answered([None] * len(orders))
        routing.lookup = lambda orders, finish=False: [None] * len(orders)
        outs = [io.BytesIO(), io.BytesIO(), io.BytesIO()]
        reader = lines.LineReader(io.BufferedReader(io.BytesIO(data), lines.READ_BUFFER), limit)
        result = stage.split_stream(reader, 2, [outs[0].write, outs[1].write], [True, True], routing, outs[2].write)
        n += result.lines_in
        outputs.append(b"\0".join(o.getvalue() for o in outs))
    return (time.process_time() - cpu) / n * 1e6, outputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--other", type=Path, help="another checkout (e.g. a `git archive` of the base)")
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--files", type=int, default=20)
    ap.add_argument("--source", type=Path, help="a folder of *.event-ingest.txt files to split instead")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from app.ingest.generator import generate_files
    from bench.pipeline import RATES
    from tests.test_splitter_equivalence import hostile_lines

    with tempfile.TemporaryDirectory() as tmp:
        links = Path(tmp) / "packages"
        links.mkdir()
        sys.path.insert(0, str(links))
        trees = {"this": modules(links, "app_this", ROOT)}
        if args.other:
            trees["other"] = modules(links, "app_other", args.other)
        if args.source:
            paths = sorted(args.source.glob("*.event-ingest.txt"))[:args.files]
        else:
            folder = Path(tmp) / "events"
            paths = [folder / f"{name}.event-ingest.txt"
                     for name in generate_files(folder, args.files, 10_000, seed=1, rates=RATES,
                                                start="20260301000000")]
        datas = [p.read_bytes() for p in paths]
        rng = random.Random(7)
        harsh = [b"".join(hostile_lines(rng, 3000)) for _ in range(3)]
        harsh[1] = b"\xef\xbb\xbf" + harsh[1][:-1]      # a BOM, no final newline
        count = sum(d.count(b"\n") for d in datas)
        print(f"{count:,} lines in {len(datas)} files; load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        figures: dict[str, list[float]] = {label: [] for label in trees}
        outputs: dict[str, list[bytes]] = {}
        for p in range(args.pairs):
            for label in (list(trees) if p % 2 == 0 else list(trees)[::-1]):
                us, outputs[label] = split_all(trees[label], datas, 1 << 20)
                figures[label].append(us)
        for label, values in figures.items():
            print(f"{label:6s} CPU us per line: " + ", ".join(f"{v:.3f}" for v in values)
                  + f"  (mean {sum(values) / len(values):.3f})")
        if args.other:
            lower = sum(t < o for t, o in zip(figures["this"], figures["other"]))
            print(f"this checkout lower in {lower} of {args.pairs} pairs")
            same = outputs["this"] == outputs["other"]
            harsh_same = split_all(trees["this"], harsh, HARSH_LIMIT)[1] == split_all(trees["other"], harsh,
                                                                                      HARSH_LIMIT)[1]
            print(f"cmp, generated files: {'identical' if same else 'DIFFERENT'}; "
                  f"harsh lines: {'identical' if harsh_same else 'DIFFERENT'}")
            if not (same and harsh_same):
                raise SystemExit(1)


if __name__ == "__main__":
    main()
