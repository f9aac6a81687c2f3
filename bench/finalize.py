"""The order index's per-file statements alone: a small file's opening and completion as this
tree sends them (the opening's row and epochs in one statement, the completion one stored
procedure, migration splitter/0004) and as main sent them before, alternated in one process on
one private mariadbd (prints figures; not a test).

    .venv/bin/python bench/finalize.py [--files 1000] [--rounds 4] [--purchases 50]

Each file is opened (`OrderIndex.open_file`), given `--purchases` purchases and finished
(`FileRouting.finish`: the rows' INSERT and the completion in one transaction and round trip).
The `before` variant sends them as main (64fc690) did: the opening's INSERT and two
SELECTs; the completion's START, locking SELECT, the file's UPDATE, SET, the epoch's INSERT, the
sequence's UPDATE, the answer's SELECT, COMMIT. The `after` variant as this tree does: the
opening's INSERT and one SELECT; START, CALL, SELECT, COMMIT. Blocks of `--files` files alternate (ABBA...); per file: the server's CPU (from /proc),
this process's CPU and the wall time, in µs.

`--commits`: compare instead this tree's opening in autocommit (`before`: two commits a file)
with the opening left open for the completion to commit (`after`: `open_file(defer=True)`, as
the splitter opens files; one commit a file).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.splitter import order_index as oi  # noqa: E402
from bench.worker import server_cpu  # noqa: E402
from tests import servers  # noqa: E402


def statements_before(self, file_id: int, epoch: int, purchases: int, last_chunk: bytes,
                      also: list[str] = (), seen_from: int | None = None):
    """The completion as main (64fc690) sent it: six statements in the transaction."""
    statements = [(sql, None) for sql in also]
    if last_chunk:
        statements.append((oi._insert_rows_sql(last_chunk, epoch), None))
    advance = "@rows + %s >= %s AND @epoch + 1 < @trunc + %s"
    return statements + [
        ("SELECT value, epoch, epoch_rows, closed_below, truncated_below, pruned_epoch "
         "INTO @seq, @epoch, @rows, @closed, @trunc, @pruned FROM splitter_seq WHERE id = 1 FOR UPDATE", None),
        ("UPDATE splitter_file SET indexed_seq = @seq + 1, indexed_at = NOW(3), purchases = %s "
         "WHERE file_id = %s AND indexed_seq IS NULL AND %s >= @closed"
         + ("" if seen_from is None else " AND %s >= @pruned"),
         (purchases, file_id, epoch) + (() if seen_from is None else (seen_from,))),
        ("SET @done = ROW_COUNT()", None),
        ("INSERT INTO splitter_epoch (epoch, first_seq, last_seq) SELECT %s, @seq + 1, @seq + 1 FROM DUAL "
         "WHERE @done > 0 ON DUPLICATE KEY UPDATE first_seq = LEAST(first_seq, VALUES(first_seq)), "
         "last_seq = GREATEST(last_seq, VALUES(last_seq))", (epoch,)),
        (f"UPDATE splitter_seq SET value = @seq + 1, epoch = IF({advance}, @epoch + 1, @epoch), "
         f"epoch_rows = IF({advance}, 0, @rows + %s) WHERE id = 1 AND @done > 0",
         (purchases, self.epoch_rows, oi.RING, purchases, self.epoch_rows, oi.RING, purchases)),
        ("SELECT CONCAT_WS(' ', f.indexed_seq IS NOT NULL, s.epoch, s.closed_below, s.sealed_below, "
         "s.truncated_below) FROM splitter_seq s JOIN splitter_file f ON f.file_id = %s WHERE s.id = 1",
         (file_id,)),
    ]


def open_file_before(self, filename: str):
    """The opening as main (64fc690) sent it: the file's row and its epochs in two SELECTs."""
    from app import db
    self.ensure_schema()
    cached = [int(e) for e in list(self._sealed)]
    unknown = f"e.sealed = 1 AND e.epoch NOT IN ({','.join(str(e) for e in cached)})" if cached else "e.sealed = 1"
    script = db.Script()
    script.add("open", oi._OPEN_FILE, (filename, self.window))
    script.add("file", "SELECT CONCAT_WS(' ', f.file_id, f.horizon, f.floor_seq, f.epoch, f.indexed_seq IS NOT NULL, "
                       "s.pruned_epoch) FROM splitter_file f JOIN splitter_seq s ON s.id = 1 WHERE f.filename = %s",
               (filename,))
    script.add("epochs", f"SELECT CAST(IF({unknown}, -1 - CAST(e.epoch AS SIGNED), e.epoch) AS SIGNED) "
                         f"FROM splitter_file f JOIN splitter_epoch e ON (e.last_seq >= f.floor_seq "
                         f"AND e.first_seq <= f.horizon) OR e.epoch = f.epoch WHERE f.filename = %s", (filename,))
    with self.conn().cursor() as cur:
        got = script.run(cur)
        file_id, horizon, floor_seq, epoch, indexed, pruned = (int(v) for v in got["file"].one()[0].split())
        seen = [int(e) for (e,) in got["epochs"].rows]
        unknown_sealed = [-1 - e for e in seen if e < 0]
        if unknown_sealed:
            self._load_sealed(cur, unknown_sealed)
    routing = oi.FileRouting(self, filename, file_id, horizon, bool(indexed), floor_seq, epoch)
    routing.epochs = sorted({epoch, *(e if e >= 0 else -1 - e for e in seen)})
    routing.pruned = pruned
    return routing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--purchases", type=int, default=50)
    ap.add_argument("--commits", action="store_true")
    args = ap.parse_args()
    procedure, opening = oi.OrderIndex._finalize_statements, oi.OrderIndex.open_file
    private = servers.new_private_mariadb(["--innodb-buffer-pool-size=128M"])
    admin = servers.admin_connect(port=private.port)
    with admin.cursor() as cur:
        cur.execute("CREATE DATABASE finalize_bench")
    index = oi.OrderIndex(private.url("finalize_bench"))
    made = [0]

    def block(variant: str, count: int) -> dict[str, float]:
        now = variant == "after"
        oi.OrderIndex._finalize_statements = procedure if now or args.commits else statements_before
        oi.OrderIndex.open_file = opening if now or args.commits else open_file_before
        server, cpu, wall = server_cpu(private.proc.pid), time.process_time(), time.perf_counter()
        for _ in range(count):
            made[0] += 1
            name = f"f{made[0]:09d}"
            routing = index.open_file(name, defer=True) if now and args.commits else index.open_file(name)
            for line in range(args.purchases):
                routing.add_purchase(made[0] * 10_000 + line, 7, line + 1)
            routing.finish()
        return {"server_us": (server_cpu(private.proc.pid) - server) / count * 1e6,
                "client_us": (time.process_time() - cpu) / count * 1e6,
                "wall_us": (time.perf_counter() - wall) / count * 1e6}

    try:
        block("before", 200)
        block("after", 200)
        for r in range(args.rounds):
            for variant in (("before", "after") if r % 2 == 0 else ("after", "before")):
                got = block(variant, args.files)
                print(json.dumps({"variant": variant, **{k: round(v, 1) for k, v in got.items()},
                                  "load": os.getloadavg()[0]}), flush=True)
    finally:
        oi.OrderIndex._finalize_statements, oi.OrderIndex.open_file = procedure, opening
        index.close()
        admin.close()
        private.stop()
        shutil.rmtree(private.datadir, ignore_errors=True)


if __name__ == "__main__":
    main()
