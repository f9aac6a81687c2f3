"""The daemons' HTTP client (app/client.py) against a bare local server: what reaches the wire,
kept-alive connections, an idle connection the server closed, failover and proxies."""
from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from app.client import ApiError, ApiUnavailable, PipelineClient, _Plain, _Session


class Recorder(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    status = 200
    close_after = False

    def log_message(self, *args):  # noqa: D102 - quiet
        pass

    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.seen.append((self.command, self.path, dict(self.headers), body, self.client_address[1]))
        out = json.dumps({"path": self.path, "items": []}).encode()
        self.send_response(self.server.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
        if self.server.close_after:
            self.close_connection = True

    do_GET = do_POST = _answer


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    srv.daemon_threads = True
    srv.seen, srv.status, srv.close_after = [], 200, False
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def base_of(srv) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}/api/v1/pipeline"


def test_requests_reach_the_wire_as_before_and_reuse_one_connection(server, monkeypatch):
    monkeypatch.delenv("http_proxy", raising=False)
    monkeypatch.delenv("HTTP_PROXY", raising=False)
    client = PipelineClient(base_of(server), token="s3cret-token-0123456789")
    assert isinstance(client._transports[0], _Plain)
    client.claim("shard-worker", "w1", limit=2, shard=1, wait=0.5)
    client.queue("shard-worker", limit=5, offset=10)
    client.file("20250101000000")
    (m1, p1, h1, b1, port1), (m2, p2, h2, _, port2), (m3, p3, _, _, port3) = server.seen
    assert (m1, p1) == ("POST", "/api/v1/pipeline/queues/shard-worker/claim?wait=0.5")
    assert json.loads(b1) == {"limit": 2, "worker": "w1", "shard": 1}
    assert h1["Content-Type"] == "application/json" and h1["Authorization"] == "Bearer s3cret-token-0123456789"
    assert (m2, p2) == ("GET", "/api/v1/pipeline/queues/shard-worker?limit=5&offset=10")
    assert h2["Authorization"] == "Bearer s3cret-token-0123456789" and "Content-Type" not in h2
    assert (m3, p3) == ("GET", "/api/v1/pipeline/files/20250101000000")
    assert port1 == port2 == port3  # one kept-alive connection


def test_a_connection_the_server_closed_while_idle_is_replaced_without_failover(server, caplog):
    client = PipelineClient(f"{base_of(server)},http://127.0.0.1:9/api/v1/pipeline", max_wait=0)
    client.file("20250101000000")
    conn = client._transports[0]._local.conn
    conn.sock.shutdown(socket.SHUT_RDWR)  # as if the server had closed it after its keep-alive
    caplog.set_level("INFO", logger="pipeline-client")
    assert client.file("20250101000001")["path"].endswith("/20250101000001")
    assert client.base == base_of(server).rstrip("/")
    assert not caplog.records


def test_a_server_that_closes_after_each_answer_is_still_served(server):
    server.close_after = True
    client = PipelineClient(base_of(server), max_wait=0)
    for i in range(3):
        client.file(f"2025010100000{i}")
    assert len({s[4] for s in server.seen}) == 3


def test_4xx_is_an_api_error_and_5xx_fails_over_then_gives_up(server):
    server.status = 409
    client = PipelineClient(base_of(server), max_wait=0)
    with pytest.raises(ApiError) as err:
        client.file("x")
    assert err.value.status == 409
    server.status = 503
    with pytest.raises(ApiUnavailable, match="HTTP 503"):
        client.file("x")


def test_an_unreachable_instance_fails_over_to_the_next(server):
    client = PipelineClient(f"http://127.0.0.1:9/api/v1/pipeline,{base_of(server)}", max_wait=0, timeout=2)
    assert client.file("20250101000000")["path"] == "/api/v1/pipeline/files/20250101000000"
    assert client.base == base_of(server)


def test_https_and_proxied_urls_go_through_requests(monkeypatch):
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert isinstance(PipelineClient("https://api.example:8082/api/v1/pipeline")._transports[0], _Session)
    monkeypatch.setenv("http_proxy", "http://proxy.example:3128")
    assert isinstance(PipelineClient("http://api.example:8082/api/v1/pipeline")._transports[0], _Session)
    monkeypatch.setenv("no_proxy", "api.example")
    assert isinstance(PipelineClient("http://api.example:8082/api/v1/pipeline")._transports[0], _Plain)
