"""The API's cost per file, alone: CPU of pipeline-apid and of the database server, SQL
statements and requests, for the calls the daemons make for one file of two shards (prints
figures; not a test).

    .venv/bin/python bench/apifile.py [--files 300] [--rounds 2] [--profile out.txt] [--other DIR] [--pipelined]
                                      [--same] [--hold N]

`--other DIR`: a second API run from another checkout of the code (e.g. `git archive` of the
base commit), on its own database of the same server; rounds alternate between the two, so
other load on the machine hits both alike. `--pipelined`: the daemons in steady state with work
waiting (`Pipelined`: every stage one file behind the one before), this checkout's API played
with the daemons' current calls (register with done, a done that claims the next file) and
--other's with the calls before them (register + ingest done, done + claim), or with `--same`
the current calls too; `--hold N`: workers and senders claim N files and report them together
(a `done-batch` that claims), as they do with small files.

A private mariadbd (tests/servers.py) serves only pipeline-apid (`python -m app.apid`, default
settings). One client thread plays every daemon in turn, file after file, as bench/pipeline.py's
profile counts them: register, ingest done, the splitter's claim and batch done, then per shard
the worker's and the sender's long-poll claim (`wait=2`) and done; then an empty short claim
and an empty long poll of each stage (which a daemon makes between files). CPU seconds come
from /proc (the API's process tree, mariadbd); statements from the server's Com_* counters
(triggers' statements included). `--profile`: py-spy (collapsed) of the API during round 1.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.client import PipelineClient  # noqa: E402
from bench.procstat import cpu_seconds  # noqa: E402
from tests import servers  # noqa: E402

SHARDS = (0, 1)


def one_file(client: PipelineClient, name: str, empty: bool) -> int:
    """The calls the pipeline's daemons make for one file; the number of requests."""
    requests = 0

    def call(fn, *args, **kw):
        nonlocal requests
        requests += 1
        return fn(*args, **kw)

    call(client.register, name, list(SHARDS))
    call(client.ingest_done, name, events=500, worker="bench/ingest")
    got = call(client.claim, "shard-splitter", "bench/splitter", 4, None, wait=2)
    call(client.done_batch, "shard-splitter",
         [{"filename": t.filename, "shard": t.shard, "events": 250,
           "stats": {"lines": 250, "rejected": {"bad_json": 1}}} for t in got], "bench/splitter")
    for stage in ("shard-worker", "mysql-sender"):
        for shard in SHARDS:
            owner = f"bench/{stage}-{shard}"
            for t in call(client.claim, stage, owner, 1, shard, wait=2):
                call(client.done, stage, t.filename, t.shard, owner, events=250, stats={"loaded": 250})
    if empty:
        for stage, shard in (("shard-splitter", None), ("shard-worker", 0), ("mysql-sender", 1)):
            call(client.claim, stage, f"bench/{stage}-{shard}", 1, shard)
            call(client.claim, stage, f"bench/{stage}-{shard}", 1, shard, wait=0.05)
    return requests


class Pipelined:
    """The daemons in steady state with work waiting: each step registers a file and moves every
    stage's daemon one file along (the splitter reports file i-1 and takes file i, each worker
    i-2 and takes i-1, each sender i-3 and takes i-2). `combined`: the calls of the daemons since
    the done that claims (register with done; a done that claims the next file); else the calls
    before it (register, ingest done; a done, then a claim)."""

    STAGES = (("shard-splitter", None), ("shard-worker", 0), ("shard-worker", 1), ("mysql-sender", 0),
              ("mysql-sender", 1))

    def __init__(self, client: PipelineClient, combined: bool, hold: int = 1):
        self.client, self.combined, self.hold = client, combined, hold
        self.held: dict[tuple[str, int | None], list] = {}
        self.steps = 0

    def step(self, name: str) -> int:
        c, requests = self.client, 0
        self.steps += 1
        if self.combined and hasattr(c, "done_and_claim"):
            c.register(name, list(SHARDS), done=True, events=500, worker="bench/ingest")
            requests += 1
        else:
            c.register(name, list(SHARDS))
            c.ingest_done(name, events=500, worker="bench/ingest")
            requests += 2
        for stage, shard in self.STAGES:
            if shard is not None and self.steps % self.hold:
                continue   # `hold`: workers and senders take a claim's files every hold-th step
            owner, limit = f"bench/{stage}-{shard}", 2 if shard is None else self.hold
            spec = {"limit": limit, **({"shard": shard} if shard is not None else {})}
            held = self.held.get((stage, shard)) or []
            items = [{"filename": t.filename, "shard": t.shard, "events": 250,
                      "stats": {"lines": 250, "rejected": {"bad_json": 1}} if shard is None else {"loaded": 250}}
                     for t in held]
            got = None
            if held and self.combined:
                if shard is None or len(held) > 1:
                    got = c.done_batch_and_claim(stage, items, owner, spec)[1]
                else:
                    got = c.done_and_claim(stage, held[0].filename, shard, owner, spec, 250, items[0]["stats"])[1]
                requests += 1
            elif held:
                if shard is None or len(held) > 1:
                    c.done_batch(stage, items, owner)
                else:
                    c.done(stage, held[0].filename, shard, owner, 250, items[0]["stats"])
                requests += 1
            if got is None:
                got = c.claim(stage, owner, limit, shard)
                requests += 1
            self.held[(stage, shard)] = got
        return requests


