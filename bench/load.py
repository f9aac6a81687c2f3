"""How fast and how cheaply mysql-sender loads prepared files, against the server's own floors.

    .venv/bin/python bench/load.py [--rows 1000000] [--small-files 200] [--history 2000000]
                                   [--methods load_data,insert] [--batch N] [--repeat N]
                                   [--parts big,small,history,convert]
                                   [--shared | --url mysql://root:@127.0.0.1:3306/x]

By default on a private mariadbd with the machine server's InnoDB settings (128 MiB buffer pool,
a flush at every commit: bench/shard_schema.py OPTIONS), so the server's CPU (utime + stime from
/proc/<pid>/stat) is the bench's alone. The sender's CPU is this process's (its reading thread
included). Realistic prepared rows (the generator's mix of event types, random 64-bit order
ids, 500 shops and 100,000 users per shard, timestamps 3 ms apart), cached under var/bench/.

  big      one prepared file of --rows rows, each into a fresh shard database:
           floor      the server's own LOAD DATA INFILE of the same rows, as TSV written
                      beforehand (untimed), into the sender's `events` table, one transaction;
           reference  the same into the fixed reference table of issue 12 (the contract's
                      columns, an auto-increment key, a unique random 32-character key, an index
                      on shop_id and one on timestamp; bench/shard_schema.py);
           <method>   loader.load_file() end to end: read, check, convert, send, record, commit.
           Rows/s, the ratio to each floor, sender CPU and server CPU per row.
  small    --small-files files of --small-rows (500) rows loaded one after the other on one
           connection (as a sender does): CPU per file, and that minus its rows x the per-row CPU
           of `big` = the fixed cost of a file (--small-rows 1 measures it directly); SQL
           statements and round trips per file. --batch N: N files at a time in one transaction
           (loader.load_batch, as a sender loads a claim of N small files).
  history  200,000 rows by load_file on a fresh database, then --history rows (10,000-row files,
           untimed), then 200,000 more: rows/s and CPU per row after the history against fresh,
           beside the reference table's floor measured the same way.
  convert  the sender's own per-row work on the file of `big` (--rows), without a server: read
           and hash it in blocks, check every line and render the TSV, as `load_file` does;
           CPU per row, best of 7 (other processes only slow a round down, so the best is
           the figure to compare between two checkouts run one after the other).
  daemon   the --small-files files through a real `python -m app.sender --shard 0` and a real
           pipeline-apid (default settings), all queued before the sender starts: the sender
           process's CPU per file (its HTTP claims and reports, logging and the load) and the API's.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app import db  # noqa: E402
from app.config import MySQLURL  # noqa: E402
from app.events import event_key  # noqa: E402
from app import layout  # noqa: E402
from app.client import PipelineClient  # noqa: E402
from app.sender import loader  # noqa: E402
from bench.shard_schema import OPTIONS, VARIANTS, server_cpu  # noqa: E402
from tests import servers  # noqa: E402

SOURCE = "20990101000000"
FILE_ROWS = 10_000
SMALL_ROWS = 500
MEASURED = 200_000
REFERENCE_COLUMNS = "event_type, shop_id, user_id, `timestamp`, shard, event_key"
FLOOR_COLUMNS = ("event_key, event_type, shop_id, user_id, `timestamp`, order_id, good_id, qty, amount, payload, "
                 "shard, source_file")


def prepared_rows(n: int, shard: int = 0, shard_count: int = 2, seed: int = 7, source: str = SOURCE,
                  first: int = 0):
    """Prepared lines like the worker writes (rows first..first+n of one endless sequence):
    the generator's mix of the five event types."""
    rnd = random.Random(seed * 1_000_003 + first)
    base = 4_102_444_800_000  # 2100-01-01 in ms
    for i in range(first, first + n):
        shop = rnd.randrange(0, 500) * shard_count + shard
        user = rnd.randrange(1, 100_000)
        good = rnd.randrange(1, 5000)
        ms = base + i * 3
        ts = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}"
        kind = rnd.random()
        order = user_id = qty = amount = None
        if kind < 0.55:
            etype, order, user_id, qty = 1, rnd.randrange(-(1 << 63), 1 << 63), user, rnd.randrange(1, 5)
            price = rnd.randrange(100, 100_000) / 100
            amount = f"{price:.2f}"
            payload = {"order_id": order, "user_id": user, "shop_id": shop, "good_id": good, "qty": qty,
                       "price_at_order": price}
        elif kind < 0.65:
            etype, order, user_id, qty = 3, rnd.randrange(-(1 << 63), 1 << 63), user, 1
            refund = rnd.randrange(100, 100_000) / 100
            amount = f"{refund:.2f}"
            payload = {"order_id": order, "user_id": user, "good_id": good, "qty": qty, "refund_amount": refund}
        elif kind < 0.85:
            etype, qty = 0, rnd.randrange(1, 50)
            payload = {"shop_id": shop, "good_id": good, "delta_count": qty, "reason": "bench restock",
                       "sub_event_type": "restock"}
        elif kind < 0.97:
            etype = 2
            price = rnd.randrange(100, 100_000) / 100
            amount = f"{price:.2f}"
            payload = {"shop_id": shop, "good_id": good, "new_price": price}
        else:
            etype = 4
            payload = {"shop_id": shop, "active": rnd.random() < 0.5}
        event = {"event_type": etype, "payload": payload, "timestamp": ts}
        yield orjson.dumps({
            "event_key": event_key(event), "event_type": etype, "shop_id": shop, "user_id": user_id,
            "timestamp": ts, "shard": shard, "order_id": order, "good_id": good, "qty": qty, "amount": amount,
            "source_file": source, "payload": payload}) + b"\n"


