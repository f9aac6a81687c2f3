"""Benchmark of pipeline-apid. Prints figures; it is not a test.

    .venv/bin/python bench/api.py [--seconds 10] [--rounds 2] [--clients 16] [--large 1000000]
                                  [--skip throughput,scale] [--keep]

Databases are fresh ones on MYSQL_PIPELINE_URL's server (default 127.0.0.1:3306), dropped after.

1. Transitions: the real API (`python -m app.apid`: gunicorn, API_WORKERS x API_THREADS) on a
   fresh database; `--clients` threads loop claim -> heartbeat -> done on pre-registered tasks.
   Every request is one state-machine operation; figures: operations/s, p50/p99 per kind.
2. The floor: a bare bottle endpoint doing one indexed UPDATE (autocommit) under the same
   gunicorn options (`apid.serve`), hammered by the same client code; the ratio 1/2. Rounds of
   1 and 2 alternate (`--rounds`), so a burst of other load hits both alike; the CPU each server
   spent per request (from /proc) is printed too, a figure less sensitive to other load.
3. Scale: queue listing, claim and summary latency with 1,000 and with `--large` rows in
   pipeline_tracking (the same ready tasks in both; the extra rows are finished history).

Targets (issue 2): >= 1,500 transitions/s, >= 0.6 of the floor, p99 <= 50 ms, the 1M figures
within 1.5x of the 1k ones. The machine is shared: say what else ran when you quote figures.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app import db  # noqa: E402
from app.config import MySQLURL, Settings  # noqa: E402

BASE = "/api/v1/pipeline"
# Ten digits, cross-joined: a row source of any size that MariaDB and MySQL both accept.
DIGITS = "(SELECT 0 d UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4 " \
         "UNION ALL SELECT 5 UNION ALL SELECT 6 UNION ALL SELECT 7 UNION ALL SELECT 8 UNION ALL SELECT 9)"


def numbers(power: int) -> str:
    """SQL yielding n in [0, 10**power)."""
    names = [f"d{i}" for i in range(power)]
    expr = " + ".join(f"{n}.d * {10 ** i}" for i, n in enumerate(names))
    return f"SELECT {expr} AS n FROM " + ", ".join(f"{DIGITS} {n}" for n in names)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class Http:
    """One keep-alive HTTP/1.1 connection with the least client CPU per request (http.client
    parses headers with the email package; on 2 shared cores that would cap the figures)."""

    def __init__(self, port: int):
        self.port = port
        self.sock: socket.socket | None = None
        self.buf = b""

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.buf = sock, b""
        return sock

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = b"" if body is None else orjson.dumps(body)
        head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n\r\n").encode()
        for attempt in (0, 1):
            sock = self.sock or self._connect()
            try:
                sock.sendall(head + data)
                return self._response(sock)
            except (ConnectionError, EOFError):
                self.sock = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _response(self, sock: socket.socket) -> tuple[int, dict]:
        while b"\r\n\r\n" not in self.buf:
            self._fill(sock)
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length, close = 0, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed mid-body")
            rest += chunk
        self.buf = rest[length:]
        if close:
            sock.close()
            self.sock = None
        return status, (orjson.loads(rest[:length]) if length else {})

    def _fill(self, sock: socket.socket) -> None:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError("connection closed")
        self.buf += chunk


# -- servers ------------------------------------------------------------------------------------

def server_env(url: MySQLURL, port: int, args) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MYSQL_", "PIPELINE_"))}
    env.update({
        "MYSQL_PIPELINE_URL": f"mysql://{url.user}:{url.password}@{url.host}:{url.port}/{url.database}",
        "PIPELINE_API_HOST": "127.0.0.1", "PIPELINE_API_PORT": str(port),
        "API_WORKERS": str(args.workers), "API_THREADS": str(args.threads),
        "LEASE_SECONDS": "300", "REAP_INTERVAL": "5", "SHARD_COUNT": "2", "PYTHONUNBUFFERED": "1",
    })
    return env


def start_server(argv: list[str], env: dict, port: int, ready_path: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if Http(port).call("GET", ready_path)[0] == 200:
                return proc
        except OSError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"server {argv} exited with {proc.returncode}")
        time.sleep(0.1)
    proc.terminate()
    raise SystemExit(f"server {argv} did not become ready")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def floor_app(settings: Settings):
    """The floor: parse a JSON body, one indexed UPDATE (autocommit), answer JSON."""
    import bottle

    conns = db.ThreadConnections(settings.pipeline_db)
    app = bottle.Bottle()

    @app.get("/ready")
    def ready():
        return {"status": "ready"}

    @app.post("/floor")
    def floor():
        body = orjson.loads(bottle.request.body.read())
        with conns.get().cursor() as cur:
            cur.execute("UPDATE pipeline_tracking SET lease_expires_at=NOW(3) + INTERVAL 60 SECOND "
                        "WHERE filename=%s AND shard=%s", (body["filename"], body["shard"]))
            changed = cur.rowcount
        bottle.response.content_type = "application/json"
        return orjson.dumps({"filename": body["filename"], "shard": body["shard"], "changed": changed})

    return app


def serve_floor() -> None:
    from app.api import service as apid
    apid.serve(Settings.from_env(), floor_app)


# -- data -------------------------------------------------------------------------------------------

def fresh_database(admin: MySQLURL) -> MySQLURL:
    url = admin.with_database(f"bench_api_{uuid.uuid4().hex[:8]}")
    db.ensure_database(url)
    return url


def drop_database(url: MySQLURL) -> None:
    conn = db.connect(url, database=None)
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{url.database}`")
    conn.close()


def install(url: MySQLURL) -> None:
    from app.api import schema
    conn = db.connect(url)
    db.migrate(conn, schema.SCHEMA)
    conn.close()


def add_rows(url: MySQLURL, first: int, statuses: tuple[str, str, str, str], count: int) -> float:
    """Insert `count` rows numbered from `first` (two shards per file name), 50,000 per
    statement, straight from SQL (no temporary table: /tmp is shared with other users)."""
    conn = db.connect(url)
    started = time.perf_counter()
    with conn.cursor() as cur:
        for chunk in range(0, count, 50_000):
            size = min(50_000, count - chunk)
            power = len(str(size - 1)) if size > 1 else 1
            cur.execute(
                "INSERT INTO pipeline_tracking (filename, shard, event_ingest_status, shard_splitter_status, "
                "shard_worker_status, mysql_sender_status, created_at, updated_at) "
                f"SELECT LPAD((n + %s) DIV 2, 14, '0'), (n + %s) MOD 2, %s, %s, %s, %s, NOW(3), NOW(3) "
                f"FROM ({numbers(power)}) seq WHERE n < %s",
                (first + chunk, first + chunk, *statuses, size))
    elapsed = time.perf_counter() - started
    conn.close()
    return elapsed


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of processes (and their reaped children), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15]) / tick
    return total


def process_tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                children = (task / "children").read_text().split()
                todo.extend(int(c) for c in children)
        except OSError:
            pass
    return out


def mariadb_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() in ("mariadbd", "mysqld"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


# -- phase 1 and 2: throughput ----------------------------------------------------------------------

def hammer(port: int, clients: int, seconds: float, cycle, server_pid: int) -> dict:
    """Run `cycle(http, record)` in `clients` threads for `seconds` (after a 1 s warm-up)."""
    stop = threading.Event()
    measuring = threading.Event()
    latencies: dict[str, list[float]] = {}
    errors: list[str] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        http = Http(port)
        mine: dict[str, list[float]] = {}

        def record(kind: str, method: str, path: str, body: dict | None, ok=(200,)) -> dict:
            t0 = time.perf_counter()
            status, data = http.call(method, path, body)
            elapsed = time.perf_counter() - t0
            if status not in ok:
                errors.append(f"{kind}: HTTP {status} {data}")
            if measuring.is_set():
                mine.setdefault(kind, []).append(elapsed)
            return data

        while not stop.is_set():
            cycle(n, record)
        with lock:
            for kind, values in mine.items():
                latencies.setdefault(kind, []).extend(values)

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(clients)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    servers, dbs = process_tree(server_pid), mariadb_pids()
    cpu0 = (cpu_seconds(servers), cpu_seconds(dbs), time.process_time())
    measuring.set()
    t0 = time.perf_counter()
    time.sleep(seconds)
    measuring.clear()
    elapsed = time.perf_counter() - t0
    cpu = (cpu_seconds(servers) - cpu0[0], cpu_seconds(dbs) - cpu0[1], time.process_time() - cpu0[2])
    stop.set()
    for t in threads:
        t.join(30)
    every = [v for values in latencies.values() for v in values]
    return {"elapsed": elapsed, "count": len(every), "rate": len(every) / elapsed,
            "p50": pct(every, 0.50) * 1000, "p99": pct(every, 0.99) * 1000,
            "kinds": {k: (len(v), pct(v, 0.5) * 1000, pct(v, 0.99) * 1000) for k, v in latencies.items()},
            "errors": errors, "cpu": cpu}


def throughput(admin: MySQLURL, args) -> tuple[list[dict], list[dict]]:
    """Alternate rounds of the real API and of the floor (servers started once each), so a burst
    of load from other users of the machine hits both alike."""
    api_db, floor_db = fresh_database(admin), fresh_database(admin)
    procs = []
    try:
        install(api_db)
        install(floor_db)
        tasks = int(args.rounds * args.seconds * 2500 + 20000)
        add_rows(api_db, 0, ("done", "new", "new", "new"), tasks)
        add_rows(floor_db, 0, ("done", "new", "new", "new"), 20000)
        api_port, floor_port = free_port(), free_port()
        procs.append(start_server(["-m", "app.apid"], server_env(api_db, api_port, args), api_port,
                                  f"{BASE}/ready"))
        procs.append(start_server([str(Path(__file__).resolve()), "--serve-floor"],
                                  server_env(floor_db, floor_port, args), floor_port, "/ready"))
        stage = "shard-splitter"

        def cycle(n: int, record) -> None:
            worker = f"bench-{n}"
            items = record("claim", "POST", f"{BASE}/queues/{stage}/claim", {"limit": 1, "worker": worker})["items"]
            if not items:
                return
            task = {"filename": items[0]["filename"], "shard": items[0]["shard"], "worker": worker}
            record("heartbeat", "POST", f"{BASE}/stages/{stage}/heartbeat", task)
            record("done", "POST", f"{BASE}/stages/{stage}/done", {**task, "events": 10})

        def floor_cycle(n: int, record) -> None:
            i = (n * 1237 + int(time.perf_counter() * 1e6)) % 20000
            record("update", "POST", "/floor", {"filename": f"{i // 2:014d}", "shard": i % 2})

        api_runs, floor_runs = [], []
        for _ in range(args.rounds):
            api_runs.append(hammer(api_port, args.clients, args.seconds, cycle, procs[0].pid))
            floor_runs.append(hammer(floor_port, args.clients, args.seconds, floor_cycle, procs[1].pid))
        return api_runs, floor_runs
    finally:
        for proc in procs:
            stop_server(proc)
        if not args.keep:
            drop_database(api_db)
            drop_database(floor_db)


# -- phase 3: scale ------------------------------------------------------------------------------------

def timed(http: Http, method: str, path: str, body: dict | None = None, repeat: int = 200) -> tuple[float, float]:
    values = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        status, data = http.call(method, path, body)
        values.append(time.perf_counter() - t0)
        if status != 200:
            raise SystemExit(f"{method} {path}: HTTP {status} {data}")
    return pct(values, 0.5) * 1000, pct(values, 0.99) * 1000


def measure_scale(http: Http) -> dict:
    out = {}
    for stage in ("shard-splitter", "shard-worker", "mysql-sender"):
        out[f"queue {stage}"] = timed(http, "GET", f"{BASE}/queues/{stage}?limit=100")
        out[f"queue {stage} shard 1"] = timed(http, "GET", f"{BASE}/queues/{stage}?limit=100&shard=1")
    for stage, shard in (("shard-splitter", None), ("shard-worker", 0), ("mysql-sender", 1)):
        body = {"limit": 4, "worker": "bench-scale", **({"shard": shard} if shard is not None else {})}
        claims, releases = [], []
        for _ in range(100):
            t0 = time.perf_counter()
            status, data = http.call("POST", f"{BASE}/queues/{stage}/claim", body)
            claims.append(time.perf_counter() - t0)
            if status != 200 or not data["items"]:
                raise SystemExit(f"claim {stage}: HTTP {status} {data}")
            for item in data["items"]:
                t0 = time.perf_counter()
                http.call("POST", f"{BASE}/stages/{stage}/release",
                          {"filename": item["filename"], "shard": item["shard"], "worker": "bench-scale"})
                releases.append(time.perf_counter() - t0)
        out[f"claim {stage}"] = (pct(claims, 0.5) * 1000, pct(claims, 0.99) * 1000)
    out["tasks shard-worker failed"] = timed(http, "GET", f"{BASE}/tasks/shard-worker?status=failed&limit=100")
    out["summary"] = timed(http, "GET", f"{BASE}/metrics/summary", repeat=5)
    return out


def scale(admin: MySQLURL, args) -> tuple[dict, dict, float]:
    url = fresh_database(admin)
    try:
        install(url)
        # The same 1,000 rows in both runs: 100 ready per stage, some failed, the rest finished.
        # (splitter-ready files last: the shard worker never claims past a file not yet split)
        add_rows(url, 0, ("done", "done", "done", "done"), 700)
        add_rows(url, 700, ("done", "done", "new", "new"), 100)
        add_rows(url, 800, ("done", "done", "done", "new"), 90)
        add_rows(url, 890, ("done", "done", "failed", "new"), 10)
        add_rows(url, 900, ("done", "new", "new", "new"), 100)
        port = free_port()
        proc = start_server(["-m", "app.apid"], server_env(url, port, args), port, f"{BASE}/ready")
        try:
            http = Http(port)
            small = measure_scale(http)
            load = add_rows(url, 10**7, ("done", "done", "done", "done"), args.large - 1000)
            conn = db.connect(url)
            with conn.cursor() as cur:
                cur.execute("ANALYZE TABLE pipeline_tracking")
                cur.fetchall()
            conn.close()
            measure_scale(http)  # warm the new pages, as a running system would have them
            large = measure_scale(http)
        finally:
            stop_server(proc)
        return small, large, load
    finally:
        if not args.keep:
            drop_database(url)


def cpu_line(result: dict) -> str:
    n = max(result["count"], 1)
    api, dbs, client = (c * 1000 / n for c in result["cpu"])
    return f"  CPU per request: server {api:.2f} ms, MariaDB {dbs:.2f} ms (all its clients), bench client {client:.2f} ms"


def main() -> None:
    if "--serve-floor" in sys.argv:
        serve_floor()
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=2, help="alternating API/floor rounds")
    parser.add_argument("--skip", default="", help="comma list of phases to skip: throughput,scale")
    parser.add_argument("--keep", action="store_true", help="keep the bench databases")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    admin = Settings.from_env().pipeline_db
    load = os.getloadavg()
    print(f"pipeline-apid bench: {args.clients} clients, gunicorn {args.workers} workers x {args.threads} "
          f"threads, {os.cpu_count()} CPUs, load average before {load[0]:.2f}")
    if "throughput" not in skip:
        api_runs, floor_runs = throughput(admin, args)
        for n, (result, flo) in enumerate(zip(api_runs, floor_runs), 1):
            print(f"\nround {n}: transitions (claim -> heartbeat -> done) {result['rate']:.0f}/s, "
                  f"p50 {result['p50']:.1f} ms, p99 {result['p99']:.1f} ms, errors {len(result['errors'])}")
            for kind, (count, p50, p99) in sorted(result["kinds"].items()):
                print(f"  {kind:<10} {count:>7} requests  p50 {p50:6.1f} ms  p99 {p99:6.1f} ms")
            print(cpu_line(result))
            for e in result["errors"][:5]:
                print("  error:", e)
            print(f"round {n}: floor (bare bottle endpoint, one indexed UPDATE) {flo['rate']:.0f}/s, "
                  f"p50 {flo['p50']:.1f} ms, p99 {flo['p99']:.1f} ms, errors {len(flo['errors'])}")
            print(cpu_line(flo))
            print(f"round {n}: ratio {result['rate'] / flo['rate']:.2f}")
        best = max(api_runs, key=lambda r: r["rate"])
        best_floor = max(floor_runs, key=lambda r: r["rate"])
        ratios = sorted(r["rate"] / f["rate"] for r, f in zip(api_runs, floor_runs))
        print(f"\nbest transitions {best['rate']:.0f}/s (p99 {best['p99']:.1f} ms), best floor "
              f"{best_floor['rate']:.0f}/s, ratio per round {', '.join(f'{x:.2f}' for x in ratios)}")
        cpu_ratio = (sum(f["cpu"][0] for f in floor_runs) / sum(f["count"] for f in floor_runs)) / (
            sum(r["cpu"][0] for r in api_runs) / sum(r["count"] for r in api_runs))
        print(f"server CPU per request, floor / API, all rounds: {cpu_ratio:.2f} (what the throughput ratio "
              f"would be if the server's CPU were the only limit; less sensitive to other load)")
        print(f"targets: >= 1500/s {'OK' if best['rate'] >= 1500 else 'MISSED'}, "
              f">= 0.6 of floor {'OK' if ratios[-1] >= 0.6 else 'MISSED'} (best round), "
              f"p99 <= 50 ms {'OK' if best['p99'] <= 50 else 'MISSED'}")
    if "scale" not in skip:
        small, large, load_s = scale(admin, args)
        print(f"\nscale: 1,000 rows vs {args.large:,} rows (bulk insert of the extra rows took {load_s:.1f}s)")
        print(f"  {'request':<32} {'p50 1k':>8} {'p50 large':>10} {'ratio':>6}   {'p99 1k':>7} {'p99 large':>9}")
        for key in small:
            a, b = small[key], large[key]
            print(f"  {key:<32} {a[0]:7.2f}ms {b[0]:9.2f}ms {b[0] / a[0]:6.2f}   {a[1]:6.2f}ms {b[1]:8.2f}ms")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
