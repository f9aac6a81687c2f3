"""pipeline-apid's gunicorn process reads its settings once, not on every request, and still
answers as gunicorn would: forwarding headers honoured from a trusted peer only."""
from __future__ import annotations

import os
import socket

import bottle
from gunicorn.config import Config
from gunicorn.glogging import Logger

from app.api import server


class CountingConfig(Config):
    """gunicorn's Config, counting the settings read through it by name."""

    def __getattr__(self, name):
        if name != "settings":
            self.__dict__["reads"] = self.__dict__.get("reads", 0) + 1
        return super().__getattr__(name)


def _process(app) -> tuple[server.BufferingProcess, CountingConfig]:
    cfg = CountingConfig()
    for key, value in {"keepalive": 30, "accesslog": None, "errorlog": "-", "loglevel": "warning",
                       "forwarded_allow_ips": "127.0.0.1"}.items():
        cfg.set(key, value)
    proc = server.BufferingProcess(0, os.getppid(), [], None, 30, cfg, Logger(cfg))
    proc.wsgi, proc.alive, proc.max_requests = app, True, 1 << 30
    proc.settled = server.SettledConfig(cfg)
    return proc, cfg


def _loopback() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        served, _ = listener.accept()
    return served, client


def _ask(proc, served, client, peer, headers: bytes = b"") -> bytes:
    conn = server.Conn(served, peer, served.getsockname())
    request = b"GET /seen HTTP/1.1\r\nHost: api\r\n" + headers + b"\r\n"
    assert proc._handle(conn, request) is True
    answer = b""
    while not answer.endswith(b"}"):
        answer += client.recv(4096)
    return answer.partition(b"\r\n\r\n")[2]


def _app():
    app = bottle.Bottle()

    @app.route("/seen")
    def seen():
        env = bottle.request.environ
        return {"scheme": env["wsgi.url_scheme"], "remote": env["REMOTE_ADDR"]}
    return app


def test_a_request_reads_no_gunicorn_setting_by_name():
    proc, cfg = _process(_app())
    served, client = _loopback()
    try:
        _ask(proc, served, client, client.getsockname())
        cfg.reads = 0
        for _ in range(5):
            _ask(proc, served, client, client.getsockname())
        assert cfg.reads == 0
    finally:
        served.close()
        client.close()


def test_forwarding_headers_count_from_a_trusted_peer_only_every_time():
    proc, _ = _process(_app())
    served, client = _loopback()
    forwarded = b"X-Forwarded-Proto: https\r\n"
    try:
        for _ in range(3):   # the first answer decided, the next ones remembered
            assert _ask(proc, served, client, ("127.0.0.1", 40000), forwarded) == \
                b'{"scheme": "https", "remote": "127.0.0.1"}'
            assert _ask(proc, served, client, ("10.9.8.7", 40000), forwarded) == \
                b'{"scheme": "http", "remote": "10.9.8.7"}'
        assert proc.settled.trusted_peers == {"127.0.0.1": True, "10.9.8.7": False}
    finally:
        served.close()
        client.close()
