"""Bad input gets a clear 4xx naming what to fix, never a 500: a table of malformed bodies,
path-traversal file names, huge bodies, wrong types, methods and routes; a property-based run
of random requests; and the OpenAPI file describes exactly the routes the app serves."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import requests
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.api import service as apid
from app.config import Settings
from tests.test_api_contract import BASE, Http, module_api, new_name

ROOT = Path(__file__).resolve().parent.parent
OPENAPI = ROOT / "docs" / "openapi.yaml"


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with module_api(tmp_path_factory) as server:
        yield server


@pytest.fixture(scope="module")
def task(live):
    """A registered file whose shard 0 is ready for the shard worker."""
    http = Http(live)
    name = http.registered()
    http.finish(name, 0, "shard-splitter")
    return name


def send(live, method: str, path: str, body=None, raw: bytes | None = None, params=None, headers=None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    resp = requests.request(method, f"http://127.0.0.1:{live.port}{path}", data=data, params=params,
                            headers={"Content-Type": "application/json", **(headers or {})}, timeout=30)
    assert resp.headers["Content-Type"].startswith("application/json"), resp.text[:200]
    return resp.status_code, resp.json()


T = "TASK"  # replaced by the fixture's file name
BAD_BODIES = [
    # (path, body or raw bytes, field named in the answer or None)
    ("/stages/shard-worker/start", b"{", None),
    ("/stages/shard-worker/start", b"", None),
    ("/stages/shard-worker/start", b"[1, 2]", None),
    ("/stages/shard-worker/start", b"null", None),
    ("/stages/shard-worker/start", b"\xff\xfe{}", None),
    ("/stages/shard-worker/start", b'{"filename": "\\ud800", "shard": 0}', None),
    ("/stages/shard-worker/start", {"shard": 0}, "filename"),
    ("/stages/shard-worker/start", {"filename": None, "shard": 0}, "filename"),
    ("/stages/shard-worker/start", {"filename": 20250101000000, "shard": 0}, "filename"),
    ("/stages/shard-worker/start", {"filename": T}, "shard"),
    ("/stages/shard-worker/start", {"filename": T, "shard": "0"}, "shard"),
    ("/stages/shard-worker/start", {"filename": T, "shard": True}, "shard"),
    ("/stages/shard-worker/start", {"filename": T, "shard": 0.0}, "shard"),
    ("/stages/shard-worker/start", {"filename": T, "shard": -1}, "shard"),
    ("/stages/shard-worker/start", {"filename": T, "shard": 2}, "shard"),
    ("/stages/shard-worker/start", {"filename": T, "shard": 10**30}, "shard"),
    ("/stages/shard-worker/start", {"filename": T, "shard": 0, "worker": 7}, "worker"),
    ("/stages/shard-worker/start", {"filename": T, "shard": 0, "worker": "w" * 129}, "worker"),
    ("/stages/shard-worker/fail", {"filename": T, "shard": 0, "error": ["x"]}, "error"),
    ("/stages/shard-worker/done", {"filename": T, "shard": 0, "events": -1}, "events"),
    ("/stages/shard-worker/done", {"filename": T, "shard": 0, "events": "12"}, "events"),
    ("/stages/shard-worker/done", {"filename": T, "shard": 0, "events": 2**31}, "events"),
    ("/stages/shard-worker/done", {"filename": T, "shard": 0, "stats": [1, 2]}, "stats"),
    ("/stages/shard-worker/done", {"filename": T, "shard": 0, "stats": "many"}, "stats"),
    ("/stages/shard-worker/heartbeat", {"filename": T, "shard": 0}, "worker"),
    ("/stages/shard-worker/heartbeat", {"filename": T, "shard": 0, "worker": ""}, "worker"),
    ("/stages/shard-worker/retry", {"all": False}, "all"),
    ("/stages/shard-worker/retry", {"all": "yes"}, "all"),
    ("/stages/shard-worker/retry", {"all": True, "shard": 5}, "shard"),
    ("/stages/event-ingest/done", {}, "filename"),
    ("/stages/event-ingest/done", {"filename": T, "events": -5}, "events"),
    ("/stages/event-ingest/done", {"filename": T, "worker": 1}, "worker"),
    ("/files/register", {}, "filename"),
    ("/files/register", {"filename": T, "shards": []}, "shards"),
    ("/files/register", {"filename": T, "shards": "0,1"}, "shards"),
    ("/files/register", {"filename": T, "shards": [0, 7]}, "shards"),
    ("/files/register", {"filename": T, "shards": [None]}, "shards"),
    ("/queues/shard-worker/claim", {"worker": "w"}, "shard"),
    ("/queues/mysql-sender/claim", {}, "worker"),
    ("/queues/mysql-sender/claim", {"worker": "w", "limit": 0}, "limit"),
    ("/queues/mysql-sender/claim", {"worker": "w", "limit": 1001}, "limit"),
    ("/queues/mysql-sender/claim", {"worker": "w", "limit": "3"}, "limit"),
    ("/queues/mysql-sender/claim", {"worker": "w", "shard": 2}, "shard"),
]


@pytest.mark.parametrize("path,body,field", BAD_BODIES, ids=[f"{p}-{i}" for i, (p, _, _) in enumerate(BAD_BODIES)])
def test_bad_body_is_400_naming_the_field(live, task, path, body, field):
    if isinstance(body, bytes):
        code, answer = send(live, "POST", BASE + path, raw=body)
    else:
        body = {k: (task if v == T else v) for k, v in body.items()}
        code, answer = send(live, "POST", BASE + path, body)
    assert code == 400, answer
    assert answer["error"]
    if field:
        assert answer["field"] == field and f"'{field}'" in answer["error"], answer
    else:
        assert "JSON" in answer["error"]
    assert Http(live).status(task, 0, "shard-worker") == "new"


TRAVERSAL = ["../etc/passwd", "..", "a..b", "a/b", "a\\b", "/abs", "a b", "", "x" * 65, "é", "a\x00b", "~root",
             "..%2F..%2Fetc", "a;rm -rf", "20250101000000.event-ingest.txt/..", "20250101000000\n", "\n"]


@pytest.mark.parametrize("name", TRAVERSAL, ids=range(len(TRAVERSAL)))
def test_unsafe_file_names_are_refused(live, name):
    for path, body in (("/files/register", {"filename": name}),
                       ("/stages/event-ingest/done", {"filename": name}),
                       ("/stages/shard-splitter/start", {"filename": name, "shard": 0})):
        code, answer = send(live, "POST", BASE + path, body)
        assert code == 400 and answer["field"] == "filename", (path, answer)
        assert "no '..'" in answer["error"]
    quoted = requests.utils.quote(name, safe="")
    if quoted:
        code, answer = send(live, "GET", f"{BASE}/files/{quoted}")
        assert code == 404 and answer["error"]


def test_body_over_64_kib_is_413(live, task):
    filler = "x" * (64 * 1024)
    code, answer = send(live, "POST", BASE + "/stages/shard-worker/fail",
                        {"filename": task, "shard": 0, "error": filler})
    assert code == 413 and "65536" in answer["error"], answer

    def chunks():  # no Content-Length: the server must still stop reading at the limit
        yield b'{"filename": "%s", "shard": 0, "error": "' % task.encode()
        for _ in range(100):
            yield b"y" * 1024
        yield b'"}'
    resp = requests.post(f"http://127.0.0.1:{live.port}{BASE}/stages/shard-worker/fail", data=chunks(), timeout=30)
    assert resp.status_code == 413
    assert Http(live).status(task, 0, "shard-worker") == "new"
    # just under the limit is fine (the error text is cut to 2000 characters)
    http = Http(live)
    other = http.registered()
    code, answer = send(live, "POST", BASE + "/stages/shard-splitter/fail",
                        {"filename": other, "shard": 1, "error": "z" * 60000})
    assert code == 200 and answer["status"] == "failed"
    assert len(http.ok("GET", f"/files/{other}")["shards"][1]["last_error"]) == 2000


def test_stats_too_deep_or_too_big_once_encoded_are_400(live, task):
    deep = {}
    node = deep
    for _ in range(300):
        node["a"] = {}
        node = node["a"]
    code, answer = send(live, "POST", BASE + "/stages/shard-worker/done", {"filename": task, "shard": 0, "stats": deep})
    assert code == 400 and answer["field"] == "stats"
    raw = b'{"filename": "%s", "shard": 0, "stats": {%s}}' % (
        task.encode(), b",".join(b'"k%d": 1e5' % i for i in range(4000)))
    assert len(raw) < 64 * 1024
    code, answer = send(live, "POST", BASE + "/stages/shard-worker/done", raw=raw)
    assert code == 400 and answer["field"] == "stats"


@pytest.mark.parametrize("method,path", [
    ("POST", "/stages/nope/start"), ("POST", "/stages/shard-worker/explode"), ("POST", "/stages/event-ingest/start"),
    ("POST", "/stages/event-ingest/fail"), ("POST", "/queues/event-ingest/claim"), ("POST", "/queues/nope/claim"),
    ("GET", "/queues/nope"), ("GET", "/queues/event-ingest"), ("GET", "/tasks/nope"), ("GET", "/nothing/here"),
    ("GET", "/stages"), ("POST", "/files"), ("GET", "/metrics/nope")])
def test_unknown_stage_transition_or_route_is_404(live, method, path):
    code, answer = send(live, method, BASE + path, {"filename": new_name(), "shard": 0, "worker": "w"})
    assert code == 404 and answer["error"], answer


@pytest.mark.parametrize("method,path", [
    ("GET", "/stages/shard-worker/done"), ("PUT", "/files/register"), ("DELETE", "/queues/shard-worker"),
    ("GET", "/queues/shard-worker/claim"), ("POST", "/metrics/summary"), ("PATCH", "/files/x"),
    ("POST", "/tasks/shard-worker"), ("DELETE", "/files/x")])
def test_wrong_method_is_405(live, method, path):
    code, answer = send(live, method, BASE + path)
    assert code == 405 and method in answer["error"], answer


@pytest.mark.parametrize("path,params,field", [
    ("/queues/shard-worker", {"limit": 0}, "limit"), ("/queues/shard-worker", {"limit": 1001}, "limit"),
    ("/queues/shard-worker", {"limit": "ten"}, "limit"), ("/queues/shard-worker", {"offset": -1}, "offset"),
    ("/queues/shard-worker", {"shard": 2}, "shard"), ("/queues/shard-worker", {"shard": "x"}, "shard"),
    ("/tasks/shard-worker", {"status": "bogus"}, "status"), ("/tasks/shard-worker", {"shard": -1}, "shard"),
    ("/metrics/throughput", {"minutes": 0}, "minutes"), ("/metrics/throughput", {"minutes": "9" * 3000}, "minutes")])
def test_bad_query_parameter_is_400_naming_it(live, path, params, field):
    code, answer = send(live, "GET", BASE + path, params=params)
    assert code == 400 and answer["field"] == field, answer


# -- property-based: whatever arrives, no 5xx -----------------------------------------------------

FIELDS = ["filename", "shard", "shards", "worker", "error", "events", "stats", "all", "limit"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=80),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)
bodies = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), json_values, max_size=6),
    st.fixed_dictionaries({"filename": st.sampled_from(["20250101000000", "x", "..", ""]) | st.text(max_size=70),
                           "shard": st.integers(-3, 5) | json_values},
                          optional={"worker": json_values | st.text(max_size=130), "error": json_values,
                                    "events": json_values, "stats": json_values, "all": json_values}),
    json_values,
    st.binary(max_size=200),
)
segments = st.sampled_from(["event-ingest", "shard-splitter", "shard-worker", "mysql-sender", "start", "done",
                            "fail", "retry", "release", "rewind", "heartbeat", "claim", "20250101000000"]) | \
    st.text(min_size=1, max_size=20)
paths = st.one_of(
    st.builds(lambda s, a: f"/stages/{s}/{a}", segments, segments),
    st.builds(lambda s: f"/queues/{s}/claim", segments),
    st.builds(lambda s: f"/queues/{s}", segments),
    st.builds(lambda s: f"/tasks/{s}", segments),
    st.builds(lambda s: f"/files/{s}", segments),
    st.sampled_from(["/files/register", "/metrics/summary", "/metrics/throughput", "/health", "/ready"]),
)
queries = st.dictionaries(st.sampled_from(["limit", "offset", "shard", "status", "minutes"]) | st.text(max_size=5),
                          st.text(max_size=12) | st.integers(-10, 2000).map(str), max_size=3)


@pytest.fixture(scope="module")
def known_file(live):
    """Random requests naming this file reach the state machine, not only the 404 path."""
    http = Http(live)
    http.ok("POST", "/files/register", {"filename": "20250101000000"})
    http.ok("POST", "/stages/event-ingest/done", {"filename": "20250101000000"})


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["GET", "POST", "POST", "POST", "PUT", "DELETE"]), path=paths, body=bodies,
       query=queries)
def test_random_requests_never_get_a_5xx(live, known_file, method, path, body, query):
    url = f"http://127.0.0.1:{live.port}{BASE}{requests.utils.quote(path, safe='/')}"
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = requests.request(method, url, params=query, data=data if method != "GET" else None, timeout=30)
    assert resp.status_code < 500, (method, path, body, query, resp.status_code, resp.text[:300])
    answer = resp.json()
    if resp.status_code >= 400:
        assert isinstance(answer.get("error"), str) and answer["error"]


# -- the OpenAPI file ------------------------------------------------------------------------------

def app_routes() -> set[tuple[str, str]]:
    api = apid.Api(Settings.from_env({"MYSQL_PIPELINE_URL": "mysql://root:@127.0.0.1:3306/unused"}))
    return {(route.method.lower(), re.sub(r"<(\w+)(?::[^>]*)?>", r"{\1}", route.rule)) for route in api.app.routes}


def test_openapi_describes_every_route_and_no_other():
    spec = yaml.safe_load(OPENAPI.read_text())
    assert spec["openapi"].startswith("3.")
    documented = {(method, path) for path, item in spec["paths"].items() for method in item
                  if method in ("get", "post", "put", "delete", "patch")}
    served = app_routes()
    assert served - documented == set(), "routes missing from docs/openapi.yaml"
    assert documented - served == set(), "docs/openapi.yaml describes routes the app does not serve"
    for path, item in spec["paths"].items():
        for method, op in item.items():
            params = {p["name"] for p in op.get("parameters", []) if "$ref" not in p} | {
                p["$ref"].rsplit("/", 1)[1].lower().replace("workstage", "stage")
                for p in op.get("parameters", []) if "$ref" in p}
            assert set(re.findall(r"{(\w+)}", path)) <= params, (method, path)
            assert "200" in op["responses"], (method, path)


def test_every_route_has_a_curl_example_in_the_docs():
    doc = (ROOT / "docs" / "pipeline-apid.md").read_text()
    spec = yaml.safe_load(OPENAPI.read_text())
    for path, item in spec["paths"].items():
        pattern = re.escape(path.replace("/api/v1/pipeline", "")).replace(r"\{", "{").replace(r"\}", "}")
        pattern = re.sub(r"{\w+}", r"[^ \"'?]+", pattern)
        assert re.search(r"curl[^\n]*" + pattern, doc), f"no curl example for {path} in docs/pipeline-apid.md"
    for code in (400, 401, 404, 405, 409, 413, 503):
        assert f"| {code} " in doc, f"error code {code} is not documented"


def test_the_api_logged_no_unhandled_error(live):
    """Runs after the tests above in this module: none of their requests hit the 500 path."""
    assert "unhandled error" not in live.process.output()
    assert "Traceback" not in live.process.output()
