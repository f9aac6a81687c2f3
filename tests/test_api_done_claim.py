"""A `done` that also claims the caller's next tasks (`claim` in its body, `next` in its answer),
and the daemon loop that uses it: one request and one transaction where a daemon made two of
each; repeats, refusals and old callers behave as before."""
from __future__ import annotations

import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from app import db
from tests import servers
from tests.test_api_contract import STAGES, Http, module_api, new_name


@contextmanager
def private_api(tmp_path: Path):
    """pipeline-apid over a mariadbd of the test's own (its Com_* counters are the API's alone):
    an admin connection to that server and a client of the API."""
    from app.client import PipelineClient

    db = servers.new_private_mariadb()
    api = conn = None
    try:
        env = servers.service_env(db.url("pipeline_db"), tmp_path, servers.free_port(), REAP_INTERVAL="600")
        api = servers.start_api(env, tmp_path / "logs")
        conn = servers.admin_connect(port=db.port)
        yield conn, PipelineClient(api.base, max_wait=10)
    finally:
        if conn is not None:
            conn.close()
        if api is not None:
            api.process.stop()
        db.stop()
        shutil.rmtree(db.datadir, ignore_errors=True)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with module_api(tmp_path_factory) as server:
        yield server


@pytest.fixture
def http(live):
    return Http(live)


def at(http: Http, stage: str, status: str, shard: int = 0) -> str:
    """`Http.at` for a file of this one shard: no other shard of it is left pending upstream,
    where it would hold back an ordered stage's later files."""
    name = http.registered(shards=(shard,))
    for earlier in STAGES[:STAGES.index(stage)]:
        http.finish(name, shard, earlier)
    if status == "started":
        http.ok("POST", f"/stages/{stage}/start", {"filename": name, "shard": shard, "worker": "w"})
    return name


def drain(http: Http, stage: str, shard: int | None) -> None:
    """Finish whatever earlier tests left ready for `stage` (one module API for all)."""
    while True:
        body = {"worker": "drain", "limit": 100, **({"shard": shard} if shard is not None else {})}
        items = http.ok("POST", f"/queues/{stage}/claim", body)["items"]
        if not items:
            return
        for i in items:
            http.ok("POST", f"/stages/{stage}/done", {"filename": i["filename"], "shard": i["shard"],
                                                      "worker": "drain"})


def test_done_with_claim_hands_over_the_next_task_in_the_same_request(http):
    stage = "mysql-sender"
    drain(http, stage, 0)
    a, b = at(http, stage, "new"), at(http, stage, "new")
    assert [i["filename"] for i in http.ok("POST", f"/queues/{stage}/claim", {"worker": "w", "shard": 0})["items"]] == [a]
    got = http.ok("POST", f"/stages/{stage}/done", {"filename": a, "shard": 0, "worker": "w", "events": 3,
                                                   "claim": {"limit": 1, "shard": 0}})
    assert (got["status"], got["changed"], got["attempts"]) == ("done", True, 1)
    assert [(i["filename"], i["shard"], i["attempts"], i["resumed"]) for i in got["next"]] == [(b, 0, 1, False)]
    assert http.status(a, 0, stage) == "done" and http.status(b, 0, stage) == "started"
    history = [(h["stage"], h["action"], h["by"]) for h in http.ok("GET", f"/files/{b}")["shards"][0]["history"]]
    assert history[-1] == (stage, "claim", "w")
    done_a = [h for h in http.ok("GET", f"/files/{a}")["shards"][0]["history"] if h["action"] == "done"
              and h["stage"] == stage]
    assert len(done_a) == 1 and done_a[0]["events"] == 3 and done_a[0]["by"] == "w"
    # the last one: nothing left to hand over
    last = http.ok("POST", f"/stages/{stage}/done", {"filename": b, "shard": 0, "worker": "w", "claim": {"shard": 0}})
    assert last["changed"] and last["next"] == []
    # a repeat (the answer was lost) is answered as before, and still claims
    c = at(http, stage, "new")
    again = http.ok("POST", f"/stages/{stage}/done", {"filename": b, "shard": 0, "worker": "w", "claim": {"shard": 0}})
    assert (again["status"], again["changed"]) == ("done", False)
    assert [i["filename"] for i in again["next"]] == [c]
    # a refused done (the task is another daemon's) claims nothing
    d = at(http, stage, "new")
    code, body = http.post(f"/stages/{stage}/done", {"filename": c, "shard": 0, "worker": "thief",
                                                     "claim": {"shard": 0}})
    assert code == 409 and "next" not in body
    assert http.status(c, 0, stage) == "started" and http.status(d, 0, stage) == "new"
    # without `claim`, the answer is what it always was
    plain = http.ok("POST", f"/stages/{stage}/done", {"filename": c, "shard": 0, "worker": "w"})
    assert "next" not in plain
    drain(http, stage, 0)


def test_an_ordered_stage_hands_over_the_shards_next_file_in_order(http):
    stage = "shard-worker"
    drain(http, stage, 1)
    first, second = at(http, stage, "new", shard=1), at(http, stage, "new", shard=1)
    blocked = at(http, "shard-splitter", "started", shard=1)   # pending upstream: later files wait for it
    later = at(http, stage, "new", shard=1)
    assert [i["filename"] for i in http.ok("POST", f"/queues/{stage}/claim", {"worker": "w1", "shard": 1,
                                                                              "limit": 1})["items"]] == [first]
    got = http.ok("POST", f"/stages/{stage}/done", {"filename": first, "shard": 1, "worker": "w1",
                                                   "claim": {"limit": 5, "shard": 1}})
    assert [i["filename"] for i in got["next"]] == [second]
    got = http.ok("POST", f"/stages/{stage}/done", {"filename": second, "shard": 1, "worker": "w1",
                                                   "claim": {"limit": 5, "shard": 1}})
    assert got["next"] == [] and http.status(later, 1, stage) == "new"
    http.ok("POST", "/stages/shard-splitter/done", {"filename": blocked, "shard": 1, "worker": "w"})
    drain(http, stage, 1)


