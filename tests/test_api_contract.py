"""pipeline-apid against the contract: every endpoint's shapes, every illegal transition (409
with the current status), idempotent repeats, rewind, retry of all, token auth.

One API per module (a real gunicorn subprocess over its own database) keeps this fast; each
test uses file names of its own, so tests do not see each other's tasks.
"""
from __future__ import annotations

import contextlib
import itertools
import re

import pymysql
import pytest
import requests

from tests import servers

BASE = "/api/v1/pipeline"
ISO_S = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
_names = itertools.count(1)


def new_name() -> str:
    """A unique file name in the contract's shape (a UTC tick)."""
    return f"2025{next(_names):010d}"


@contextlib.contextmanager
def module_api(tmp_path_factory, **env):
    """pipeline-apid on a fresh database for one module; `env` adds settings."""
    database = servers.unique_name("apim")
    conn = servers.admin_connect()
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{database}`")
    conn.close()
    tmp = tmp_path_factory.mktemp("apid")
    port = servers.free_port()
    server = servers.start_api(servers.service_env(servers.server_url(database), tmp, port, **env), tmp / "logs")
    try:
        yield server
    finally:
        server.process.stop()
        conn = servers.admin_connect()
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{database}`")
        conn.close()


class Http:
    """Raw HTTP on loopback: status and JSON body as the server sent them."""

    def __init__(self, server: servers.ApiServer, token: str | None = None):
        self.root = f"http://127.0.0.1:{server.port}"
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def post(self, path: str, body=None, **kw) -> tuple[int, dict]:
        resp = self.session.post(self.root + BASE + path, json=body, timeout=30, **kw)
        return resp.status_code, resp.json()

    def get(self, path: str, params=None) -> tuple[int, dict]:
        resp = self.session.get(self.root + BASE + path, params=params, timeout=30)
        return resp.status_code, resp.json()

    def ok(self, method: str, path: str, body=None) -> dict:
        status, data = self.post(path, body) if method == "POST" else self.get(path, body)
        assert status == 200, (method, path, body, status, data)
        return data

    # -- moving a task along, through the API ------------------------------------------------

    def registered(self, shards=(0, 1), ingest_done: bool = True) -> str:
        name = new_name()
        self.ok("POST", "/files/register", {"filename": name, "shards": list(shards)})
        if ingest_done:
            self.ok("POST", "/stages/event-ingest/done", {"filename": name})
        return name

    def finish(self, name: str, shard: int, stage: str, worker: str = "w") -> None:
        self.ok("POST", f"/stages/{stage}/start", {"filename": name, "shard": shard, "worker": worker})
        self.ok("POST", f"/stages/{stage}/done", {"filename": name, "shard": shard, "worker": worker})

    def at(self, stage: str, status: str, shard: int = 0) -> str:
        """A fresh file whose shard `shard` has `stage` in `status` (earlier stages done)."""
        name = self.registered()
        for earlier in STAGES[:STAGES.index(stage)]:
            self.finish(name, shard, earlier)
        if status in ("started", "done", "failed"):
            self.ok("POST", f"/stages/{stage}/start", {"filename": name, "shard": shard, "worker": "w"})
        if status == "done":
            self.ok("POST", f"/stages/{stage}/done", {"filename": name, "shard": shard, "worker": "w"})
        if status == "failed":
            self.ok("POST", f"/stages/{stage}/fail", {"filename": name, "shard": shard, "worker": "w",
                                                       "error": "broken"})
        return name

    def status(self, name: str, shard: int, stage: str) -> str:
        shards = self.ok("GET", f"/files/{name}")["shards"]
        return next(s for s in shards if s["shard"] == shard)[f"{stage.replace('-', '_')}_status"]


STAGES = ("shard-splitter", "shard-worker", "mysql-sender")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with module_api(tmp_path_factory) as server:
        yield server


@pytest.fixture
def http(live):
    return Http(live)


# -- happy paths in the contract's shapes -------------------------------------------------------

def test_health_and_ready(http):
    assert http.ok("GET", "/health") == {"status": "ok"}
    assert http.ok("GET", "/ready")["status"] == "ready"
    root = requests.get(http.root + "/health", timeout=5)
    assert root.status_code == 200 and root.json() == {"status": "ok"}
    assert root.headers["Server"].startswith("gunicorn")  # `python -m app.apid` serves with gunicorn