def write_file(path: Path, n: int, source: str, first: int) -> Path:
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as out:
            for line in prepared_rows(n, source=source, first=first):
                out.write(line)
        tmp.rename(path)
    return path


def tsv_for_server(prepared: Path, out: Path, reference: bool) -> None:
    """The rows of a prepared file as the server's LOAD DATA INFILE reads them (independent of
    the loader, so this bench measures old and new loaders alike)."""
    with open(prepared, "rb") as f, open(out, "w", encoding="utf-8") as w:
        for line in f:
            ev = orjson.loads(line)
            if reference:
                user = "\\N" if ev["user_id"] is None else ev["user_id"]
                w.write(f"{ev['event_type']}\t{ev['shop_id']}\t{user}\t{ev['timestamp']}\t{ev['shard']}\t"
                        f"{hashlib.md5(ev['event_key'].encode()).hexdigest()}\n")
                continue
            vals = [ev["event_key"], ev["event_type"], ev["shop_id"], ev["user_id"], ev["timestamp"], ev["order_id"],
                    ev["good_id"], ev["qty"], ev["amount"],
                    orjson.dumps(ev["payload"]).decode().replace("\\", "\\\\"), ev["shard"], ev["source_file"]]
            w.write("\t".join("\\N" if v is None else str(v) for v in vals) + "\n")
    out.chmod(0o644)