def test_a_done_whose_claim_finds_nothing_waits_like_a_long_poll(http):
    """`?wait=` on a `done` with `claim`: the done is committed at once and the claim waits for
    the next task (on the API's waiting lane), as the daemon's long-poll claim did after it."""
    from app.api.service import BASE, is_waiting

    stage = "mysql-sender"
    drain(http, stage, 0)
    a = at(http, stage, "started")
    later = at(http, "shard-worker", "started")
    timer = threading.Timer(0.5, http.ok, ("POST", "/stages/shard-worker/done",
                                           {"filename": later, "shard": 0, "worker": "w"}))
    began = time.monotonic()
    timer.start()
    code, got = http.post(f"/stages/{stage}/done?wait=10", {"filename": a, "shard": 0, "worker": "w",
                                                             "claim": {"shard": 0}})
    took = time.monotonic() - began
    assert code == 200 and got["changed"] and [i["filename"] for i in got["next"]] == [later]
    assert 0.4 < took < 5, took
    code, got = http.post(f"/stages/{stage}/done?wait=0.3", {"filename": later, "shard": 0, "worker": "w",
                                                              "claim": {"shard": 0}})
    assert code == 200 and got["next"] == [] and http.status(later, 0, stage) == "done"
    assert is_waiting("POST", f"{BASE}/stages/{stage}/done", "wait=2")
    assert is_waiting("POST", f"{BASE}/stages/{stage}/done-batch", "wait=2")
    assert not is_waiting("POST", f"{BASE}/stages/{stage}/done", "wait=0")
    assert not is_waiting("POST", f"{BASE}/stages/{stage}/fail", "wait=2")


@pytest.mark.parametrize("claim, field", [
    ({}, "claim.shard"),                      # the ordered stage needs its shard
    ("next", "claim"), ({"limit": 0, "shard": 0}, "claim.limit"), ({"shard": 9}, "claim.shard")])
def test_a_bad_claim_in_a_done_is_refused_before_anything_moves(http, claim, field):
    stage = "shard-worker"
    name = at(http, stage, "started")
    code, body = http.post(f"/stages/{stage}/done", {"filename": name, "shard": 0, "worker": "w", "claim": claim})
    assert code == 400 and body["field"] == field
    code, body = http.post(f"/stages/{stage}/done", {"filename": name, "shard": 0, "claim": {"shard": 0}})
    assert code == 400 and body["field"] == "worker"
    assert http.status(name, 0, stage) == "started"


def test_done_batch_with_claim_reports_a_files_shards_and_takes_the_next_file(http):
    stage = "shard-splitter"
    drain(http, stage, None)
    one, two = http.registered(), http.registered()
    claimed = http.ok("POST", f"/queues/{stage}/claim", {"worker": "s", "limit": 2})["items"]
    assert [(i["filename"], i["shard"]) for i in claimed] == [(one, 0), (one, 1)]
    got = http.ok("POST", f"/stages/{stage}/done-batch", {
        "worker": "s", "claim": {"limit": 2},
        "items": [{"filename": one, "shard": s, "events": 2, "stats": {"rejected": {"bad_json": 1}}} for s in (0, 1)]})
    assert [(a["status_code"], a["status"], a["changed"]) for a in got["items"]] == [(200, "done", True)] * 2
    assert [(i["filename"], i["shard"]) for i in got["next"]] == [(two, 0), (two, 1)]
    assert [http.status(one, s, "shard-worker") for s in (0, 1)] == ["new", "new"]
    # a batch with a repeat in it: each answered as alone, the claim made after them
    again = http.ok("POST", f"/stages/{stage}/done-batch", {
        "worker": "s", "claim": {"limit": 2}, "items": [{"filename": two, "shard": 0}, {"filename": one, "shard": 1}]})
    assert [(a["status_code"], a["changed"]) for a in again["items"]] == [(200, True), (200, False)]
    assert [(i["filename"], i["shard"], i["resumed"]) for i in again["next"]] == [(two, 1, True)]
    http.ok("POST", f"/stages/{stage}/done", {"filename": two, "shard": 1, "worker": "s"})
    drain(http, stage, None)


def toy_sender(service: str, folder: Path, claim_limit: int = 1, fail: str | None = None,
               stop_at: str | None = None, daemon_box: list | None = None):
    """A mysql-sender of shard 1 that finishes every task at once and remembers their names,
    claiming up to `claim_limit` tasks, each its own group: `fail` names a file it fails; at
    `stop_at` it asks its daemon to stop (the file is handed back)."""
    from app.daemon import Done, Failed, StageWork, StopRequested

    class Toy(StageWork):
        name = "mysql-sender"
        shard = 1

        def __init__(self):
            self.claim_limit = claim_limit
            self.service = service
            self.folder = folder
            self.seen: list[str] = []

        def process(self, tasks, ctx):
            self.seen += [t.filename for t in tasks]
            if stop_at in [t.filename for t in tasks]:
                daemon_box[0].stop.set()
                raise StopRequested()
            return [Failed("toy refuses it") if t.filename == fail else Done(events=1) for t in tasks]
    return Toy()