def test_register_is_idempotent_and_ingest_done_counts_rows(http):
    name = new_name()
    body = {"filename": name, "shards": [0, 1]}
    assert http.ok("POST", "/files/register", body) == {"filename": name, "shards": [0, 1], "created": True}
    assert http.ok("POST", "/files/register", body) == {"filename": name, "shards": [0, 1], "created": False}
    shards = http.ok("GET", f"/files/{name}")["shards"]
    assert [(s["shard"], s["event_ingest_status"], s["shard_splitter_status"]) for s in shards] == \
        [(0, "started", "new"), (1, "started", "new")]
    assert http.ok("POST", "/stages/event-ingest/done", {"filename": name}) == {"filename": name, "updated_rows": 2}
    assert http.ok("POST", "/stages/event-ingest/done", {"filename": name}) == {"filename": name, "updated_rows": 0}


def test_register_without_shards_takes_every_shard(http):
    name = new_name()
    assert http.ok("POST", "/files/register", {"filename": name})["shards"] == [0, 1]


def test_every_stage_start_done_fail_retry_in_contract_shape(http):
    name = http.registered()
    for stage in STAGES:
        for shard in (0, 1):
            started = http.ok("POST", f"/stages/{stage}/start", {"filename": name, "shard": shard})
            assert {k: started[k] for k in ("filename", "shard", "stage", "status")} == \
                {"filename": name, "shard": shard, "stage": stage, "status": "started"}
        done = http.ok("POST", f"/stages/{stage}/done", {"filename": name, "shard": 0})
        assert {k: done[k] for k in ("filename", "shard", "stage", "status")} == \
            {"filename": name, "shard": 0, "stage": stage, "status": "done"}
        assert (done["changed"], done["attempts"]) == (True, 1)
        failed = http.ok("POST", f"/stages/{stage}/fail", {"filename": name, "shard": 1})
        assert (failed["status"], failed["changed"]) == ("failed", True)
        retried = http.ok("POST", f"/stages/{stage}/retry", {"filename": name, "shard": 1})
        assert {k: retried[k] for k in ("filename", "shard", "stage", "status")} == \
            {"filename": name, "shard": 1, "stage": stage, "status": "new"}
        http.finish(name, 1, stage)
    shards = http.ok("GET", f"/files/{name}")["shards"]
    for entry in shards:
        assert {k: entry[k] for k in ("event_ingest_status", "shard_splitter_status", "shard_worker_status",
                                      "mysql_sender_status")} == dict.fromkeys(
            ("event_ingest_status", "shard_splitter_status", "shard_worker_status", "mysql_sender_status"), "done")
        assert ISO_S.match(entry["updated_at"])


def test_queue_lists_ready_tasks_oldest_first_with_paging_and_shard_filter(http):
    stage = "mysql-sender"
    names = [http.at(stage, "new") for _ in range(3)]
    data = http.ok("GET", f"/queues/{stage}", {"limit": 1000})
    assert data["stage"] == stage
    ours = [i for i in data["items"] if i["filename"] in names]
    assert [(i["filename"], i["shard"]) for i in ours] == [(n, 0) for n in names]
    for item in ours:
        assert set(item) == {"filename", "shard", "created_at"} and ISO_S.match(item["created_at"])
    everything = data["items"]
    page = http.ok("GET", f"/queues/{stage}", {"limit": 2, "offset": 1})["items"]
    assert page == everything[1:3]
    assert all(i["shard"] == 1 for i in http.ok("GET", f"/queues/{stage}", {"shard": 1})["items"])
    assert not [i for i in http.ok("GET", f"/queues/{stage}", {"shard": 1})["items"] if i["filename"] in names]


def test_queue_readiness_follows_the_contract(http):
    name = http.registered(ingest_done=False)
    listed = lambda stage: {(i["filename"], i["shard"]) for i in  # noqa: E731
                            http.ok("GET", f"/queues/{stage}", {"limit": 1000})["items"]}
    assert (name, 0) not in listed("shard-splitter")  # ingest still started
    http.ok("POST", "/stages/event-ingest/done", {"filename": name})
    assert {(name, 0), (name, 1)} <= listed("shard-splitter")
    http.finish(name, 0, "shard-splitter")
    assert (name, 0) not in listed("shard-splitter") and (name, 0) in listed("shard-worker")
    assert (name, 1) not in listed("shard-worker")
    http.finish(name, 0, "shard-worker")
    assert (name, 0) in listed("mysql-sender")


