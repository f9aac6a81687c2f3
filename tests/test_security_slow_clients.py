"""Slow or greedy clients cannot stall the daemons: 64 connections that send a header line
every 0.5 s and 16 clients reading deep pages of a 300,000-row queue, all at once, while a
daemon's claim is still answered, ahead of the listings. And the paging rules that make deep
pages cheap.

The load runs in a process of its own, so the claims measured here share no interpreter lock
with it."""
from __future__ import annotations

import multiprocessing
import socket
import time

import pytest
import requests

from tests import servers
from tests.test_api_contract import Http

BASE = "/api/v1/pipeline"
TOKEN = "slow-client-test-token-0123456789"
ROWS = 300_000


def _load(port: int, stop, ready, out, slow: int, readers: int) -> None:
    """`slow` connections dripping a header line every 0.5 s, `readers` threads reading deep
    pages of the worker's queue; until `stop` is set. `ready` is set once every slow connection
    has sent more than its request line and every reader has had a listing answered. Then puts
    on `out` the (sent, answered) monotonic times of the readers' listings and how many slow
    connections had been answered (or closed) by the server."""
    import threading

    socks = []
    for _ in range(slow):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(f"POST {BASE}/queues/shard-splitter/claim HTTP/1.1\r\nHost: x\r\n".encode())
        socks.append(s)
    dripped, listed = threading.Event(), threading.Semaphore(0)
    times: list[tuple[float, float]] = []

    def drip():
        n = 0
        while not stop.wait(0.5):
            n += 1
            for s in socks:
                try:
                    s.sendall(f"X-Slow-{n}: {'y' * 20}\r\n".encode())
                except OSError:
                    pass
            dripped.set()

    def read_deep():
        session = requests.Session()
        url = f"http://127.0.0.1:{port}{BASE}/queues/shard-worker"
        first = True
        while not stop.is_set():
            try:
                resp = session.get(url, params={"limit": 1000, "offset": ROWS - 10_000}, timeout=60)
                if resp.status_code == 400:   # too deep for offset: the same depth by keyset
                    sent = time.monotonic()
                    session.get(url, params={"limit": 1000, "after": ROWS - 10_000}, timeout=60)
                    times.append((sent, time.monotonic()))
                if first:
                    first = False
                    listed.release()
            except requests.RequestException:
                time.sleep(0.05)

    threads = [threading.Thread(target=drip, daemon=True)]
    threads += [threading.Thread(target=read_deep, daemon=True) for _ in range(readers)]
    for t in threads:
        t.start()
    dripped.wait()
    for _ in range(readers):
        listed.acquire()
    ready.set()
    stop.wait()
    answered = 0
    for s in socks:
        try:
            answered += s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) is not None
        except BlockingIOError:
            pass                      # nothing from the server: still waiting for the rest
        except OSError:
            answered += 1             # reset by the server
        s.close()
    out.put((list(times), answered))


@pytest.fixture
def big_queue(api_factory, pipeline_db, shared_dir):
    env = servers.service_env(pipeline_db, shared_dir, servers.free_port(), PIPELINE_API_TOKEN=TOKEN,
                              API_REQUEST_TIMEOUT="120")
    server = api_factory(env)
    servers.query(pipeline_db, "INSERT INTO pipeline_tracking (filename, shard, event_ingest_status, "
                               "shard_splitter_status) SELECT CONCAT('q', LPAD(seq, 9, '0')), MOD(seq, 2), "
                               f"'done', 'done' FROM seq_1_to_{ROWS}")
    http = Http(server, TOKEN)
    for n in range(20):
        http.ok("POST", "/files/register", {"filename": f"2099010100{n:04d}"})
        http.ok("POST", "/stages/event-ingest/done", {"filename": f"2099010100{n:04d}"})
    return server, http