def test_the_daemon_reports_done_and_claims_the_next_task_in_one_request(live, tmp_path, monkeypatch):
    """After its first claim, a daemon with work waiting makes one request per task."""
    from app.config import Settings
    from app.daemon import Daemon

    http = Http(live)
    stage_name = "mysql-sender"
    drain(http, stage_name, 1)
    files = [at(http, stage_name, "new", shard=1) for _ in range(4)]
    env = servers.service_env(servers.server_url("unused"), tmp_path, live.port, CLAIM_WAIT_SECONDS="0.3")
    settings = Settings.from_env(env)
    toy = toy_sender("toy-sender-1", tmp_path / "toy")
    daemon = Daemon(toy, settings, owner="toy")
    calls = {"claim": 0, "done_and_claim": 0, "done": 0}
    for name in calls:
        real = getattr(daemon.client, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            answer = _real(*args, **kwargs)
            calls[_name] += _name != "claim" or bool(answer)
            return answer
        monkeypatch.setattr(daemon.client, name, counted)
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        servers.wait_until(lambda: all(http.status(f, 1, stage_name) == "done" for f in files), 30, 0.05,
                           "the toy daemon's four files")
    finally:
        daemon.stop.set()
        thread.join(30)
    assert toy.seen == files
    assert calls["done_and_claim"] == 4 and calls["done"] == 0
    assert calls["claim"] == 1     # the three files after the first came with the dones


def test_register_with_done_marks_ingest_done_in_the_same_request(http):
    """The importer's one request: rows created `done` with both moves in the history (as two
    calls would leave them), `events` once; a file that was registered before is finished by
    the ordinary `done`; `done` false or absent answers exactly as before."""
    name = new_name()
    got = http.ok("POST", "/files/register", {"filename": name, "shards": [0, 1], "done": True, "events": 7,
                                              "worker": "ingest"})
    assert got == {"filename": name, "shards": [0, 1], "created": True, "updated_rows": 2}
    shards = http.ok("GET", f"/files/{name}")["shards"]
    assert [s["event_ingest_status"] for s in shards] == ["done", "done"]
    for s in shards:
        moves = [(h["action"], h["from"], h["to"], h["by"]) for h in s["history"]]
        assert moves == [("register", None, "started", None), ("done", "started", "done", "ingest")]
    assert [h.get("events") for s in shards for h in s["history"] if h["action"] == "done"] == [7, None]
    queued = http.ok("GET", "/queues/shard-splitter", {"limit": 1000})["items"]
    assert {(i["filename"], i["shard"]) for i in queued} >= {(name, 0), (name, 1)}
    again = http.ok("POST", "/files/register", {"filename": name, "shards": [0, 1], "done": True})
    assert again == {"filename": name, "shards": [0, 1], "created": False, "updated_rows": 0}
    old = new_name()   # registered by the original generator, which then writes the file
    assert http.ok("POST", "/files/register", {"filename": old, "shards": [0]}) == \
        {"filename": old, "shards": [0], "created": True}
    finished = http.ok("POST", "/files/register", {"filename": old, "shards": [0, 1], "done": True, "events": 3})
    assert finished == {"filename": old, "shards": [0, 1], "created": True, "updated_rows": 2}
    shards = http.ok("GET", f"/files/{old}")["shards"]
    assert [s["event_ingest_status"] for s in shards] == ["done", "done"]
    assert sum(h.get("events") or 0 for s in shards for h in s["history"]) == 3
    code, body = http.post("/files/register", {"filename": new_name(), "done": "yes"})
    assert code == 400 and body["field"] == "done"
    drain(http, "shard-splitter", None)


def test_a_registration_is_one_round_trip_and_leaves_what_the_statements_left(make_database):
    """The tracker registers a file with one CALL of migration 0007's procedure in one packet
    (START TRANSACTION; CALL; COMMIT): one round trip where the INSERTs, then the log and a read,
    took two. Rows, history and counts as before: a repeat creates and logs nothing, a new shard
    of a known file is created (and its moves logged) alone, `events` goes on the first shard
    created, and the counts agree with a scan of the table."""
    from app.api import tracking
    from app.api.queries import SQL_COUNTS_SCANNED, SQL_TASK_COUNTS
    from bench.wire import counting

    url = make_database("register")
    conns = db.ThreadConnections(url, multi_statements=True)
    tracker = tracking.Tracker(conns, 4, 60, 3)
    tracker.schema.ensure()
    tracker.store.conn()   # the session's settings: once per connection, not per request
    with counting() as (counts, kinds):
        got = tracker.register("2026a", [0, 1], True, "ingest", 9)
    assert got == {"filename": "2026a", "shards": [0, 1], "created": True, "updated_rows": 2}
    assert counts["round_trips"] == 1, kinds
    assert tracker.register("2026a", [0, 1], True, "ingest", 9) == \
        {"filename": "2026a", "shards": [0, 1], "created": False, "updated_rows": 0}
    assert tracker.register("2026b", [2]) == {"filename": "2026b", "shards": [2], "created": True}
    assert tracker.register("2026b", [1, 2, 3], True, "ingest", 5) == \
        {"filename": "2026b", "shards": [1, 2, 3], "created": True, "updated_rows": 3}
    history = servers.query(url, "SELECT filename, shard, action, from_status, to_status, actor, events"
                                 " FROM pipeline_transitions ORDER BY filename, shard, id")
    assert history == [
        ("2026a", 0, "register", None, "started", None, None), ("2026a", 0, "done", "started", "done", "ingest", 9),
        ("2026a", 1, "register", None, "started", None, None), ("2026a", 1, "done", "started", "done", "ingest", None),
        ("2026b", 1, "register", None, "started", None, None), ("2026b", 1, "done", "started", "done", "ingest", 5),
        ("2026b", 2, "register", None, "started", None, None), ("2026b", 2, "done", "started", "done", "ingest", None),
        ("2026b", 3, "register", None, "started", None, None), ("2026b", 3, "done", "started", "done", "ingest", None)]
    assert servers.query(url, "SELECT filename, shard, event_ingest_status FROM pipeline_tracking"
                              " ORDER BY filename, shard") == [
        ("2026a", 0, "done"), ("2026a", 1, "done"), ("2026b", 1, "done"), ("2026b", 2, "done"), ("2026b", 3, "done")]
    kept = sorted(r for r in servers.query(url, SQL_TASK_COUNTS))
    assert kept == sorted(r for r in servers.query(url, SQL_COUNTS_SCANNED) if r[3])


def test_a_registration_without_its_procedure_says_the_schema_is_missing_and_the_next_one_works(make_database):
    """The procedure dropped under a running API (a dump restored without its routines): the
    registration fails as a missing table does (SchemaMissing: 503 and `retry`), creating
    nothing, and the schema installed again brings the procedure back."""
    from app.api import tracking
    from app.api.errors import SchemaMissing

    url = make_database("noproc")
    tracker = tracking.Tracker(db.ThreadConnections(url, multi_statements=True), 2, 60, 3)
    tracker.schema.ensure()
    servers.query(url, "DROP PROCEDURE pipeline_register")
    with pytest.raises(SchemaMissing):
        tracker.register("2026c", [0, 1], True, "ingest", 3)
    assert servers.query(url, "SELECT COUNT(*) FROM pipeline_tracking") == [(0,)]
    tracker.schema.lost()
    tracker.schema.ensure()
    assert tracker.register("2026c", [0, 1], True, "ingest", 3)["updated_rows"] == 2


def test_the_client_registers_done_with_an_api_that_does_not_know_the_field(http, live):
    """An API older than `done` registers and answers without `updated_rows`: the client then
    marks ingest done itself, so no file stays `started`."""
    from app.client import PipelineClient

    class OldApi(PipelineClient):
        def call(self, method, path, body=None, *args, **kwargs):
            if path == "/files/register" and body:
                body = {k: v for k, v in body.items() if k not in ("done", "events", "worker")}
            return super().call(method, path, body, *args, **kwargs)

    name = new_name()
    answer = OldApi(live.base, max_wait=10).register(name, [0, 1], done=True, events=4, worker="ingest")
    assert answer["updated_rows"] == 2
    assert [s["event_ingest_status"] for s in http.ok("GET", f"/files/{name}")["shards"]] == ["done", "done"]
    drain(http, "shard-splitter", None)


def test_a_done_with_claim_is_one_transaction_and_an_empty_long_poll_none(tmp_path):
    """On a server of the test's own (its Com_* counters are the API's alone): a `done` that
    claims the next task commits once, where a `done` and a claim committed twice; a long-poll
    claim with nothing for it asks one autocommitted read (no transaction), though the stage
    has a task started (by another daemon) so the counts alone cannot answer."""
    with private_api(tmp_path) as (conn, client):

        def counters(*names: str) -> dict:
            names = names or ("Com_begin", "Com_commit", "Com_rollback")
            with conn.cursor() as cur:
                cur.execute(f"SHOW GLOBAL STATUS WHERE Variable_name IN ({','.join(['%s'] * len(names))})", names)
                return {k: int(v) for k, v in cur.fetchall()}

        names = [f"2026{n:010d}" for n in range(6)]
        before = counters("Com_insert_select")
        for name in names:
            client.register(name, [0], done=True)
        # the count triggers' short path (one INSERT ... VALUES), not their general INSERT ... SELECT
        assert counters("Com_insert_select") == before
        for name in names:
            client.start("shard-splitter", name, 0, "s")
            client.done("shard-splitter", name, 0, "s")
        tasks = client.claim("shard-worker", "w", 1, 0)
        before = counters()
        for _ in names:
            answer, tasks = client.done_and_claim("shard-worker", tasks[0].filename, 0, "w", {"limit": 1, "shard": 0})
            if not tasks:
                break
        after = counters()
        assert tasks == []
        # six dones and five claims: one commit per request (and at most one for a reaping claim)
        assert after["Com_commit"] - before["Com_commit"] <= len(names) + 1, (before, after)
        assert after["Com_rollback"] == before["Com_rollback"]
        assert len(client.claim("mysql-sender", "other", 100, 0)) == len(names)   # all held by "other"
        before = counters()
        for _ in range(3):
            assert client.claim("mysql-sender", "idle", 1, 0, wait=0.2) == []
        after = counters()
        assert after["Com_begin"] - before["Com_begin"] <= 1, (before, after)   # one reaping claim at most


def test_no_heartbeat_for_a_done_task_while_its_report_waits_for_the_next_claim(live, tmp_path, caplog):
    """The done commits first and the same request then waits for the next task: a heartbeat of
    the done task meanwhile is refused (409) and was logged as a lost lease (a clean `make run`
    logged it at WARNING)."""
    import logging

    from app.config import Settings
    from app.daemon import Daemon

    http = Http(live)
    stage_name = "mysql-sender"
    drain(http, stage_name, 1)
    name = at(http, stage_name, "new", shard=1)
    env = servers.service_env(servers.server_url("unused"), tmp_path, live.port, CLAIM_WAIT_SECONDS="3",
                              LEASE_SECONDS="1")
    settings = Settings.from_env(env)
    daemon = Daemon(toy_sender("toy-sender-beat", tmp_path / "toy"), settings, owner="toy-beat")
    beats: list[str] = []
    real = daemon.client.done_and_claim

    def done_and_claim(*args, **kwargs):
        answer = real(*args, **kwargs)
        beats.append("reported")
        return answer
    daemon.client.done_and_claim = done_and_claim
    caplog.set_level(logging.WARNING, logger="toy-sender-beat")
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        servers.wait_until(lambda: http.status(name, 1, stage_name) == "done", 30, 0.05, "the toy's file")
        time.sleep(2.0)   # inside the report's 3 s wait for a next task: heartbeats every 1/6 s
    finally:
        daemon.stop.set()
        thread.join(30)
    lost = [r.getMessage() for r in caplog.records if "lease of" in r.getMessage()]
    assert lost == []
    assert beats == ["reported"]


def counted_calls(daemon, monkeypatch, names=("claim", "done_and_claim", "done", "done_batch_and_claim")) -> dict:
    """Requests the daemon's client makes, by method (an empty claim not counted; a batch's
    items listed)."""
    calls: dict = {name: 0 for name in names}
    calls["batch_items"] = []
    for name in names:
        real = getattr(daemon.client, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            answer = _real(*args, **kwargs)
            calls[_name] += _name != "claim" or bool(answer)
            if _name == "done_batch_and_claim":
                calls["batch_items"].append([i["filename"] for i in args[1]])
            return answer
        monkeypatch.setattr(daemon.client, name, counted)
    return calls


def run_toy(daemon, until, what: str) -> None:
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        servers.wait_until(until, 30, 0.05, what)
    finally:
        daemon.stop.set()
        thread.join(30)


def test_the_dones_of_a_claim_of_several_files_go_in_one_request(live, tmp_path, monkeypatch):
    """A claim of four files, worked one by one: the first three `done`s wait for the last and
    the four go in one request and transaction, with the next claim (was one request each)."""
    from app.config import Settings
    from app.daemon import Daemon

    http = Http(live)
    stage_name = "mysql-sender"
    drain(http, stage_name, 1)
    files = [at(http, stage_name, "new", shard=1) for _ in range(4)]
    env = servers.service_env(servers.server_url("unused"), tmp_path, live.port, CLAIM_WAIT_SECONDS="0.3")
    toy = toy_sender("toy-sender-batch", tmp_path / "toy", claim_limit=4)
    daemon = Daemon(toy, Settings.from_env(env), owner="toy-batch")
    calls = counted_calls(daemon, monkeypatch)
    run_toy(daemon, lambda: all(http.status(f, 1, stage_name) == "done" for f in files), "the toy's four files")
    assert toy.seen == files
    assert calls["batch_items"] == [files]
    assert calls["done"] == calls["done_and_claim"] == 0 and calls["claim"] == 1


def test_a_failed_file_reports_the_dones_before_it_and_the_others_still_count(live, tmp_path, monkeypatch):
    """A failure among a claim's files: the `done`s waiting before it are reported first (a
    file's failure loses none of the others' work), then the failure, then the rest."""
    from app.config import Settings
    from app.daemon import Daemon

    http = Http(live)
    stage_name = "mysql-sender"
    drain(http, stage_name, 1)
    files = [at(http, stage_name, "new", shard=1) for _ in range(4)]
    env = servers.service_env(servers.server_url("unused"), tmp_path, live.port, CLAIM_WAIT_SECONDS="0.3")
    toy = toy_sender("toy-sender-fail", tmp_path / "toy", claim_limit=4, fail=files[2])
    daemon = Daemon(toy, Settings.from_env(env), owner="toy-fail")
    calls = counted_calls(daemon, monkeypatch)
    run_toy(daemon, lambda: [http.status(f, 1, stage_name) for f in files] == ["done", "done", "failed", "done"],
            "two done, one failed, one done")
    assert calls["batch_items"] == [files[:2]]
    assert calls["done_and_claim"] == 1   # the last file's report takes the next claim


def test_a_stop_between_files_reports_the_waiting_dones_before_handing_back(live, tmp_path, monkeypatch):
    """Stopping in the third file of a claim: the two `done`s waiting are reported (not handed
    back, which would make another daemon work them again); the third and fourth go back."""
    from app.config import Settings
    from app.daemon import Daemon

    http = Http(live)
    stage_name = "mysql-sender"
    drain(http, stage_name, 1)
    files = [at(http, stage_name, "new", shard=1) for _ in range(4)]
    env = servers.service_env(servers.server_url("unused"), tmp_path, live.port, CLAIM_WAIT_SECONDS="0.3")
    box: list = []
    toy = toy_sender("toy-sender-stop", tmp_path / "toy", claim_limit=4, stop_at=files[2], daemon_box=box)
    daemon = Daemon(toy, Settings.from_env(env), owner="toy-stop")
    box.append(daemon)
    daemon.run()   # returns once stopped
    assert toy.seen == files[:3]
    assert [http.status(f, 1, stage_name) for f in files] == ["done", "done", "new", "new"]
    drain(http, stage_name, 1)


def test_a_batch_done_is_one_update_and_each_task_keeps_its_own_history(tmp_path):
    """A `done-batch` of four first `done`s: one UPDATE for them all (was one each), and still
    each task's attempts in its answer, its own log row (events, stats, duration), the
    rejected-lines counters summed, the counts equal to a scan. On a server of the test's own
    (its Com_* counters are the API's alone)."""
    import orjson

    from tests.test_api_counts import kept_and_scanned

    with private_api(tmp_path) as (conn, client):
        names = [f"2027{n:010d}" for n in range(4)]
        for name in names:
            client.register(name, [0], done=True)
            for stage in ("shard-splitter", "shard-worker"):
                client.start(stage, name, 0, "up")
                client.done(stage, name, 0, "up")
        stage = "mysql-sender"
        assert [t.filename for t in client.claim(stage, "w", 4, 0)] == names
        with conn.cursor() as cur:   # one of them on its third attempt (status unchanged: counts too)
            cur.execute("UPDATE pipeline_db.pipeline_tracking SET mysql_sender_attempts=3 WHERE filename=%s",
                        (names[1],))
        conn.commit()
        stats = [{"loaded": 10}, {"loaded": 11, "rejected": {"bad_json": 1}}, {"loaded": 12},
                 {"loaded": 13, "rejected": {"bad_json": 2, "too_long": 1}}]
        items = [{"filename": n, "shard": 0, "events": 10 + i, "stats": s} for i, (n, s) in enumerate(zip(names, stats))]

        def updates() -> int:
            with conn.cursor() as cur:
                cur.execute("SHOW GLOBAL STATUS LIKE 'Com_update'")
                return int(cur.fetchone()[1])
        before = updates()
        answers, handed = client.done_batch_and_claim(stage, items, "w", {"limit": 1, "shard": 0})
        assert updates() - before == 1   # nothing left to claim: the dones' one UPDATE
        assert handed == []
        assert [(a["filename"], a["status"], a["changed"], a["attempts"]) for a in answers] == [
            (names[0], "done", True, 1), (names[1], "done", True, 3), (names[2], "done", True, 1),
            (names[3], "done", True, 1)]
        with conn.cursor() as cur:
            cur.execute("SELECT filename, actor, events, stats, duration_ms IS NOT NULL FROM pipeline_db.pipeline_transitions"
                        " WHERE stage=%s AND action='done' ORDER BY id", (stage,))
            logged = cur.fetchall()
            cur.execute("SELECT reason, n FROM pipeline_db.pipeline_rejected_counts WHERE stage=%s ORDER BY reason",
                        (stage,))
            rejected = cur.fetchall()
            cur.execute("USE pipeline_db")
        assert [(f, a, e, orjson.loads(s), d) for f, a, e, s, d in logged] == [
            (n, "w", 10 + i, s, 1) for i, (n, s) in enumerate(zip(names, stats))]
        assert rejected == (("bad_json", 3), ("too_long", 1))
        kept, scanned = kept_and_scanned(conn)
        assert kept == scanned
        # the same batch again: each a repeat, answered as such (the one-by-one path)
        again, _ = client.done_batch_and_claim(stage, items, "w")
        assert [(a["status_code"], a["changed"]) for a in again] == [(200, False)] * 4


def test_only_the_workers_and_senders_hold_their_reports_back(tmp_path):
    """A splitter's `done` that waited would hold back the workers (the heaviest stage), so
    only the workers' and senders' reports of a claim's files wait for the last one."""
    from app.config import Settings
    from app.daemon import REPORT_DEFER_SECONDS, Daemon

    settings = Settings.from_env(servers.service_env(servers.server_url("unused"), tmp_path, servers.free_port()))
    held = {}
    for stage in ("shard-splitter", "shard-worker", "mysql-sender"):
        toy = toy_sender(f"toy-{stage}", tmp_path / stage, claim_limit=4)
        toy.name = stage
        held[stage] = Daemon(toy, settings, owner="toy").defer_for
    assert held == {"shard-splitter": 0.0, "shard-worker": REPORT_DEFER_SECONDS, "mysql-sender": REPORT_DEFER_SECONDS}


def test_an_ordered_claim_reads_its_gate_and_its_files_in_one_round_trip(make_database):
    """A worker's claim (an ordered stage) locks the shard's claim row, reads its gate (another
    daemon busy on the shard, the oldest file pending upstream), the files below that gate, and
    writes and commits, in one round trip (the procedure of tracking 0008): a claim and a `done` +
    claim cost one round trip each, where the writes took a second and, before that, the ready
    read after the gate a third. The gate still holds: never past a file pending upstream,
    nothing while another daemon holds one of the shard's files."""
    from app.api import tracking
    from bench.wire import counting

    url = make_database("ordered_claim")
    tracker = tracking.Tracker(db.ThreadConnections(url, multi_statements=True), 2, 60, 3)
    tracker.schema.ensure()
    tracker.store.conn()
    for name in ("2026a", "2026b", "2026c", "2026d"):
        tracker.register(name, [0], True, "ingest")
    for name in ("2026a", "2026b", "2026d"):   # 2026c still pending at the splitter
        tracker.transition("shard-splitter", "start", name, 0, owner="s")
        tracker.transition("shard-splitter", "done", name, 0, owner="s")
    with counting() as (counts, kinds):
        got = tracker.claim("shard-worker", 1, 0, "w")
    assert [r["filename"] for r in got] == ["2026a"]
    assert counts["round_trips"] == 1, kinds
    assert tracker.claim("shard-worker", 4, 0, "other") == []   # "w" holds one of the shard's files
    with counting() as (counts, kinds):
        moved, got = tracker.done_and_claim("shard-worker", [("2026a", 0, 1, None)], "w", 4, 0)
    assert [m.filename for m in moved] == ["2026a"]
    assert [r["filename"] for r in got] == ["2026b"]   # not 2026d: 2026c is still pending upstream
    assert counts["round_trips"] == 1, kinds


def test_an_ordered_claims_gate_locks_no_file_still_pending_upstream(make_database):
    """The gate of a worker's claim (another daemon busy on the shard, the oldest file pending
    upstream) is a plain read: while the claim's transaction is open, a splitter's claim (which
    skips locked rows) still gets every shard of a file the gate read, not half of it."""
    import pymysql

    from app.api import tracking
    from app.api.queries import sql_claim, sql_ready, sql_shard_gate
    from app.stages import Stage

    url = make_database("gate_locks")
    tracker = tracking.Tracker(db.ThreadConnections(url, multi_statements=True), 2, 60, 3)
    tracker.schema.ensure()
    tracker.register("2026a", [0, 1], True, "ingest")
    worker, splitter = db.connect(url), db.connect(url)
    try:
        for conn in (worker, splitter):
            with conn.cursor() as cur:
                cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
        with worker.cursor() as cur:
            cur.execute("START TRANSACTION")
            cur.execute(sql_shard_gate(Stage.WORKER), (0, "w", 0, 0))
        with splitter.cursor(pymysql.cursors.DictCursor) as cur:
            cur.execute("START TRANSACTION")
            cur.execute(sql_ready(Stage.SPLITTER, False, "filename, shard", "LIMIT %s FOR UPDATE SKIP LOCKED"), (4,))
            assert [(r["filename"], r["shard"]) for r in cur.fetchall()] == [("2026a", 0), ("2026a", 1)]
            cur.execute("ROLLBACK")
        worker.rollback()
        # The same with the claim procedure's gate (tracking 0008), its transaction left open.
        with worker.cursor() as cur:
            cur.execute("START TRANSACTION")
            cur.execute(sql_claim("TRUE"), (Stage.WORKER, 0, "w", 1, 60_000_000))
            assert cur.fetchall() == ()
        with splitter.cursor(pymysql.cursors.DictCursor) as cur:
            cur.execute("START TRANSACTION")
            cur.execute(sql_ready(Stage.SPLITTER, False, "filename, shard", "LIMIT %s FOR UPDATE SKIP LOCKED"), (4,))
            assert [(r["filename"], r["shard"]) for r in cur.fetchall()] == [("2026a", 0), ("2026a", 1)]
    finally:
        worker.close()
        splitter.close()


def test_an_ordered_claims_gate_reads_a_few_rows_whatever_the_backlog_upstream(make_database):
    """The gate's oldest file pending upstream was one MIN(id) over the shard's files the splitter
    has new or started; ingest's status is not in the index, so it read every such file: each
    worker claim read the shard's whole backlog at the splitter (150 rows a claim in the small
    bench). One ORDER BY id LIMIT 1 per status stops at the first: a few rows, the same answer."""
    from app.api import tracking
    from app.api.queries import sql_shard_gate
    from app.stages import Stage

    url = make_database("gate_backlog")
    tracker = tracking.Tracker(db.ThreadConnections(url, multi_statements=True), 2, 60, 3)
    tracker.schema.ensure()
    names = [f"2026{n:03d}" for n in range(80)]
    for name in names:
        tracker.register(name, [0], True, "ingest")
    tracker.register("2026zzz", [0], False, "ingest")          # still being written: blocks nothing
    for name in names[:3]:
        tracker.transition("shard-splitter", "start", name, 0, owner="s")
        tracker.transition("shard-splitter", "done", name, 0, owner="s")
    tracker.transition("shard-splitter", "start", names[5], 0, owner="s")   # started, later than names[3]
    conn = db.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT filename, id FROM pipeline_tracking")
            ids = dict(cur.fetchall())
            for expected, finished in ((names[3], names[3:5]), (names[5], [])):
                cur.execute("FLUSH STATUS")
                cur.execute(sql_shard_gate(Stage.WORKER), (0, "w", 0, 0))
                assert cur.fetchall() == ((0, ids[expected]),)
                cur.execute("SHOW SESSION STATUS LIKE 'Handler_read_next'")
                assert int(cur.fetchone()[1]) <= 4
                for name in finished:           # the new files before names[5] split: the started one blocks
                    tracker.transition("shard-splitter", "start", name, 0, owner="s")
                    tracker.transition("shard-splitter", "done", name, 0, owner="s")
            cur.execute(sql_shard_gate(Stage.WORKER), (0, "w", 1, 1))
            assert cur.fetchall() == ((0, None),)
    finally:
        conn.close()


def test_a_batch_dones_log_rows_are_read_from_the_tasks_without_a_temporary_table(make_database):
    """A `done-batch`'s log INSERT read its items from a derived table of constants joined to
    the tasks: two temporary tables and a sort a statement, on every report of a small file.
    It reads the tasks' rows alone now, each item's events and stats picked by its position:
    no temporary table, and the same rows (each task its own events and stats, logged in the
    items' order, whatever the tasks' ids)."""
    import orjson

    from app.api import tracking
    from app.stages import Stage

    url = make_database("batch_log")
    tracker = tracking.Tracker(db.ThreadConnections(url, multi_statements=True), 4, 60, 3)
    tracker.schema.ensure()
    for name in ("2028a", "2028b"):
        tracker.register(name, [0, 1], True, "ingest")
    held = tracker.claim("shard-splitter", 4, None, "s")
    items = [(r["filename"], r["shard"], 100 + k, orjson.dumps({"k": k}).decode(), [])
             for k, r in enumerate(reversed(held))]
    statements, _ = tracker.transitions.done_many_sql(Stage.SPLITTER, items, "s")
    conn = db.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("START TRANSACTION")
            for sql, args in statements[:2]:
                cur.execute(sql, args)
            assert cur.fetchall()[0][0] == 4
            cur.execute("SHOW SESSION STATUS LIKE 'Created_tmp_tables'")
            before = int(cur.fetchone()[1])
            assert cur.execute(*statements[2]) == 4
            cur.execute("SHOW SESSION STATUS LIKE 'Created_tmp_tables'")
            assert int(cur.fetchone()[1]) - before == 0
            conn.commit()
            cur.execute("SELECT filename, shard, events, stats, actor FROM pipeline_transitions"
                        " WHERE stage='shard-splitter' AND action='done' ORDER BY id")
            assert cur.fetchall() == tuple((f, s, e, st, "s") for f, s, e, st, _ in items)
    finally:
        conn.close()


def test_a_dones_rejected_lines_are_counted_without_a_temporary_table_and_only_when_it_took_effect(make_database):
    """The rejected-lines counters of a `done` (one statement, gated on the done's UPDATE having
    moved its tasks) were a derived table of the reasons: two temporary tables a statement. One
    INSERT ... VALUES now: no temporary table; a false gate still adds nothing."""
    from app.api import tracking
    from app.api.transitions import rejected_sql
    from app.stages import Stage

    url = make_database("rejected_counts")
    tracking.Tracker(db.ThreadConnections(url, multi_statements=True), 2, 60, 3).schema.ensure()
    conn = db.connect(url)
    try:
        with conn.cursor() as cur:
            for took in (0, 1, 1):
                cur.execute("SET @pipeline_done = %s", (took,))
                cur.execute("SHOW SESSION STATUS LIKE 'Created_tmp_tables'")
                before = int(cur.fetchone()[1])
                cur.execute(*rejected_sql(Stage.WORKER, [("bad_json", 2), ("duplicate", 5)], "@pipeline_done = 1"))
                cur.execute("SHOW SESSION STATUS LIKE 'Created_tmp_tables'")
                assert int(cur.fetchone()[1]) - before == 0
            cur.execute("SELECT stage, reason, n FROM pipeline_rejected_counts ORDER BY reason")
            assert cur.fetchall() == (("shard-worker", "bad_json", 4), ("shard-worker", "duplicate", 10))
    finally:
        conn.close()


def test_a_claim_passes_tasks_another_claim_is_locking_and_locks_only_what_it_takes(make_database):
    """The claim procedure's locking reads (tracking 0008: a derived table's LIMIT ... FOR
    UPDATE SKIP LOCKED into a list, then the writes over the list) lock exactly the rows they
    claim: while another replica's claim holds the oldest ready tasks, a claim takes the next
    ones at once instead of waiting on them or taking them twice, and a task neither took stays
    free to lock before it commits."""
    import pymysql

    from app.api import tracking
    from app.api.queries import sql_claim, sql_ready
    from app.stages import Stage

    url = make_database("claim_locks")
    tracker = tracking.Tracker(db.ThreadConnections(url, multi_statements=True), 2, 60, 3)
    tracker.schema.ensure()
    for name in ("2026a", "2026b", "2026c", "2026d", "2026e"):
        tracker.register(name, [0], True, "ingest")
    other, claim, third = db.connect(url), db.connect(url), db.connect(url)
    try:
        for conn in (other, claim, third):
            with conn.cursor() as cur:
                cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                cur.execute("SET SESSION innodb_lock_wait_timeout = 1")
        with other.cursor(pymysql.cursors.DictCursor) as cur:   # another replica's claim, mid-flight
            cur.execute("START TRANSACTION")
            cur.execute(sql_ready(Stage.SPLITTER, False, "filename", "LIMIT %s FOR UPDATE SKIP LOCKED"), (2,))
            assert [r["filename"] for r in cur.fetchall()] == ["2026a", "2026b"]
        with claim.cursor(pymysql.cursors.DictCursor) as cur:
            cur.execute("START TRANSACTION")
            cur.execute(sql_claim("TRUE"), (Stage.SPLITTER, None, "s2", 2, 60_000_000))
            assert [(r["filename"], r["attempts"], r["resumed"]) for r in cur.fetchall()] == [
                ("2026c", 1, 0), ("2026d", 1, 0)]
            cur.nextset()
        with third.cursor() as cur:
            cur.execute("START TRANSACTION")
            cur.execute("SELECT filename FROM pipeline_tracking WHERE filename = '2026e' FOR UPDATE")
            assert cur.fetchall() == (("2026e",),)
        third.rollback()
        claim.commit()
        other.rollback()
    finally:
        for conn in (other, claim, third):
            conn.close()
    assert [r["filename"] for r in tracker.claim("shard-splitter", 4, None, "s1")] == ["2026a", "2026b", "2026e"]
    assert [(r["filename"], r["resumed"]) for r in tracker.claim("shard-splitter", 3, None, "s2")] == [
        ("2026c", True), ("2026d", True)]
    assert servers.query(url, "SELECT filename, action, actor FROM pipeline_transitions WHERE stage = 'shard-splitter'"
                              " ORDER BY id") == [
        ("2026c", "claim", "s2"), ("2026d", "claim", "s2"), ("2026a", "claim", "s1"), ("2026b", "claim", "s1"),
        ("2026e", "claim", "s1")]


def test_a_claim_of_many_tasks_with_long_ids_gets_every_one(make_database):
    """The claim procedure carries the ids it locked as a GROUP_CONCAT list, which the server
    cuts at `group_concat_max_len` (1,024 bytes by default): a cut list would name other rows
    or none. 60 tasks of 19-digit ids (1,200 bytes) are all claimed, logged and answered."""
    from app.api import tracking

    url = make_database("claim_long")
    servers.query(url, "SELECT 1")
    tracker = tracking.Tracker(db.ThreadConnections(url, multi_statements=True), 2, 60, 3)
    tracker.schema.ensure()
    servers.query(url, "ALTER TABLE pipeline_tracking AUTO_INCREMENT = 1000000000000000000")
    names = [f"2026{i:04d}" for i in range(60)]
    for name in names:
        tracker.register(name, [1], True, "ingest")
    got = tracker.claim("shard-splitter", 100, 1, "s")
    assert [r["filename"] for r in got] == names
    assert {r["attempts"] for r in got} == {1} and not any(r["resumed"] for r in got)
    assert servers.query(url, "SELECT COUNT(*) FROM pipeline_transitions WHERE action = 'claim'") == [(60,)]
    assert [r["filename"] for r in tracker.claim("shard-splitter", 100, 1, "s")] == names   # resumed
    assert servers.query(url, "SELECT COUNT(*) FROM pipeline_tracking WHERE shard_splitter_status = 'started'"
                              " AND owner = 's'") == [(60,)]