def test_summary_keeps_the_contract_shape_and_adds_stage_metrics(http):
    name = http.at("shard-worker", "failed", shard=1)
    summary = http.ok("GET", "/metrics/summary")
    assert set(summary["by_stage"]) == {"event_ingest", "shard_splitter", "shard_worker", "mysql_sender"}
    for counts in summary["by_stage"].values():
        assert set(counts) == {"new", "started", "done", "failed"}
    assert summary["total"] == sum(summary["by_stage"]["event_ingest"].values())
    assert summary["by_stage"]["shard_worker"]["failed"] >= 1
    shard1 = next(s for s in summary["by_shard"] if s["shard"] == 1)
    assert {"shard", "total", "done", "failed"} <= set(shard1)
    assert shard1["total"] == shard1["new"] + shard1["started"] + shard1["done"] + shard1["failed"]
    for stage in ("shard_splitter", "shard_worker", "mysql_sender"):
        metrics = summary["stages"][stage]
        assert {"ready", "oldest_ready_age_seconds", "done_last_minute", "median_run_ms"} <= set(metrics)
    assert summary["stages"]["shard_splitter"]["done_last_minute"] >= 1
    assert summary["stages"]["shard_splitter"]["median_run_ms"] is not None
    assert http.status(name, 1, "shard-worker") == "failed"


def test_file_detail_has_attempts_last_error_stats_and_history(http):
    name = http.registered()
    http.ok("POST", "/stages/shard-splitter/start", {"filename": name, "shard": 0, "worker": "det"})
    http.ok("POST", "/stages/shard-splitter/fail", {"filename": name, "shard": 0, "worker": "det",
                                                    "error": "bad line 3", "stats": {"lines": 3}})
    http.ok("POST", "/stages/shard-splitter/retry", {"filename": name, "shard": 0})
    http.ok("POST", "/stages/shard-splitter/start", {"filename": name, "shard": 0, "worker": "det"})
    done = http.ok("POST", "/stages/shard-splitter/done", {"filename": name, "shard": 0, "worker": "det",
                                                           "events": 7, "stats": {"lines": 7, "rejected": 0}})
    assert (done["status"], done["changed"], done["attempts"]) == ("done", True, 1)
    detail = http.ok("GET", f"/files/{name}")
    assert detail["filename"] == name and [s["shard"] for s in detail["shards"]] == [0, 1]
    shard0 = detail["shards"][0]
    assert shard0["attempts"]["shard-splitter"] == 1
    assert shard0["last_error"] == "bad line 3"
    assert shard0["stats"]["shard-splitter"] == {"events": 7, "lines": 7, "rejected": 0}
    steps = [(h["stage"], h["from"], h["to"], h["action"]) for h in shard0["history"]]
    assert steps == [("event-ingest", None, "started", "register"), ("event-ingest", "started", "done", "done"),
                     ("shard-splitter", "new", "started", "start"),
                     ("shard-splitter", "started", "failed", "fail"),
                     ("shard-splitter", "failed", "new", "retry"),
                     ("shard-splitter", "new", "started", "start"),
                     ("shard-splitter", "started", "done", "done")]
    assert shard0["history"][3]["error"] == "bad line 3" and shard0["history"][3]["by"] == "det"
    assert shard0["history"][-1]["duration_ms"] >= 0 and shard0["history"][-1]["events"] == 7