class Bench:
    def __init__(self, args):
        self.args = args
        self.private = None
        if args.shared or args.url:
            self.server = MySQLURL.parse("--url", args.url or "mysql://root:@127.0.0.1:3306/bench")
            self.pid = None
        else:
            self.private = servers.MariaDB(Path(tempfile.mkdtemp(prefix="bench-load-db-")),
                                           options=[*OPTIONS, "--innodb-buffer-pool-size=128M"])
            self.private.install().start()
            self.server = self.private.url("bench")
            self.pid = self.private.proc.pid
        self.cache = ROOT / "var" / "bench" / "load"
        self.cache.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="bench-load-"))
        self.work.chmod(0o755)  # the server's LOAD DATA INFILE reads the floors' TSVs from here

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
        if self.private is not None:
            self.private.stop()
            shutil.rmtree(self.private.datadir, ignore_errors=True)

    def server_cpu(self) -> float:
        return server_cpu(self.pid) if self.pid else float("nan")

    def fresh(self, label: str) -> MySQLURL:
        url = self.server.with_database(f"bench_{label}_{uuid.uuid4().hex[:8]}")
        loader.prepare_database(url)
        return url

    def drop(self, url: MySQLURL) -> None:
        conn = db.connect(url, database=None)
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{url.database}`")
        conn.close()

    def server_load(self, url: MySQLURL, tsv: Path, reference: bool) -> None:
        conn = db.connect(url, autocommit=False)
        with conn.cursor() as cur:
            if reference:
                cur.execute("DROP TABLE IF EXISTS events")
                cur.execute(VARIANTS["reference"][1])
                cur.execute(f"LOAD DATA INFILE %s INTO TABLE events ({REFERENCE_COLUMNS})", (str(tsv),))
            else:
                cur.execute(f"LOAD DATA INFILE %s INTO TABLE events ({FLOOR_COLUMNS})", (str(tsv),))
            conn.commit()
        conn.close()

    def timed(self, fn) -> tuple[float, float, float]:
        """(wall s, this process's CPU s, the server's CPU s) of fn()."""
        cpu, server, started = time.process_time(), self.server_cpu(), time.monotonic()
        fn()
        return time.monotonic() - started, time.process_time() - cpu, self.server_cpu() - server

    # -- big ------------------------------------------------------------------------------------

    def big(self) -> dict:
        rows = self.args.rows
        prepared = write_file(self.cache / f"{SOURCE}-{rows}.prepared.txt", rows, SOURCE, 0)
        floor_tsv, ref_tsv = self.work / "floor.tsv", self.work / "reference.tsv"
        tsv_for_server(prepared, floor_tsv, reference=False)
        tsv_for_server(prepared, ref_tsv, reference=True)
        print(f"\n== big: one file of {rows:,} rows ({prepared.stat().st_size / 1e6:.0f} MB); "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
        kinds = ["floor", "reference", *self.args.methods]

        def run(kind: str) -> tuple[float, float, float]:
            url = self.fresh(kind)
            try:
                if kind in ("floor", "reference"):
                    return self.timed(lambda: self.server_load(url, floor_tsv if kind == "floor" else ref_tsv,
                                                               kind == "reference"))
                conn = loader.connect(url)
                out = {}
                figures = self.timed(lambda: out.update(r=loader.load_file(conn, prepared, SOURCE, 0, 2, root=self.work,
                                                                            method=kind)))
                conn.close()
                assert out["r"].loaded == rows and out["r"].method == kind, out["r"]
                return figures
            finally:
                self.drop(url)

        run("floor")  # grows the server's undo and redo files once: not timed
        got: dict[str, list] = {k: [] for k in kinds}
        for r in range(self.args.repeat):  # alternated, so outside load hits every kind alike
            for kind in (kinds if r % 2 == 0 else kinds[::-1]):
                got[kind].append(run(kind))
                wall, cpu, server = got[kind][-1]
                print(f"  {kind:<10} {wall:6.2f}s  sender CPU {cpu:6.2f}s  server CPU {server:6.2f}s  "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)
        med = {k: tuple(statistics.median(x[i] for x in v) for i in range(3)) for k, v in got.items()}
        floor, reference = med["floor"][0], med["reference"][0]
        print(f"big, medians of {self.args.repeat}:")
        for kind in kinds:
            wall, cpu, server = med[kind]
            line = (f"  {kind:<10} {rows / wall:9,.0f} rows/s   server {1e6 * server / rows:5.2f} µs/row")
            if kind not in ("floor", "reference"):
                line += (f"   sender {1e6 * cpu / rows:5.2f} µs/row   ratio to the floor {floor / wall:.2f}, "
                         f"to the reference {reference / wall:.2f}")
            print(line, flush=True)
        return {k: (1e6 * v[1] / rows, 1e6 * v[2] / rows) for k, v in med.items()}

    # -- small ----------------------------------------------------------------------------------

    def small(self, per_row: dict) -> None:
        n, rows_each = self.args.small_files, self.args.small_rows
        files = [write_file(self.cache / f"2098{i:010d}-{rows_each}.prepared.txt", rows_each, f"2098{i:010d}",
                            i * rows_each) for i in range(n)]
        print(f"\n== small: {n} files of {rows_each} rows, one connection; load average {os.getloadavg()[0]:.1f}",
              flush=True)
        for method in self.args.methods:
            url = self.fresh(f"small_{method}")
            try:
                conn = loader.connect(url)
                trips = servers.count_round_trips(conn)

                batch = self.args.batch if method == "load_data" else 1

                def load_all():
                    if batch > 1:  # a claim's files together, as a sender that claimed `batch` of them
                        for first in range(0, n, batch):
                            group = [(files[i], f"2098{i:010d}") for i in range(first, min(first + batch, n))]
                            got = loader.load_batch(conn, group, 0, 2, root=self.work)
                            assert all(r is not None and r.loaded == rows_each for r in got), got
                        return
                    for i, path in enumerate(files):
                        result = loader.load_file(conn, path, f"2098{i:010d}", 0, 2, root=self.work, method=method)
                        assert result.loaded == rows_each and result.method == method, result
                before = servers.session_statements(conn)
                trips.clear()
                wall, cpu, server = self.timed(load_all)
                statements = servers.session_statements(conn) - before - 1  # the SHOW STATUS itself not counted
                round_trips = len(trips) - 1
                conn.close()
            finally:
                self.drop(url)
            c_row, s_row = per_row.get(method, (float("nan"), float("nan")))
            label = f"{method} x{batch}" if batch > 1 else method
            print(f"  {label:<10} {n * rows_each / wall:8,.0f} rows/s, {n / wall:6.1f} files/s; per file: "
                  f"sender {1e3 * cpu / n:5.2f} ms (fixed {1e3 * cpu / n - c_row * rows_each / 1e3:5.2f}), "
                  f"server {1e3 * server / n:5.2f} ms (fixed {1e3 * server / n - s_row * rows_each / 1e3:5.2f}); "
                  f"{statements / n:.1f} statements in {round_trips / n:.1f} round trips", flush=True)

    # -- history --------------------------------------------------------------------------------

    def history(self) -> None:
        history, method = self.args.history, self.args.methods[0]
        total = 2 * MEASURED + history
        names = [f"2097{i:010d}" for i in range(total // FILE_ROWS)]
        files = [write_file(self.cache / f"{name}-{FILE_ROWS}.prepared.txt", FILE_ROWS, name, i * FILE_ROWS)
                 for i, name in enumerate(names)]
        print(f"\n== history: {MEASURED:,} rows fresh, {history:,} rows of history, {MEASURED:,} rows after "
              f"(files of {FILE_ROWS:,}); load average {os.getloadavg()[0]:.1f}", flush=True)
        measured = MEASURED // FILE_ROWS
        windows = {"fresh": range(0, measured), "after": range(len(files) - measured, len(files))}
        out = {}
        url = self.fresh("history")
        try:
            conn = loader.connect(url)

            def load(indexes):
                for i in indexes:
                    loader.load_file(conn, files[i], names[i], 0, 2, root=self.work, method=method)
            out["fresh"] = self.timed(lambda: load(windows["fresh"]))
            load(range(measured, len(files) - measured))
            out["after"] = self.timed(lambda: load(windows["after"]))
            conn.close()
        finally:
            self.drop(url)
        ref = {}
        url = self.fresh("history_ref")
        try:
            conn = db.connect(url, autocommit=False)
            with conn.cursor() as cur:
                cur.execute("DROP TABLE events")
                cur.execute(VARIANTS["reference"][1])
            conn.commit()

            def ref_load(indexes):
                for i in indexes:
                    tsv = self.work / "ref-history.tsv"
                    tsv_for_server(files[i], tsv, reference=True)
                    started = self.server_cpu(), time.monotonic()
                    with conn.cursor() as cur:
                        cur.execute(f"LOAD DATA INFILE %s INTO TABLE events ({REFERENCE_COLUMNS})", (str(tsv),))
                    conn.commit()
                    yield time.monotonic() - started[1], self.server_cpu() - started[0]
            for label, indexes in (("fresh", windows["fresh"]), ("history", range(measured, len(files) - measured)),
                                   ("after", windows["after"])):
                figures = list(ref_load(indexes))
                ref[label] = (sum(f[0] for f in figures), sum(f[1] for f in figures))
            conn.close()
        finally:
            self.drop(url)
        for label in ("fresh", "after"):
            wall, cpu, server = out[label]
            print(f"  {method:<10} {label:<6} {MEASURED / wall:9,.0f} rows/s   sender "
                  f"{1e6 * cpu / MEASURED:5.2f} µs/row   server {1e6 * server / MEASURED:5.2f} µs/row", flush=True)
        for label in ("fresh", "after"):
            wall, server = ref[label]
            print(f"  reference  {label:<6} {MEASURED / wall:9,.0f} rows/s   "
                  f"server {1e6 * server / MEASURED:5.2f} µs/row", flush=True)
        print(f"  after / fresh: {method} {out['fresh'][0] / out['after'][0]:.2f}, "
              f"reference {ref['fresh'][0] / ref['after'][0]:.2f}; {method} after / reference after: "
              f"{ref['after'][0] / out['after'][0]:.2f}", flush=True)


def convert(rows: int, cache: Path, rounds: int = 7) -> None:
    """The loader's read, hash, check and render of one big prepared file, no server (`convert`)."""
    prepared = write_file(cache / f"{SOURCE}-{rows}.prepared.txt", rows, SOURCE, 0)
    best = float("inf")
    for _ in range(rounds):
        cpu = time.process_time()
        with open(prepared, "rb") as f:
            reading = loader._Reading()
            blocks = loader._blocks(f, reading.hasher, loader.FIRST_BATCH, FILE_ROWS, loader.CHUNK_BYTES,
                                    loader.MAX_LINE_BYTES)
            for _chunk in loader._converted(blocks, reading, loader.tsv, SOURCE, 0, 2, loader.MAX_JSON_DEPTH):
                pass
        best = min(best, time.process_time() - cpu)
    assert reading.rows == rows
    print(f"\n== convert: {rows:,} rows read, checked and rendered, no server: {1e6 * best / rows:.3f} µs/row "
          f"(best of {rounds}; load average {os.getloadavg()[0]:.1f})", flush=True)


def process_cpu(pid: int) -> float:
    """CPU seconds of a process and its children still alive (gunicorn's workers)."""
    total = 0.0
    pids = [pid]
    try:
        pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        pass
    for p in pids:
        try:
            total += server_cpu(p)
        except OSError:
            pass
    return total


def daemon(bench: "Bench") -> None:
    """Small files through a real sender process and a real API, queued beforehand."""
    n = bench.args.small_files
    names = [f"2096{i:010d}" for i in range(n)]
    shared = bench.work / "shared"
    pipeline_db = bench.server.with_database(f"bench_daemon_pipe_{uuid.uuid4().hex[:6]}")
    shard = bench.server.with_database(f"bench_daemon_shard_{uuid.uuid4().hex[:6]}")
    db.ensure_database(pipeline_db)
    env = servers.service_env(pipeline_db, shared, servers.free_port(), [shard, shard])
    for key in ("LEASE_SECONDS", "POLL_MIN_SECONDS", "POLL_MAX_SECONDS"):
        env.pop(key, None)
    api = servers.start_api(env, bench.work)
    sender = None
    try:
        client = PipelineClient(api.base, max_wait=10.0)
        for i, name in enumerate(names):
            path = layout.worker_output(shared, name, 0)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as out:
                for line in prepared_rows(SMALL_ROWS, source=name, first=i * SMALL_ROWS):
                    out.write(line)
            client.register(name, [0])
            client.ingest_done(name)
            client.start("shard-splitter", name, 0, "bench")
            client.done("shard-splitter", name, 0, "bench", events=SMALL_ROWS)
            client.start("shard-worker", name, 0, "bench")
        sender = servers.Process("app.sender", ["--shard", "0"], env, bench.work / "sender.log").start()

        def done(count: int) -> bool:
            return client.summary()["by_stage"]["mysql_sender"]["done"] >= count
        client.done("shard-worker", names[0], 0, "bench", events=SMALL_ROWS)  # warm-up: start-up not counted
        servers.wait_until(lambda: done(1), 120, 0.05, what="the first file loaded")
        print(f"\n== daemon: {n - 1} files of {SMALL_ROWS} rows handed to a real sender as a worker would, "
              f"through a real API; load average {os.getloadavg()[0]:.1f}", flush=True)
        cpu, api_cpu = process_cpu(sender.proc.pid), process_cpu(api.process.proc.pid)
        server, started = bench.server_cpu(), time.monotonic()
        for name in names[1:]:
            client.done("shard-worker", name, 0, "bench", events=SMALL_ROWS)
        servers.wait_until(lambda: done(n), 600, 0.2, what="every file loaded")
        wall, n = time.monotonic() - started, n - 1
        cpu = process_cpu(sender.proc.pid) - cpu
        api_cpu = process_cpu(api.process.proc.pid) - api_cpu  # the bench's own requests included
        server = bench.server_cpu() - server
        print(f"  {n / wall:6.1f} files/s; per file: sender process {1e3 * cpu / n:5.2f} ms CPU, API "
              f"{1e3 * api_cpu / n:5.2f} ms, database server {1e3 * server / n:5.2f} ms", flush=True)
    finally:
        if sender is not None:
            sender.stop()
        api.process.stop()
        for url in (pipeline_db, shard):
            bench.drop(url)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--small-files", type=int, default=200)
    parser.add_argument("--small-rows", type=int, default=SMALL_ROWS,
                        help="rows per file of `small` (1: what a file costs beyond its rows, directly)")
    parser.add_argument("--batch", type=int, default=1,
                        help="small: load_data loads this many files at a time in one transaction (load_batch)")
    parser.add_argument("--history", type=int, default=2_000_000)
    parser.add_argument("--methods", default="load_data,insert")
    parser.add_argument("--parts", default="big,small,history,daemon")
    parser.add_argument("--repeat", type=int, default=1, help="alternate the floors and methods this many times")
    parser.add_argument("--shared", action="store_true", help="use the machine's server (its CPU is not measured)")
    parser.add_argument("--url", default=None, help="a server to use instead (the database part is ignored)")
    args = parser.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    parts = set(args.parts.split(","))
    if args.history % FILE_ROWS:
        parser.error(f"--history must be a multiple of {FILE_ROWS}")
    if parts == {"convert"}:  # no server needed
        cache = ROOT / "var" / "bench" / "load"
        cache.mkdir(parents=True, exist_ok=True)
        convert(args.rows, cache)
        return
    bench = Bench(args)
    print(f"server: {'private mariadbd, 128 MiB buffer pool' if bench.private else bench.server.host}; "
          f"{os.cpu_count()} CPUs")
    try:
        per_row = bench.big() if "big" in parts else {}
        if "small" in parts:
            bench.small(per_row)
        if "history" in parts:
            bench.history()
        if "convert" in parts:
            convert(args.rows, bench.cache)
        if "daemon" in parts:
            daemon(bench)
    finally:
        bench.close()


if __name__ == "__main__":
    main()
