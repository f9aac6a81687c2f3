"""SQL statements the API runs per request, and per task (claim -> done), on a private server
(prints figures; not a test).

    .venv/bin/python bench/apistatements.py [--rounds 10]

A private mariadbd (tests/servers.py) serves only pipeline-apid (`python -m app.apid`, default
settings), so the server's own Com_* counters, read before and after each request, are the
API's statements (this script's reads of them left out). For each stage it registers files and
moves their tasks along as the daemons do: claim, done, a heartbeat (what a task that outlives
a third of its lease costs), an empty claim; the batch `done` of a file's two shards where the
API has one. Medians over --rounds files.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.client import ApiError, PipelineClient  # noqa: E402
from tests import servers  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    db = servers.new_private_mariadb()
    api = None
    try:
        conn = servers.admin_connect(port=db.port)

        def statements() -> int:
            return servers.server_statements(conn)

        work = Path(tempfile.mkdtemp(prefix="apistatements-"))
        env = servers.service_env(db.url("pipeline_db"), work, servers.free_port())
        api = servers.start_api(env, work / "logs")
        client = PipelineClient(api.base, max_wait=10)
        samples: dict[str, list[int]] = {}

        def measure(kind: str, call):
            before = statements()
            result = call()
            samples.setdefault(kind, []).append(statements() - before)
            return result

        batch = hasattr(client, "done_batch")
        for i in range(args.rounds):
            name = f"2025{i:010d}"
            measure("register", lambda: client.register(name, [0, 1]))
            measure("event-ingest done", lambda: client.ingest_done(name, events=100, worker="bench"))
            for stage in ("shard-splitter", "shard-worker", "mysql-sender"):
                shards = [None] if stage == "shard-splitter" else [0, 1]
                for shard in shards:
                    limit = 4 if shard is None else 1
                    got = measure(f"{stage} claim", lambda: client.claim(stage, "bench/w", limit, shard))
                    if got:
                        measure(f"{stage} heartbeat", lambda: client.heartbeat(stage, got[0].filename,
                                                                               got[0].shard, "bench/w"))
                    if batch and len(got) > 1:
                        measure(f"{stage} done-batch ({len(got)} tasks)", lambda: client.done_batch(
                            stage, [{"filename": t.filename, "shard": t.shard, "events": 50} for t in got],
                            "bench/w"))
                    else:
                        for t in got:
                            measure(f"{stage} done", lambda: client.done(stage, t.filename, t.shard, "bench/w",
                                                                         events=50, stats={"bench": 1}))
                    try:
                        measure(f"{stage} claim (nothing ready)", lambda: client.claim(stage, "bench/w", limit, shard))
                    except ApiError:
                        pass
        if hasattr(client, "done_and_claim"):
            for i in range(args.rounds):   # the daemons' calls since the done that claims
                names = [f"2026{i:05d}{n:05d}" for n in range(2)]
                for name in names:
                    measure("register with done", lambda: client.register(name, [0, 1], done=True, events=100,
                                                                          worker="bench"))
                for stage in ("shard-splitter", "shard-worker", "mysql-sender"):
                    for shard in ([None] if stage == "shard-splitter" else [0, 1]):
                        limit = 2 if shard is None else 1
                        spec = {"limit": limit, **({"shard": shard} if shard is not None else {})}
                        got = client.claim(stage, "bench/n", limit, shard)
                        for label in ("next ready", "nothing ready"):
                            if shard is None:
                                items = [{"filename": t.filename, "shard": t.shard, "events": 50} for t in got]
                                got = measure(f"{stage} done-batch + claim ({label})", lambda: client.done_batch_and_claim(
                                    stage, items, "bench/n", spec))[1]
                            else:
                                got = measure(f"{stage} done + claim ({label})", lambda: client.done_and_claim(
                                    stage, got[0].filename, got[0].shard, "bench/n", spec, events=50))[1]
                        measure(f"{stage} long-poll claim (nothing ready)",
                                lambda: client.claim(stage, "bench/n", limit, shard, wait=0.05))
        print(f"statements per request, median of {args.rounds} (min-max), code at {ROOT}:")
        for kind, values in samples.items():
            print(f"  {kind:42s} {statistics.median(values):5.1f}  ({min(values)}-{max(values)})")
        per_task = [statistics.median(samples[k]) for k in samples if k.startswith("shard-worker ") and
                    k.split(" ", 1)[1] in ("claim", "done")]
        print(f"  shard-worker claim + done per task: {sum(per_task):.1f}")
        conn.close()
    finally:
        if api is not None:
            api.process.stop()
        db.stop()


if __name__ == "__main__":
    main()