def test_claim_heartbeat_release_and_resume(http):
    stage = "mysql-sender"
    name = http.at(stage, "new", shard=1)
    others = http.ok("GET", f"/queues/{stage}", {"shard": 1, "limit": 1000})["items"]
    mine = None
    while mine is None:  # earlier tests may have left ready tasks: claim until ours comes
        items = http.ok("POST", f"/queues/{stage}/claim", {"limit": 10, "shard": 1, "worker": "cl"})["items"]
        assert items, others
        for item in items:
            assert set(item) >= {"filename", "shard", "created_at", "attempts", "resumed"}
            if item["filename"] == name:
                mine = item
            else:
                http.ok("POST", f"/stages/{stage}/done", {"filename": item["filename"], "shard": 1, "worker": "cl"})
    assert (mine["shard"], mine["attempts"], mine["resumed"]) == (1, 1, False)
    beat = http.ok("POST", f"/stages/{stage}/heartbeat", {"filename": name, "shard": 1, "worker": "cl"})
    assert beat["status"] == "started" and beat["worker"] == "cl" and beat["lease_expires_at"]
    # a restarted daemon with the same id gets its task back before anything newer
    again = http.ok("POST", f"/queues/{stage}/claim", {"limit": 1, "shard": 1, "worker": "cl"})["items"]
    assert [(i["filename"], i["resumed"], i["attempts"]) for i in again] == [(name, True, 1)]
    released = http.ok("POST", f"/stages/{stage}/release", {"filename": name, "shard": 1, "worker": "cl"})
    assert (released["status"], released["changed"], released["attempts"]) == ("new", True, 0)
    assert http.status(name, 1, stage) == "new"


def test_tasks_listing_by_status(http):
    name = http.at("shard-worker", "failed")
    data = http.ok("GET", "/tasks/shard-worker", {"status": "failed", "limit": 1000})
    assert data["stage"] == "shard-worker" and data["status"] == "failed"
    item = next(i for i in data["items"] if i["filename"] == name)
    assert item["last_error"] == "broken" and item["attempts"] == 1
    started = http.at("mysql-sender", "started")
    item = next(i for i in http.ok("GET", "/tasks/mysql-sender", {"status": "started", "limit": 1000})["items"]
                if i["filename"] == started)
    assert item["owner"] == "w" and item["lease_expired"] is False and item["running_ms"] >= 0


def test_throughput_counts_finished_files_per_minute(http):
    name = http.registered()
    http.finish(name, 0, "shard-splitter")
    data = http.ok("GET", "/metrics/throughput", {"minutes": 5})
    assert data["minutes"] == 5
    assert len(data["stages"]["shard_splitter"]["files"]) == 5
    assert data["stages"]["shard_splitter"]["files"][-1] >= 1


def test_throughput_counts_an_ingested_files_events_once_not_once_per_shard(http):
    def ingested_events() -> int:
        return sum(http.ok("GET", "/metrics/throughput", {"minutes": 5})["stages"]["event_ingest"]["events"])
    before = ingested_events()
    name = new_name()
    http.ok("POST", "/files/register", {"filename": name, "shards": [0, 1]})
    http.ok("POST", "/stages/event-ingest/done", {"filename": name, "events": 1234})
    assert ingested_events() - before == 1234


# -- the state machine's refusals -------------------------------------------------------------

# (stage, status it is in, action, body extras) -> 409 naming that status
ILLEGAL = [
    ("shard-splitter", "ingest-started", "start", {}),
    ("shard-worker", "new-prev-new", "start", {}),
    ("shard-worker", "started", "start", {"worker": "someone-else"}),
    ("shard-worker", "started", "start", {}),
    ("shard-worker", "done", "start", {}),
    ("shard-worker", "failed", "start", {}),
    ("shard-worker", "new", "done", {}),
    ("shard-worker", "failed", "done", {}),
    ("shard-worker", "started", "done", {"worker": "someone-else"}),
    ("shard-worker", "done", "fail", {}),
    ("shard-worker", "started", "fail", {"worker": "someone-else"}),
    ("shard-worker", "new", "retry", {}),
    ("shard-worker", "started", "retry", {}),
    ("shard-worker", "done", "retry", {}),
    ("shard-worker", "new", "release", {}),
    ("shard-worker", "done", "release", {}),
    ("shard-worker", "failed", "release", {}),
    ("shard-worker", "started", "release", {"worker": "someone-else"}),
    ("shard-worker", "done", "rewind", {}),
    ("shard-worker", "failed", "rewind", {}),
    ("shard-splitter", "started", "rewind", {"worker": "w"}),
    ("mysql-sender", "new", "heartbeat", {"worker": "w"}),
    ("mysql-sender", "started", "heartbeat", {"worker": "someone-else"}),
    ("mysql-sender", "done", "heartbeat", {"worker": "w"}),
]


