"""A per-shard claim that finds fewer tasks than its limit while the previous stage still works
on the shard's files lingers up to CLAIM_LINGER_SECONDS for more (app/api/service.py `_linger`):
a worker that keeps up then takes its small files a few at a time, not one by one. A lone file
never waits, the bound holds, and 0 turns it off. Real MariaDB, real API on loopback."""
from __future__ import annotations

import threading
import time

import pytest

from tests.test_api_contract import Http, module_api
from tests.test_api_done_claim import at, drain

LINGER = 0.6
STAGE, UPSTREAM = "shard-worker", "shard-splitter"


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with module_api(tmp_path_factory, CLAIM_LINGER_SECONDS=str(LINGER)) as server:
        yield server


@pytest.fixture(scope="module")
def live_off(tmp_path_factory):
    with module_api(tmp_path_factory, CLAIM_LINGER_SECONDS="0") as server:
        yield server


def in_flight(http: Http, shard: int = 0) -> str:
    """A file of `shard` the splitter has started (registered after the ones before it)."""
    name = http.registered(shards=(shard,))
    http.ok("POST", f"/stages/{UPSTREAM}/start", {"filename": name, "shard": shard, "worker": "s"})
    return name


def split(http: Http, name: str, shard: int = 0) -> None:
    http.ok("POST", f"/stages/{UPSTREAM}/done", {"filename": name, "shard": shard, "worker": "s"})


def claim(http: Http, limit: int = 4, wait: float = 5) -> tuple[list[str], float]:
    began = time.monotonic()
    items = http.ok("POST", f"/queues/{STAGE}/claim?wait={wait}", {"worker": "w", "limit": limit, "shard": 0})["items"]
    return [i["filename"] for i in items], time.monotonic() - began


def finish_all(http: Http, names: list[str]) -> None:
    for name in names:
        http.ok("POST", f"/stages/{STAGE}/done", {"filename": name, "shard": 0, "worker": "w"})


@pytest.mark.parametrize("how", ["claim", "done-batch"])
def test_a_short_claim_waits_for_the_file_in_flight_upstream_and_takes_it_too(live, how):
    http = Http(live)
    drain(http, STAGE, 0)
    held = None
    if how == "done-batch":
        held = at(http, STAGE, "started")
    a = at(http, STAGE, "new")
    b = in_flight(http)
    timer = threading.Timer(0.2, split, (http, b))
    began = time.monotonic()
    timer.start()
    if how == "claim":
        got, took = claim(http)
    else:
        answer = http.ok("POST", f"/stages/{STAGE}/done-batch?wait=5",
                         {"worker": "w", "items": [{"filename": held, "shard": 0}], "claim": {"limit": 4, "shard": 0}})
        got, took = [i["filename"] for i in answer["next"]], time.monotonic() - began
    timer.join()
    assert got == [a, b]
    assert 0.15 < took < LINGER + 0.4, took
    finish_all(http, got)


def test_a_lone_file_is_claimed_at_once(live):
    http = Http(live)
    drain(http, STAGE, 0)
    a = at(http, STAGE, "new")
    got, took = claim(http)
    assert got == [a] and took < LINGER / 2, took
    finish_all(http, got)


def test_the_linger_never_exceeds_its_bound_nor_the_requests_wait(live):
    http = Http(live)
    drain(http, STAGE, 0)
    a = at(http, STAGE, "new")
    b = in_flight(http)
    try:
        got, took = claim(http)
        assert got == [a] and LINGER - 0.05 < took < LINGER + 0.4, took
        finish_all(http, got)
        c = at(http, STAGE, "new")
        split(http, b)
        b, d = None, in_flight(http)
        got, took = claim(http, wait=0.2)    # the request's own wait is shorter than the linger
        assert 0.15 < took < 0.2 + 0.3, took
        assert len(got) == 2 and set(got) == {c, got[0]}
        began = time.monotonic()
        again = http.ok("POST", f"/queues/{STAGE}/claim", {"worker": "w", "limit": 4, "shard": 0})["items"]
        assert [i["filename"] for i in again] == got and time.monotonic() - began < LINGER / 2   # no wait: no linger
        finish_all(http, got)
        split(http, d)
        drain(http, STAGE, 0)
    finally:
        if b is not None:
            split(http, b)


def test_a_full_claim_and_a_zero_setting_do_not_wait(live, live_off):
    for server, limit in ((live, 1), (live_off, 4)):
        http = Http(server)
        drain(http, STAGE, 0)
        a = at(http, STAGE, "new")
        b = in_flight(http)
        got, took = claim(http, limit=limit)
        assert got == [a] and took < LINGER / 2, (server, took)
        split(http, b)
        finish_all(http, got)
        drain(http, STAGE, 0)
