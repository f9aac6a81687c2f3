"""The API's per-request Python outside the database: CPU of the HTTP path alone (prints figures; not a test).

    .venv/bin/python bench/apihttp.py [--requests 20000] [--rounds 3] [--root <other checkout>] [--profile FILE]

In one process, no database and no threads: the real `BufferingProcess._handle` (gunicorn's
parser, its WSGI environ and response writer, bottle, the app's endpoint wrapper, validation,
orjson) answers requests shaped like the daemons' (a `done-batch` that claims, a claim, a
registration, GET of a file, /health) through a socketpair, with the tracker replaced by a stub
that answers at once. What is left per request is what the API spends besides the database.
`--root` runs another checkout's code (alternate with this one for a comparison).
"""
from __future__ import annotations

import argparse
import importlib
import os
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ITEM = {"filename": "20261129T000000.000000Z.event-ingest.txt", "shard": 1, "stage": "shard-worker",
        "status": "done", "attempts": 1, "worker": "shard-worker-1", "updated_rows": 1}
NEXT = [{"filename": "20261129T000001.000000Z.event-ingest.txt", "shard": 1, "attempts": 1,
         "lease_expires_at": "2026-11-29T00:00:30.000000Z"}]


class Moved:
    changed = True
    shard = 1

    def as_dict(self):
        return dict(ITEM)


class StubTracker:
    """Answers every call the measured routes make, at once."""

    def __init__(self):
        self.schema = type("S", (), {"ensure": staticmethod(lambda: None)})()
        self.store = type("Store", (), {"read": staticmethod(lambda *a: [])})()

    def reap(self):
        return []

    def claim(self, stage, limit, shard, owner):
        return [dict(r) for r in NEXT]

    def upstream(self, stage, shard):
        return 0, 0

    def may_claim(self, stage, shard, owner):
        return True

    def done_and_claim(self, stage, tasks, owner, limit, shard):
        return [Moved() for _ in tasks], [dict(r) for r in NEXT]

    def register(self, filename, shards, done=False, worker=None, events=None):
        return {"filename": filename, "shards": shards, "registered": len(shards), "updated_rows": len(shards)}

    def file(self, filename):
        return {"filename": filename, "tasks": [dict(ITEM, stage=s) for s in ("shard-splitter", "shard-worker")]}


def requests() -> dict[str, bytes]:
    base = "/api/v1/pipeline"
    host = b"Host: 127.0.0.1:8082\r\nUser-Agent: pipeline-client\r\nAccept: */*\r\nConnection: keep-alive\r\n"

    def post(path, body):
        import orjson
        raw = orjson.dumps(body)
        return (f"POST {path} HTTP/1.1\r\n".encode() + host + b"Content-Type: application/json\r\n"
                + f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)

    items = [{"filename": f"20261129T00000{i}.000000Z.event-ingest.txt", "shard": 1, "events": 250,
              "stats": {"events": 250, "duplicates": 0, "held": 0}} for i in range(4)]
    return {
        "done-batch+claim": post(f"{base}/stages/shard-worker/done-batch?wait=2",
                                 {"worker": "shard-worker-1", "items": items, "claim": {"limit": 4, "shard": 1}}),
        "claim": post(f"{base}/queues/mysql-sender/claim", {"worker": "mysql-sender-1", "limit": 4, "shard": 1}),
        "register": post(f"{base}/files/register", {"filename": "20261129T000000.000000Z.event-ingest.txt",
                                                    "done": True, "worker": "event-ingest", "events": 500}),
        "GET file": f"GET {base}/files/20261129T000000.000000Z.event-ingest.txt HTTP/1.1\r\n".encode() + host + b"\r\n",
        "health": b"GET /health HTTP/1.1\r\n" + host + b"\r\n",
    }


def build(root: Path):
    sys.path.insert(0, str(root))
    for name in [m for m in sys.modules if m == "app" or m.startswith("app.")]:
        del sys.modules[name]
    service = importlib.import_module("app.api.service")
    server = importlib.import_module("app.api.server")
    from app.config import Settings
    from gunicorn.config import Config
    from gunicorn.glogging import Logger

    settings = Settings.from_env({})
    api = service.Api.__new__(service.Api)
    original_init = service.tracking.Tracker
    service.tracking.Tracker = lambda *a, **k: StubTracker()
    try:
        service.Api.__init__(api, settings)
    finally:
        service.tracking.Tracker = original_init
    cfg = Config()
    cfg.set("keepalive", 30)
    cfg.set("accesslog", None)
    cfg.set("errorlog", "-")
    cfg.set("loglevel", "warning")
    log = Logger(cfg)
    proc = server.BufferingProcess(0, os.getppid(), [], None, 30, cfg, log)
    proc.wsgi = api.app
    proc.alive = True
    proc.max_requests = sys.maxsize
    if hasattr(server, "SettledConfig"):
        proc.settled = server.SettledConfig(cfg)
    return proc, server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20000, help="requests of each kind per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--root", type=Path, default=ROOT, help="the checkout whose code to run")
    ap.add_argument("--profile", help="cProfile stats of one round to this file")
    args = ap.parse_args()
    proc, server = build(args.root.resolve())
    a, b = socket.socketpair()
    b.setblocking(False)
    conn = server.Conn(a, ("127.0.0.1", 40000), ("127.0.0.1", 8082))
    kinds = requests()
    for kind, raw in kinds.items():
        assert proc._handle(conn, raw), kind
        answer = b.recv(1 << 16)
        status = answer.split(b" ", 2)[1]
        assert status == b"200", (kind, answer[:400])
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for kind, raw in kinds.items():
            if args.profile:
                import cProfile
                prof = cProfile.Profile()
                prof.enable()
            began = time.process_time()
            for _ in range(args.requests):
                proc._handle(conn, raw)
                b.recv(1 << 16)
            spent = (time.process_time() - began) / args.requests * 1e6
            if args.profile:
                prof.disable()
                prof.dump_stats(f"{args.profile}.{kind.replace(' ', '_').replace('+', '_')}")
            best[kind] = min(best.get(kind, spent), spent)
    print(f"{args.root}: CPU per request, best of {args.rounds} rounds of {args.requests}")
    for kind, us in best.items():
        print(f"  {kind:18s} {us:7.1f} us")


if __name__ == "__main__":
    main()