@pytest.mark.parametrize("stage,state,action,extra", ILLEGAL,
                         ids=[f"{a}-from-{s}-{st}{'-' + e['worker'] if 'worker' in e else ''}"
                              for st, s, a, e in ILLEGAL])
def test_illegal_transition_answers_409_with_current_status(http, stage, state, action, extra):
    if state == "ingest-started":
        name, status = http.registered(ingest_done=False), "new"
    elif state == "new-prev-new":
        name, status = http.registered(), "new"
    else:
        name, status = http.at(stage, state), state
    before = http.ok("GET", f"/files/{name}")
    code, body = http.post(f"/stages/{stage}/{action}", {"filename": name, "shard": 0, **extra})
    assert code == 409, body
    assert body["status"] == status and body["stage"] == stage and body["error"]
    after = http.ok("GET", f"/files/{name}")
    assert [(s["shard_worker_status"], s["shard_splitter_status"]) for s in after["shards"]] == \
        [(s["shard_worker_status"], s["shard_splitter_status"]) for s in before["shards"]]
    assert len(after["shards"][0]["history"]) == len(before["shards"][0]["history"])


def test_ingest_done_of_an_unregistered_file_is_404(http):
    code, body = http.post("/stages/event-ingest/done", {"filename": new_name()})
    assert code == 404 and "not registered" in body["error"]


def test_unknown_task_is_404(http):
    code, body = http.post("/stages/shard-worker/start", {"filename": new_name(), "shard": 0})
    assert code == 404 and body["error"]
    code, body = http.post("/stages/shard-worker/done", {"filename": new_name(), "shard": 0, "worker": "w"})
    assert code == 404
    code, body = http.post("/stages/shard-worker/heartbeat", {"filename": new_name(), "shard": 0, "worker": "w"})
    assert code == 404
    code, body = http.get(f"/files/{new_name()}")
    assert code == 404 and "not registered" in body["error"]


# -- repeats of a transition that took effect ----------------------------------------------------

@pytest.mark.parametrize("action,state,expect", [
    ("done", "done", "done"), ("fail", "failed", "failed"), ("retry", "failed", "new"),
    ("release", "started", "new"), ("start", "started", "started")])
def test_repeating_a_transition_that_took_effect_is_200_unchanged(http, action, state, expect):
    stage = "shard-worker"
    name = http.at(stage, "started" if action in ("done", "release", "start") else state)
    body = {"filename": name, "shard": 0, "worker": "w", "error": "again"}
    if action == "retry":
        first = http.ok("POST", f"/stages/{stage}/retry", body)
        assert first["changed"] is True
    elif action == "start":
        first = {"status": "started", "changed": True}
    elif action == "fail":
        first = {"status": "failed", "changed": True}
    else:
        first = http.ok("POST", f"/stages/{stage}/{action}", body)
        assert first["changed"] is True
    history = len(http.ok("GET", f"/files/{name}")["shards"][0]["history"])
    again = http.ok("POST", f"/stages/{stage}/{action}", body)
    assert (again["status"], again["changed"]) == (expect, False)
    assert first["status"] == expect
    assert http.status(name, 0, stage) == expect
    assert len(http.ok("GET", f"/files/{name}")["shards"][0]["history"]) == history


def test_done_repeated_by_a_worker_that_lost_the_task_is_refused(http):
    stage = "shard-worker"
    name = http.at(stage, "started")
    http.ok("POST", f"/stages/{stage}/release", {"filename": name, "shard": 0, "worker": "w"})
    http.finish(name, 0, stage, worker="other")
    code, body = http.post(f"/stages/{stage}/done", {"filename": name, "shard": 0, "worker": "w"})
    assert code == 409 and body["status"] == "done" and "other" in body["error"]
    # whoever did finish it may repeat
    assert http.ok("POST", f"/stages/{stage}/done", {"filename": name, "shard": 0, "worker": "other"})["changed"] \
        is False


# -- rewind and retry of everything ----------------------------------------------------------------

