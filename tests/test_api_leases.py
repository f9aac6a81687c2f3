"""Leases: an expired task goes back to `new` with its attempt counted, or to `failed` with the
reason once MAX_ATTEMPTS are spent; a task that never heartbeated counts from its start; the
old owner of a reaped task can no longer finish it. LEASE_SECONDS=1.5, the reaper every 0.2 s."""
from __future__ import annotations

import time

import pytest

from tests import servers
from tests.test_api_contract import Http, module_api

LEASE = 1.5


@pytest.fixture(scope="module")
def leased(tmp_path_factory):
    with module_api(tmp_path_factory, LEASE_SECONDS=str(LEASE), REAP_INTERVAL="0.2", MAX_ATTEMPTS="2") as server:
        yield server


@pytest.fixture
def http(leased):
    return Http(leased)


def shard_state(http: Http, name: str, shard: int = 0) -> dict:
    return next(s for s in http.ok("GET", f"/files/{name}")["shards"] if s["shard"] == shard)


def wait_status(http: Http, name: str, stage: str, status: str, shard: int = 0, timeout: float = 10.0) -> dict:
    key = f"{stage.replace('-', '_')}_status"
    return servers.wait_until(lambda: (s := shard_state(http, name, shard))[key] == status and s,
                              timeout, 0.05, what=f"{name}/{shard} {stage} -> {status}")


def test_expired_lease_returns_the_task_and_the_old_owner_is_refused(http):
    stage = "shard-worker"
    silent = http.at(stage, "new")                        # claimed by a worker that then goes quiet
    beating = http.at("mysql-sender", "new", shard=1)     # kept alive by heartbeats
    anonymous = http.at("shard-splitter", "new")          # started without a worker id, never heartbeated
    assert [i["filename"] for i in http.ok("POST", f"/queues/{stage}/claim",
                                           {"shard": 0, "worker": "quiet"})["items"]] == [silent]
    assert [i["filename"] for i in http.ok("POST", "/queues/mysql-sender/claim",
                                           {"shard": 1, "worker": "alive"})["items"]] == [beating]
    http.ok("POST", "/stages/shard-splitter/start", {"filename": anonymous, "shard": 0})
    began = time.monotonic()
    while time.monotonic() - began < 2.5 * LEASE:
        http.ok("POST", "/stages/mysql-sender/heartbeat", {"filename": beating, "shard": 1, "worker": "alive"})
        time.sleep(LEASE / 5)
    state = wait_status(http, silent, stage, "new")
    assert state["attempts"][stage] == 1 and "expired" in state["last_error"] and "'quiet'" in state["last_error"]
    assert state["owner"] is None
    reap = [h for h in state["history"] if h["action"] == "reap"]
    assert len(reap) == 1 and (reap[0]["from"], reap[0]["to"], reap[0]["by"]) == ("started", "new", "quiet")
    assert shard_state(http, beating, 1)["mysql_sender_status"] == "started"
    assert wait_status(http, anonymous, "shard-splitter", "new")["attempts"]["shard-splitter"] == 1
    # the quiet worker wakes up: its lease is gone, so are its heartbeat and its result
    for action in ("heartbeat", "done"):
        code, body = http.post(f"/stages/{stage}/{action}", {"filename": silent, "shard": 0, "worker": "quiet"})
        assert code == 409 and body["status"] == "new", body
    http.ok("POST", "/stages/mysql-sender/done", {"filename": beating, "shard": 1, "worker": "alive"})


def test_reaped_task_taken_by_another_worker_stays_theirs(http):
    stage = "mysql-sender"
    name = http.at(stage, "new", shard=1)
    http.ok("POST", f"/stages/{stage}/start", {"filename": name, "shard": 1, "worker": "old"})
    wait_status(http, name, stage, "new", shard=1)
    http.ok("POST", f"/stages/{stage}/start", {"filename": name, "shard": 1, "worker": "new"})
    code, body = http.post(f"/stages/{stage}/done", {"filename": name, "shard": 1, "worker": "old"})
    assert code == 409 and body["owner"] == "new" and "'new'" in body["error"]
    code, body = http.post(f"/stages/{stage}/fail", {"filename": name, "shard": 1, "worker": "old", "error": "x"})
    assert code == 409
    assert http.ok("POST", f"/stages/{stage}/done", {"filename": name, "shard": 1, "worker": "new"})["changed"]


def test_attempt_limit_marks_the_task_failed_with_the_reason(http):
    stage = "shard-splitter"
    name = http.registered(shards=[1])
    for attempt in (1, 2):
        started = http.ok("POST", f"/stages/{stage}/start", {"filename": name, "shard": 1, "worker": "crashy"})
        assert started["attempts"] == attempt
        state = wait_status(http, name, stage, "new" if attempt == 1 else "failed", shard=1)
    assert state["attempts"][stage] == 2
    assert "attempts exhausted" in state["last_error"] and "attempt 2 of 2" in state["last_error"]
    failed = http.ok("GET", f"/tasks/{stage}", {"status": "failed", "shard": 1})["items"]
    assert [(i["filename"], i["attempts"]) for i in failed] == [(name, 2)]
    # an operator's retry gives it a fresh set of attempts
    assert http.ok("POST", f"/stages/{stage}/retry", {"filename": name, "shard": 1})["attempts"] == 0
    assert http.ok("POST", f"/stages/{stage}/start", {"filename": name, "shard": 1, "worker": "ok"})["attempts"] == 1
    http.ok("POST", f"/stages/{stage}/done", {"filename": name, "shard": 1, "worker": "ok"})


def test_release_spends_no_attempt_and_rewind_gives_up_after_the_limit(http):
    stage = "shard-worker"
    name = http.at(stage, "new")
    for _ in range(3):
        http.ok("POST", f"/stages/{stage}/start", {"filename": name, "shard": 0, "worker": "polite"})
        assert http.ok("POST", f"/stages/{stage}/release",
                       {"filename": name, "shard": 0, "worker": "polite"})["attempts"] == 0
    # input missing, again and again: each rewind sends it upstream, the limit ends it
    for attempt in (1, 2):
        http.ok("POST", f"/stages/{stage}/start", {"filename": name, "shard": 0, "worker": "w"})
        result = http.ok("POST", f"/stages/{stage}/rewind",
                         {"filename": name, "shard": 0, "worker": "w", "error": "gone"})
        if attempt == 1:
            assert (result["status"], result["rewound_to"]) == ("new", "shard-splitter")
            http.finish(name, 0, "shard-splitter")
        else:
            assert result["status"] == "failed"
    assert "input missing after 2 attempts" in shard_state(http, name)["last_error"]