def run_files(client: PipelineClient, clients: int, prefix: str, files: int, empty: bool,
              pipelined: Pipelined | None = None) -> int:
    if pipelined is not None:
        return sum(pipelined.step(f"{prefix}p{i:06d}") for i in range(files))
    """`files` files, by `clients` threads at once (each with its own HTTP session); requests made."""
    if clients <= 1:
        return sum(one_file(client, f"{prefix}f{i:06d}", empty) for i in range(files))
    counts = [0] * clients

    def play(n: int) -> None:
        mine = PipelineClient(client.base, max_wait=10)
        counts[n] = sum(one_file(mine, f"{prefix}c{n}f{i:06d}", empty) for i in range(n, files, clients))
    threads = [threading.Thread(target=play, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--empty", action="store_true", help="add empty claims after each file")
    parser.add_argument("--clients", type=int, default=1, help="client threads, each its own files")
    parser.add_argument("--profile", type=Path, help="py-spy collapsed output of the API (round 1)")
    parser.add_argument("--other", type=Path, help="another checkout: its API alternates rounds with this one")
    parser.add_argument("--pipelined", action="store_true",
                        help="the daemons in steady state with work waiting (class Pipelined); this checkout's API "
                             "gets the daemons' current calls, --other's the calls before the done that claims")
    parser.add_argument("--same", action="store_true",
                        help="with --pipelined: --other's API gets the daemons' current calls too")
    parser.add_argument("--hold", type=int, default=1,
                        help="with --pipelined: workers and senders claim and report this many files at once "
                             "(a done-batch that claims), as they do with small files")
    args = parser.parse_args()
    db = servers.new_private_mariadb()
    api = other = None
    try:
        conn = servers.admin_connect(port=db.port)

        def statements() -> int:
            return servers.server_statements(conn)

        work = Path(tempfile.mkdtemp(prefix="apifile-"))
        env = servers.service_env(db.url("pipeline_db"), work, servers.free_port())
        api = servers.start_api(env, work / "logs")
        apis = [("this", PipelineClient(api.base, max_wait=10), api.process.proc.pid)]
        if args.other:
            env2 = servers.service_env(db.url("pipeline_db_other"), work / "other", servers.free_port())
            other = servers.Process("app.apid", [], env2, work / "logs" / "other.log")
            other.start = lambda: setattr(other, "proc", subprocess.Popen(
                [sys.executable, "-m", "app.apid"], cwd=args.other, env={**env2, "PYTHONPATH": str(args.other)},
                stdout=open(other.log_path, "ab"), stderr=subprocess.STDOUT, start_new_session=True))
            other.start()
            srv = servers.ApiServer(other, int(env2["PIPELINE_API_PORT"]))
            srv.wait_ready()
            apis.append(("other", PipelineClient(srv.base, max_wait=10), other.proc.pid))
        db_pid = db.proc.pid
        if os.environ.get("APIFILE_DROP_TRIGGERS"):  # an experiment: what the counting triggers cost
            with conn.cursor() as cur:
                for t in ("pipeline_task_counts_insert", "pipeline_task_counts_update",
                          "pipeline_transition_counts_insert"):
                    cur.execute(f"DROP TRIGGER pipeline_db.{t}")
        players = {label: Pipelined(client, label == "this" or args.same, args.hold) if args.pipelined else None
                   for label, client, _ in apis}
        for label, client, _ in apis:
            for i in range(20):  # warm up: connections, code paths
                if args.pipelined:
                    players[label].step(f"warm{i:06d}")
                else:
                    one_file(client, f"warm{i:06d}", args.empty)
        results: dict[str, list] = {}
        for r in range(args.rounds * len(apis)):
            label, client, api_pid = apis[r % len(apis)]
            spy = None
            if args.profile and r == 0:
                spy = subprocess.Popen([str(ROOT / ".venv/bin/py-spy"), "record", "--pid", str(api_pid),
                                        "--subprocesses", "--gil", "--format", "raw", "--rate", "250", "--nonblocking",
                                        "-o", str(args.profile)], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
                time.sleep(1.0)
            s0, a0, d0, w0 = statements(), cpu_seconds(api_pid), cpu_seconds(db_pid), time.monotonic()
            reqs = run_files(client, args.clients, f"r{r}", args.files, args.empty, players[label])
            s1, a1, d1, w1 = statements(), cpu_seconds(api_pid), cpu_seconds(db_pid), time.monotonic()
            if spy is not None:
                spy.send_signal(2)
                spy.wait(30)
            n = args.files
            got = ((a1 - a0) * 1000 / n, (d1 - d0) * 1000 / n, (s1 - s0 - 1) / n, reqs / n,
                   (a1 - a0) * 1e6 / reqs, (w1 - w0) * 1000 / n)
            results.setdefault(label, []).append(got)
            print(f"round {r + 1} ({label}): API {got[0]:.2f} ms CPU/file, server {got[1]:.2f} ms/file, "
                  f"{got[2]:.1f} statements/file, {got[3]:.1f} requests/file, "
                  f"API {got[4]:.0f} us CPU/request, wall {got[5]:.1f} ms/file", flush=True)
        for label, rows in results.items():
            med = [statistics.median(x) for x in zip(*rows)]
            print(f"{label}: median of {len(rows)} rounds of {args.files} files: API {med[0]:.2f} ms CPU/file "
                  f"({med[4]:.0f} us/request, {med[3]:.1f} requests/file), server {med[1]:.2f} ms CPU/file, "
                  f"{med[2]:.1f} statements/file, wall {med[5]:.1f} ms/file")
    finally:
        for proc in (api.process if api else None, other):
            if proc is not None:
                proc.stop()
        db.stop()


if __name__ == "__main__":
    main()