def test_rewind_sends_the_task_back_to_the_stage_that_makes_its_input(http):
    name = http.at("mysql-sender", "started", shard=1)
    body = {"filename": name, "shard": 1, "worker": "w", "error": "prepared file missing"}
    result = http.ok("POST", "/stages/mysql-sender/rewind", body)
    assert (result["status"], result["changed"], result["rewound_to"]) == ("new", True, "shard-worker")
    assert http.status(name, 1, "mysql-sender") == "new" and http.status(name, 1, "shard-worker") == "new"
    assert http.status(name, 1, "shard-splitter") == "done"
    again = http.ok("POST", "/stages/mysql-sender/rewind", body)
    assert (again["status"], again["changed"]) == ("new", False)
    shard = http.ok("GET", f"/files/{name}")["shards"][1]
    assert "prepared file missing" in shard["last_error"]
    assert [h["stage"] for h in shard["history"] if h["action"] == "rewind"] == ["mysql-sender", "shard-worker"]
    # the worker redoes it, then the sender can go again
    http.finish(name, 1, "shard-worker")
    http.finish(name, 1, "mysql-sender")


def test_rewind_of_the_splitter_is_refused(http):
    name = http.at("shard-splitter", "started")
    code, body = http.post("/stages/shard-splitter/rewind", {"filename": name, "shard": 0, "worker": "w"})
    assert code == 409 and "fail" in body["error"]


def test_retry_all_and_retry_all_of_one_shard(http):
    stage = "mysql-sender"
    failed = [(http.at(stage, "failed", shard=s), s) for s in (0, 1, 1)]
    one = http.ok("POST", f"/stages/{stage}/retry", {"all": True, "shard": 0})
    assert one["retried"] >= 1 and {(i["filename"], i["shard"]) for i in one["items"]} >= {failed[0]}
    assert all(i["shard"] == 0 for i in one["items"])
    assert http.status(failed[0][0], 0, stage) == "new" and http.status(failed[1][0], 1, stage) == "failed"
    rest = http.ok("POST", f"/stages/{stage}/retry", {"all": True})
    assert rest["retried"] >= 2 and {(i["filename"], i["shard"]) for i in rest["items"]} >= set(failed[1:])
    assert http.ok("POST", f"/stages/{stage}/retry", {"all": True})["retried"] == 0
    assert all(http.status(n, s, stage) == "new" for n, s in failed)


# -- token ---------------------------------------------------------------------------------------------

def test_token_guards_every_post_and_leaves_gets_open(tmp_path_factory):
    with module_api(tmp_path_factory, PIPELINE_API_TOKEN="s3cret") as server:
        anonymous, wrong, right = Http(server), Http(server, "nope"), Http(server, "s3cret")
        name = new_name()
        for client in (anonymous, wrong):
            code, body = client.post("/files/register", {"filename": name})
            assert code == 401 and "Bearer" in body["error"]
            code, _ = client.post("/queues/shard-splitter/claim", {"worker": "x"})
            assert code == 401
            code, _ = client.post("/stages/shard-worker/start", {"filename": name, "shard": 0})
            assert code == 401
        resp = requests.post(anonymous.root + BASE + "/files/register", json={"filename": name}, timeout=5,
                             headers={"Authorization": "Basic czNjcmV0"})
        assert resp.status_code == 401 and resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert right.ok("POST", "/files/register", {"filename": name})["created"] is True
        assert anonymous.ok("GET", f"/files/{name}")["filename"] == name
        assert anonymous.ok("GET", "/metrics/summary")["total"] == 2
        assert anonymous.ok("GET", "/ready")["status"] == "ready"
        # the shared client sends the token it is given
        assert server.client().register(name)["created"] is False


def test_direct_database_view_matches_the_api(live, http):
    """The columns other tools read hold what the API reports."""
    name = http.at("shard-worker", "done", shard=1)
    conn = pymysql.connect(host=servers.MYSQL_HOST, port=servers.MYSQL_PORT, user=servers.MYSQL_USER,
                           password=servers.MYSQL_PASSWORD, ssl_disabled=True,
                           database=live.process.env["MYSQL_PIPELINE_URL"].rsplit("/", 1)[1])
    with conn.cursor() as cur:
        cur.execute("SELECT event_ingest_status, shard_splitter_status, shard_worker_status, mysql_sender_status "
                    "FROM pipeline_tracking WHERE filename=%s AND shard=1", (name,))
        assert cur.fetchone() == ("done", "done", "done", "new")
    conn.close()
