"""The daemons' client of pipeline-apid.

Every transition is idempotent on the server, so a call whose answer was lost can simply be
sent again; `PipelineClient` does that, backing off while the API or its database is down.
Its `worker` arguments are the API's JSON field of that name: the calling daemon's owner id
(`daemon.owner_id`, WORKER_ID).
"""
from __future__ import annotations

import http.client
import json
import logging
import threading
import time
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import requests
from requests.utils import requote_uri

from .shutdown import StopFlag
from .stages import FIRST, Action, Status

log = logging.getLogger("pipeline-client")


QUIET_SECONDS = 3.0


class ApiError(Exception):
    """A 4xx answer: the request itself was refused (conflict, validation, unknown task)."""

    def __init__(self, status: int, body: Any):
        self.status, self.body = status, body
        message = body.get("error") if isinstance(body, dict) else body
        super().__init__(f"HTTP {status}: {message}")


class ApiUnavailable(Exception):
    """The API could not be reached before the caller gave up (or was asked to stop)."""


@dataclass(frozen=True)
class Task:
    filename: str
    shard: int
    attempts: int = 0
    resumed: bool = False

    @property
    def key(self) -> tuple[str, int]:
        return self.filename, self.shard


def _tasks(items: list[dict] | None) -> list[Task] | None:
    if items is None:
        return None
    return [Task(i["filename"], i["shard"], i.get("attempts", 0), i.get("resumed", False)) for i in items]


def split_urls(base_url: str) -> list[str]:
    """PIPELINE_URL's instances: one URL, or several comma-separated (app/config.py)."""
    urls = [u.strip().rstrip("/") for u in base_url.split(",") if u.strip()]
    if not urls:
        raise ValueError(f"no API URL in {base_url!r}")
    return urls


class _Unreachable(Exception):
    """The request got no answer (refused, reset, timed out): try the next instance."""


class _Plain:
    """One instance reached over plain HTTP/1.1 with a kept-alive `http.client` connection per
    thread: the same request on the wire as `requests` sends, without its per-call cost
    (URL parsing, environment proxy and certificate lookups, hooks: about half of a
    small-file daemon's CPU went there). Only for an http:// URL that no proxy setting covers;
    anything else goes through `requests` (`_Session`), so https, REQUESTS_CA_BUNDLE and
    proxies behave as before."""

    def __init__(self, base: str, headers: dict[str, str]):
        parts = urlsplit(base)
        self.host, self.port = parts.hostname, parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.headers = {"Accept": "application/json", "User-Agent": requests.utils.default_user_agent(),
                        **headers}
        self._local = threading.local()

    def _connection(self, timeout: float) -> tuple[http.client.HTTPConnection, bool]:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
            return conn, False
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn, conn.sock is not None

    def close(self) -> None:
        conn, self._local.conn = getattr(self._local, "conn", None), None
        if conn is not None:
            conn.close()

    def request(self, method: str, path: str, body: bytes | None, query: str, timeout: float) -> tuple[int, bytes]:
        target = requote_uri(self.prefix + path + ("?" + query if query else ""))
        headers = self.headers if body is None else {**self.headers, "Content-Type": "application/json"}
        while True:
            conn, reused = self._connection(timeout)
            try:
                conn.request(method, target, body, headers)
                resp = conn.getresponse()
                data = resp.read()
                if resp.will_close:
                    self.close()
                return resp.status, data
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self.close()
                if reused:
                    continue  # the instance closed an idle kept-alive connection: once more on a new one
                raise _Unreachable(f"ConnectionError: {exc!r}") from exc
            except TimeoutError as exc:
                self.close()
                raise _Unreachable(f"Timeout: {exc!r}") from exc
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise _Unreachable(f"ConnectionError: {exc!r}") from exc
            except BaseException:
                self.close()  # half a response must not stay on a connection used again
                raise