def test_a_claim_answers_under_64_slow_clients_and_ahead_of_16_deep_readers(big_queue):
    """Checked by what happens, not by a clock figure (a loaded machine slows every request):
    every claim is answered while all 64 slow connections are still open and unanswered (a
    server giving each connection a thread would hold the claims until the request timeout cut
    the slow ones off), and each claim is answered sooner than the deep listings sent beside it
    are (the daemons' threads are not the listings': a claim waits for no queue of listings)."""
    server, _ = big_queue
    ctx = multiprocessing.get_context("fork")
    stop, ready, out = ctx.Event(), ctx.Event(), ctx.Queue()
    load = ctx.Process(target=_load, args=(server.port, stop, ready, out, 64, 16), daemon=True)
    load.start()
    try:
        assert ready.wait(120)
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {TOKEN}"
        url = f"http://127.0.0.1:{server.port}{BASE}/queues/shard-splitter/claim"
        claims = []
        for _ in range(10):
            began = time.monotonic()
            resp = session.post(url, json={"worker": "test-daemon", "limit": 1}, timeout=60)
            claims.append((began, time.monotonic()))
            assert resp.status_code == 200 and len(resp.json()["items"]) == 1, resp.text
            time.sleep(0.1)
        stop.set()
        listings, answered = out.get(timeout=120)
    finally:
        stop.set()
        load.join(30)
        if load.is_alive():
            load.kill()
    assert answered == 0, f"{answered} of 64 slow connections were answered or cut off before the claims ended"
    beside = sorted(end - sent for sent, end in listings if sent < claims[-1][1] and end > claims[0][0])
    took = [end - began for began, end in claims]
    print(f"claim ms under 64 slow connections and 16 deep readers: {[round(t * 1000, 1) for t in took]}; "
          f"{len(beside)} listings beside them, median {beside[len(beside) // 2] * 1000:.1f} ms")
    assert len(beside) >= 3, beside   # the readers were answered meanwhile: their lane was busy
    assert max(took) < beside[len(beside) // 2], (took, beside)


@pytest.fixture
def short_timeout(api_factory, pipeline_db, shared_dir):
    """An API that cuts a request off 2 s after its first byte (no queue needed)."""
    env = servers.service_env(pipeline_db, shared_dir, servers.free_port(), PIPELINE_API_TOKEN=TOKEN,
                              API_REQUEST_TIMEOUT="2")
    return api_factory(env)


def test_a_request_that_never_arrives_whole_is_cut_off(short_timeout):
    s = socket.create_connection(("127.0.0.1", short_timeout.port))
    s.sendall(f"POST {BASE}/queues/shard-splitter/claim HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n{{".encode())
    s.settimeout(60)
    began = time.monotonic()
    answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"within 2s" in answer
    assert 1.5 < time.monotonic() - began   # not before the timeout (its first byte went just before `began`)
    assert s.recv(4096) == b""   # and closed
    s.close()


def test_an_announced_oversized_body_is_refused_before_it_is_sent(short_timeout):
    s = socket.create_connection(("127.0.0.1", short_timeout.port))
    s.sendall(f"POST {BASE}/files/register HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n".encode())
    s.settimeout(10)
    assert s.recv(4096).startswith(b"HTTP/1.1 413 ")
    s.close()


def test_deep_pages_cost_a_cursor_not_an_offset(big_queue):
    _, http = big_queue
    code, answer = http.get("/queues/shard-worker", {"offset": 10_001})
    assert code == 400 and answer["field"] == "offset" and "after=<next_after" in answer["error"]
    code, answer = http.get("/queues/shard-worker", {"offset": 5, "after": 7})
    assert code == 400 and answer["field"] == "after"
    first = http.ok("GET", "/queues/shard-worker", {"limit": 3})
    assert [i["filename"] for i in first["items"]] == ["q000000001", "q000000002", "q000000003"]
    second = http.ok("GET", "/queues/shard-worker", {"limit": 3, "after": first["next_after"]})
    assert [i["filename"] for i in second["items"]] == ["q000000004", "q000000005", "q000000006"]
    assert http.ok("GET", "/queues/shard-worker", {"limit": 3, "offset": 3})["items"] == second["items"]
    deep = http.ok("GET", "/queues/shard-worker", {"limit": 1000, "after": ROWS - 10})
    assert len(deep["items"]) == 10 and deep["next_after"] is None
    tasks = http.ok("GET", "/tasks/shard-splitter", {"status": "done", "limit": 2, "shard": 1})
    more = http.ok("GET", "/tasks/shard-splitter", {"status": "done", "limit": 2, "shard": 1,
                                                    "after": tasks["next_after"]})
    assert [i["filename"] for i in tasks["items"] + more["items"]] == ["q000000001", "q000000003", "q000000005",
                                                                      "q000000007"]
