"""CPU per call of the daemons' API client (app/client.py), against a bare local HTTP server
in another process (its CPU not counted): the kept-alive http.client transport, the `requests`
transport it falls back to (https, proxies), and `requests` as the client used it before.

    .venv/bin/python bench/client.py [--calls 3000]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from app.client import PipelineClient, _Session  # noqa: E402

SERVER = r'''
import json, socket, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def setup(self):
        super().setup()
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(n)
        out = b'{"items": [{"filename": "20250101000000", "shard": 0, "attempts": 0}]}'
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out))); self.end_headers(); self.wfile.write(out)
s = ThreadingHTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
'''


def per_call_us(fn, calls: int) -> float:
    fn()
    began = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - began) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=3000)
    args = ap.parse_args()
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{proc.stdout.readline().strip()}/api/v1/pipeline"
        token = "t" * 32
        fast = PipelineClient(base, token)
        fallback = PipelineClient(base, token)
        fallback._transports = [_Session(fallback.session, base)]
        old = requests.Session()
        old.headers["Authorization"] = f"Bearer {token}"
        body = {"limit": 1, "worker": "host:123:abc", "shard": 0}

        def before():
            resp = old.request("POST", base + "/queues/shard-worker/claim", json=body, timeout=10.0)
            resp.json() if resp.content else None

        for name, fn in (("before (requests, json=)", before),
                         ("requests transport (https/proxy)", lambda: fallback.claim("shard-worker", "host:123:abc", 1, 0)),
                         ("http.client transport", lambda: fast.claim("shard-worker", "host:123:abc", 1, 0))):
            print(f"{name:34s} {per_call_us(fn, args.calls):7.1f} us CPU per call")
    finally:
        proc.kill()


if __name__ == "__main__":
    main()