class _Session:
    """One instance through `requests` (https, or a proxy from the environment applies)."""

    def __init__(self, session: requests.Session, base: str):
        self.session, self.base = session, base

    def request(self, method: str, path: str, body: bytes | None, query: str, timeout: float) -> tuple[int, bytes]:
        headers = None if body is None else {"Content-Type": "application/json"}
        try:
            resp = self.session.request(method, self.base + path + ("?" + query if query else ""), data=body,
                                        headers=headers, timeout=timeout)
            return resp.status_code, resp.content
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise _Unreachable(f"{type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        pass


def _transport(base: str, session: requests.Session, headers: dict[str, str]) -> "_Plain | _Session":
    parts = urlsplit(base)
    if parts.scheme == "http" and not parts.username and not parts.password:
        proxies = urllib.request.getproxies()
        if not (proxies.get("http") or proxies.get("all")) or urllib.request.proxy_bypass(parts.hostname or ""):
            return _Plain(base, headers)
    return _Session(session, base)


class PipelineClient:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 10.0,
                 stop: StopFlag | None = None, max_wait: float | None = None):
        """`base_url`: one API instance, or several comma-separated, tried in turn (failover);
        `max_wait`: give up after this many seconds of failures (None: until `stop` is set)."""
        self.bases = split_urls(base_url)
        self._current = 0
        self.timeout = timeout
        self.stop = stop
        self.max_wait = max_wait
        self.session = requests.Session()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.session.headers.update(headers)
        self._transports = [_transport(b, self.session, headers) for b in self.bases]

    @property
    def base(self) -> str:
        """The instance requests go to now: the last one that answered."""
        return self.bases[self._current]

    # -- transport -------------------------------------------------------------------------------

    def call(self, method: str, path: str, body: dict | None = None, params: dict | None = None,
             max_wait: float | None = -1.0, timeout: float | None = None) -> Any:
        """Send one request, to the current instance. One that cannot be reached or answers 5xx
        sends the same request to the next instance at once (every transition is idempotent,
        so a request the dead one may have applied does no harm); only when every instance has
        failed in a row does the caller back off, and give up after `max_wait`. `timeout`: of
        each attempt (default: the client's), longer for a long-poll claim."""
        max_wait = self.max_wait if max_wait == -1.0 else max_wait
        began = time.monotonic()
        deadline = None if max_wait is None else began + max_wait
        delay = 0.1
        failed_in_row = 0
        payload = None if body is None else json.dumps(body, allow_nan=False).encode()
        query = urlencode(params, doseq=True) if params else ""
        while True:
            base = self.bases[self._current]
            try:
                status, content = self._transports[self._current].request(method, path, payload, query,
                                                                          timeout or self.timeout)
                if status < 500:
                    data = json.loads(content) if content else None
                    if status >= 400:
                        raise ApiError(status, data)
                    return data
                problem = f"HTTP {status}: {content[:200].decode('utf-8', 'replace')}"
            except _Unreachable as exc:
                problem = str(exc)
            failed_in_row += 1
            if len(self.bases) > 1:
                self._current = (self._current + 1) % len(self.bases)
                if failed_in_row % len(self.bases):
                    log.warning("pipeline-apid at %s unavailable (%s); trying %s", base, problem,
                                self.bases[self._current])
                    continue
            if deadline is not None and time.monotonic() + delay > deadline:
                raise ApiUnavailable(f"{method} {path}: {problem}")
            if self.stop is not None and self.stop.is_set() and max_wait is None:
                raise ApiUnavailable(f"{method} {path}: {problem} (stopping)")
            # A blip shorter than QUIET_SECONDS (the API still binding at a clean start) is no warning.
            log.log(logging.WARNING if time.monotonic() - began >= QUIET_SECONDS else logging.INFO,
                    "pipeline-apid unavailable (%s); retrying in %.1fs", problem, delay)
            if self.stop is not None:
                self.stop.wait(delay)
            else:
                time.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _transition(self, stage: str, action: str, filename: str, shard: int, **extra: Any) -> dict:
        body = {"filename": filename, "shard": shard, **{k: v for k, v in extra.items() if v is not None}}
        return self.call("POST", f"/stages/{stage}/{action}", body)

    # -- the API -----------------------------------------------------------------------------------

    def register(self, filename: str, shards: list[int] | None = None, done: bool = False,
                 events: int | None = None, worker: str | None = None) -> dict:
        """`done`: the file is complete; event-ingest is marked done in the same request (an
        API older than the `done` field gets the ordinary `ingest_done` after)."""
        body: dict[str, Any] = {"filename": filename}
        if shards is not None:
            body["shards"] = shards
        if not done:
            return self.call("POST", "/files/register", body)
        body.update({Status.DONE: True, **{k: v for k, v in (("events", events), ("worker", worker)) if v is not None}})
        answer = self.call("POST", "/files/register", body)
        if "updated_rows" not in answer:
            answer["updated_rows"] = self.ingest_done(filename, events=events, worker=worker)["updated_rows"]
        return answer

    def ingest_done(self, filename: str, events: int | None = None, worker: str | None = None) -> dict:
        body = {"filename": filename, "events": events, "worker": worker}
        return self.call("POST", f"/stages/{FIRST}/{Action.DONE}", {k: v for k, v in body.items() if v is not None})

    def claim(self, stage: str, worker: str, limit: int = 1, shard: int | None = None,
              wait: float = 0.0) -> list[Task]:
        """`wait`: seconds the API may hold the request until a task is ready (a long poll)."""
        body: dict[str, Any] = {"limit": limit, "worker": worker}
        if shard is not None:
            body["shard"] = shard
        if wait > 0:
            items = self.call("POST", f"/queues/{stage}/claim", body, params={"wait": f"{wait:g}"},
                              timeout=self.timeout + wait)["items"]
        else:
            items = self.call("POST", f"/queues/{stage}/claim", body)["items"]
        return _tasks(items)

    def start(self, stage: str, filename: str, shard: int, worker: str | None = None) -> dict:
        return self._transition(stage, Action.START, filename, shard, worker=worker)

    def done(self, stage: str, filename: str, shard: int, worker: str | None = None,
             events: int | None = None, stats: dict | None = None) -> dict:
        return self._transition(stage, Action.DONE, filename, shard, worker=worker, events=events, stats=stats)

    def done_batch(self, stage: str, items: list[dict], worker: str | None = None) -> list[dict]:
        """`done` of several tasks in one request (`items`: filename, shard, events?, stats?);
        each answer has `status_code` (200, or the 4xx its own `done` would have had)."""
        return self.done_batch_and_claim(stage, items, worker)[0]

    def done_batch_and_claim(self, stage: str, items: list[dict], worker: str | None = None,
                             claim: dict | None = None, wait: float = 0.0) -> tuple[list[dict], list[Task] | None]:
        """`done_batch`, and with `claim` ({"limit": n, "shard": s}) the worker's next claim in
        the same request: (answers, the tasks claimed, or None when the API did not claim, as
        one older than the `claim` field does not). `wait`: as `claim`'s (a long poll)."""
        body: dict[str, Any] = {"items": [{k: v for k, v in i.items() if v is not None} for i in items]}
        if worker is not None:
            body["worker"] = worker
        if claim is not None:
            body["claim"] = claim
        answer = self.call("POST", f"/stages/{stage}/done-batch", body, **self._waiting(claim, wait))
        return answer["items"], _tasks(answer.get("next"))

    def done_and_claim(self, stage: str, filename: str, shard: int, worker: str, claim: dict,
                       events: int | None = None, stats: dict | None = None,
                       wait: float = 0.0) -> tuple[dict, list[Task] | None]:
        """`done`, then the worker's next claim ({"limit": n, "shard": s}) in the same request
        (and transaction): (the answer, the tasks claimed, or None when the API did not claim,
        as one older than the `claim` field does not). `wait`: as `claim`'s (a long poll)."""
        body = {"filename": filename, "shard": shard, "worker": worker, "claim": claim,
                **{k: v for k, v in (("events", events), ("stats", stats)) if v is not None}}
        answer = self.call("POST", f"/stages/{stage}/{Action.DONE}", body, **self._waiting(claim, wait))
        return answer, _tasks(answer.get("next"))

    def _waiting(self, claim: dict | None, wait: float) -> dict:
        """`call`'s arguments for a request whose claim may wait `wait` seconds."""
        if claim is None or wait <= 0:
            return {}
        return {"params": {"wait": f"{wait:g}"}, "timeout": self.timeout + wait}

    def fail(self, stage: str, filename: str, shard: int, error: str, worker: str | None = None,
             stats: dict | None = None) -> dict:
        return self._transition(stage, Action.FAIL, filename, shard, worker=worker, error=error, stats=stats)

    def release(self, stage: str, filename: str, shard: int, worker: str, reason: str | None = None) -> dict:
        return self._transition(stage, Action.RELEASE, filename, shard, worker=worker, error=reason)

    def rewind(self, stage: str, filename: str, shard: int, worker: str, reason: str) -> dict:
        return self._transition(stage, Action.REWIND, filename, shard, worker=worker, error=reason)

    def retry(self, stage: str, filename: str, shard: int) -> dict:
        return self._transition(stage, Action.RETRY, filename, shard)

    def retry_all(self, stage: str, shard: int | None = None) -> dict:
        body: dict[str, Any] = {"all": True}
        if shard is not None:
            body["shard"] = shard
        return self.call("POST", f"/stages/{stage}/{Action.RETRY}", body)

    def heartbeat(self, stage: str, filename: str, shard: int, worker: str) -> dict:
        return self._transition(stage, Action.HEARTBEAT, filename, shard, worker=worker)

    def queue(self, stage: str, limit: int = 100, offset: int = 0, shard: int | None = None) -> dict:
        params = {"limit": limit, "offset": offset, **({"shard": shard} if shard is not None else {})}
        return self.call("GET", f"/queues/{stage}", params=params)

    def tasks(self, stage: str, status: str, limit: int = 100, offset: int = 0, shard: int | None = None) -> dict:
        params = {"status": status, "limit": limit, "offset": offset,
                  **({"shard": shard} if shard is not None else {})}
        return self.call("GET", f"/tasks/{stage}", params=params)

    def file(self, filename: str) -> dict:
        return self.call("GET", f"/files/{filename}")

    def summary(self) -> dict:
        return self.call("GET", "/metrics/summary")

    def throughput(self, minutes: int = 15) -> dict:
        return self.call("GET", "/metrics/throughput", params={"minutes": minutes})

    def hosts(self, minutes: int = 5) -> dict:
        return self.call("GET", "/hosts", params={"minutes": minutes})
