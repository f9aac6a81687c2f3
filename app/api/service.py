"""pipeline-apid: the HTTP API over the tracking table, served by gunicorn (threads).

`python -m app.apid` serves `/api/v1/pipeline` on PIPELINE_API_HOST:PIPELINE_API_PORT.
Routes only validate and translate; the rules live in the tracker (`tracking.py` and its parts),
whose refusals (errors.py) this module turns into HTTP codes.
"""
from __future__ import annotations

import hmac
import logging
import re
import select
import socket
import threading
import time
import traceback
from typing import Any

import bottle
import orjson
import pymysql

from .. import db
from ..config import Settings, check_api_exposure, is_loopback
from ..logs import setup_logging
from ..stages import FIRST, ORDERED, PER_SHARD, STAGES, STATUSES, TRANSITIONS, WORK_STAGES, Action, Stage, Status
from . import errors, metrics, retention, schema, tracking, wakeup
from .rejected import RejectedRoutes

BASE = "/api/v1/pipeline"
MAX_BODY = 64 * 1024
MAX_OFFSET = 10_000    # rows a listing may skip; deeper pages use after= (keyset)
MAX_STATS = 32 * 1024  # pipeline_transitions.stats is a TEXT (64 KiB)
MAX_WAIT = 30.0        # seconds a long-poll claim may wait
MAX_BATCH = 100        # tasks one batch `done` may report
FILENAME = re.compile(r"^[0-9A-Za-z_.-]{1,64}$")
log = logging.getLogger("pipeline-apid")
# The tracker's refusals as HTTP answers (any other TaskError: 400).
HTTP_STATUS = {errors.NotFound: 404, errors.Conflict: 409}


class BadRequest(Exception):
    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class HttpError(Exception):
    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status, self.body = status, {"error": message, **extra}


class Text(bytes):
    """An answer that is not JSON (the Prometheus text format)."""

    def __new__(cls, data: bytes, content_type: str):
        obj = super().__new__(cls, data)
        obj.content_type = content_type
        return obj


# -- validation ---------------------------------------------------------------------------

def _filename(value: Any, field: str = "filename") -> str:
    if not isinstance(value, str):
        raise BadRequest(f"'{field}' must be a string", field)
    if not FILENAME.fullmatch(value) or ".." in value:
        raise BadRequest(f"'{field}' must match ^[0-9A-Za-z_.-]{{1,64}}$ and contain no '..' "
                         f"(it becomes a file name), got {value[:80]!r}", field)
    return value


def _int(value: Any, field: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"'{field}' must be an integer, got {type(value).__name__}", field)
    if not lo <= value <= hi:
        raise BadRequest(f"'{field}' must be in [{lo}, {hi}], got {value}", field)
    return value


def _text(value: Any, field: str, max_len: int, required: bool = False) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value):
        raise BadRequest(f"'{field}' must be a {'non-empty ' if required else ''}string", field)
    if len(value) > max_len:
        raise BadRequest(f"'{field}' is longer than {max_len} characters", field)
    return value


def _query_int(name: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = bottle.request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"query parameter '{name}' must be an integer, got {raw[:40]!r}", name) from None
    if not lo <= value <= hi:
        raise BadRequest(f"query parameter '{name}' must be in [{lo}, {hi}], got {value}", name)
    return value


def _page() -> tuple[int, int | None]:
    """(offset, after) of a listing. An offset costs the rows it skips, so it is capped; deeper
    pages are reached with `after=<next_after of the previous page>` (keyset paging), which
    costs the same at any depth."""
    raw = bottle.request.query.get("offset")
    if raw not in (None, "") and raw.strip().isdigit() and int(raw) > MAX_OFFSET:
        raise BadRequest(f"query parameter 'offset' must be at most {MAX_OFFSET}: page deeper with "
                         f"after=<next_after of the previous page>", "offset")
    offset = _query_int("offset", 0, 0, MAX_OFFSET)
    after = _query_int("after", None, 0, 2**63 - 1)
    if after is not None and offset:
        raise BadRequest("give 'offset' or 'after', not both", "after")
    return offset, after


def _query_seconds(name: str, most: float) -> float:
    """A number of seconds in [0, most] from the query string (0 when absent)."""
    raw = bottle.request.query.get(name)
    if raw is None or raw == "":
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"query parameter '{name}' must be a number of seconds, got {raw[:40]!r}", name) from None
    if not 0 <= value <= most:
        raise BadRequest(f"query parameter '{name}' must be in [0, {most:g}], got {raw[:40]}", name)
    return value


def _caller_gone() -> bool:
    """Whether the client closed its connection while its claim waited (a stopped daemon):
    claiming for it then would only leave tasks started until their lease ran out."""
    sock = bottle.request.environ.get("gunicorn.socket")
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        # Readable: a closed connection (reads b"") or the client's next request (pipelined).
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


def _body() -> dict:
    """The JSON object of a POST. Read straight from the server's input stream with a cap
    (bottle's `request.body` would first spool any size of chunked body to a file)."""
    length = bottle.request.content_length
    if length > MAX_BODY:
        raise HttpError(413, f"request body is larger than {MAX_BODY} bytes")
    stream = bottle.request.environ["wsgi.input"]
    raw = stream.read(length) if length >= 0 else stream.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise HttpError(413, f"request body is larger than {MAX_BODY} bytes")
    if not raw.strip():
        raise BadRequest("request body must be a JSON object")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    return data


def _required(data: dict, field: str) -> Any:
    if data.get(field) is None:
        raise BadRequest(f"'{field}' is required", field)
    return data[field]


def _stats(value: Any) -> dict | None:
    """Per-file counts: a JSON object that fits the history column once re-encoded."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadRequest("'stats' must be a JSON object", "stats")
    try:
        size = len(orjson.dumps(value))
    except orjson.JSONEncodeError:
        raise BadRequest("'stats' is nested too deeply", "stats") from None
    if size > MAX_STATS:
        raise BadRequest(f"'stats' is larger than {MAX_STATS} bytes once encoded", "stats")
    return value


# -- the application ----------------------------------------------------------------------

class Api:
    """The bottle app and what it needs: settings, per-thread connections, the tracker."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.conns = db.ThreadConnections(settings.pipeline_db, multi_statements=True)
        self.tracker = tracking.Tracker(self.conns, settings.shard_count, settings.lease_seconds,
                                        settings.max_attempts)
        self.metrics = metrics.Metrics(self.tracker.store)
        self.watch = wakeup.ReadyWatch(lambda: self.tracker.store.read(wakeup.SQL_WATCH),
                                       settings.api_wait_poll, on_error=self.conns.discard)
        self._last_reap = 0.0
        self.app = bottle.Bottle()
        self.app.default_error_handler = self._bottle_error
        self._routes()

    # -- plumbing ---------------------------------------------------------------------------

    def ensure_schema(self) -> None:
        self.tracker.schema.ensure()

    def _respond(self, status: int, body: Any) -> bytes:
        bottle.response.status = status
        if isinstance(body, Text):
            bottle.response.content_type = body.content_type
            return bytes(body)
        bottle.response.content_type = "application/json"
        return orjson.dumps(body)

    def _bottle_error(self, err: bottle.HTTPError) -> bytes:
        bottle.response.content_type = "application/json"
        message = {404: "no such route", 405: f"method {bottle.request.method} not allowed here"}.get(
            err.status_code, str(err.body or err.status_line))
        return orjson.dumps({"error": message, "path": bottle.request.path[:200]})

    def _token_given(self) -> bool:
        """Whether the request carries the configured token (never without one configured)."""
        token = self.settings.api_token
        if not token:
            return False
        header = bottle.request.get_header("Authorization", "")
        return header.startswith("Bearer ") and hmac.compare_digest(header[7:].encode(), token.encode())

    def _authorised(self) -> bool:
        if not self.settings.api_token or bottle.request.method != "POST":
            return True
        return self._token_given()

    def _unavailable(self, status: int, public: str, exc: BaseException, **extra: Any) -> bytes:
        """An error about the database: the server's own text (which names the database user,
        host and name) only to a caller holding the token; others read the log."""
        detail = f"{public}: {exc}" if self._token_given() else f"{public} (details in the pipeline-apid log)"
        return self._respond(status, {"error": detail, **extra})

    def endpoint(self, fn, needs_db: bool = True):
        def handler(*args, **kwargs):
            try:
                if not self._authorised():
                    bottle.response.set_header("WWW-Authenticate", 'Bearer realm="pipeline"')
                    return self._respond(401, {"error": "missing or wrong 'Authorization: Bearer <token>'"})
                if needs_db:
                    self.ensure_schema()
                status, body = fn(*args, **kwargs)
                return self._respond(status, body)
            except BadRequest as exc:
                return self._respond(400, {"error": str(exc), **({"field": exc.field} if exc.field else {})})
            except HttpError as exc:
                return self._respond(exc.status, exc.body)
            except errors.TaskError as exc:
                return self._respond(HTTP_STATUS.get(type(exc), 400), exc.body)
            except db.MigrationLockTimeout as exc:
                log.warning("database schema: %s", exc)
                return self._unavailable(503, "database schema being migrated", exc, retry=True)
            except db.MigrationError as exc:
                log.error("database schema: %s", exc)
                return self._unavailable(500, "database schema", exc)
            except errors.SchemaMissing as exc:
                self.tracker.schema.lost()
                log.warning("tracking schema missing (%s); it is installed again on the next request", exc)
                return self._unavailable(503, "tracking schema missing; reinstalling", exc, retry=True)
            except db.UNAVAILABLE as exc:
                code = exc.args[0] if exc.args else None
                if code in db.DEADLOCK_CODES:
                    return self._respond(503, {"error": "database busy (lock contention); retry", "retry": True})
                self.conns.discard()
                log.warning("database unavailable: %s", exc)
                return self._unavailable(503, "database unavailable", exc, retry=True)
            except Exception:  # a bug; say so without leaking more than the class
                self.conns.discard()
                log.error("unhandled error on %s %s\n%s", bottle.request.method, bottle.request.path,
                          traceback.format_exc())
                return self._respond(500, {"error": "internal error; see the pipeline-apid log"})
        return handler

    def _stage(self, stage: str, allow_ingest: bool = False) -> Stage:
        allowed = STAGES if allow_ingest else WORK_STAGES
        if stage not in allowed:
            raise HttpError(404, f"unknown stage {stage[:40]!r}; expected one of {', '.join(allowed)}")
        return Stage(stage)

    def _shard(self, value: Any, field: str = "shard") -> int:
        return _int(value, field, 0, self.settings.shard_count - 1)

    def _query_shard(self) -> int | None:
        return _query_int("shard", None, 0, self.settings.shard_count - 1)

    # -- routes -------------------------------------------------------------------------------

    def _routes(self) -> None:
        a, route = self.app, self.endpoint
        a.route("/health", "GET", route(self.health, needs_db=False))
        a.route("/ready", "GET", route(self.ready, needs_db=False))
        a.route(f"{BASE}/health", "GET", route(self.health, needs_db=False))
        a.route(f"{BASE}/ready", "GET", route(self.ready, needs_db=False))
        a.route(f"{BASE}/files/register", "POST", route(self.register))
        a.route(f"{BASE}/files/<filename>", "GET", route(self.file))
        a.route(f"{BASE}/stages/<stage>/done-batch", "POST", route(self.done_batch))
        a.route(f"{BASE}/stages/<stage>/<action>", "POST", route(self.stage_action))
        a.route(f"{BASE}/queues/<stage>", "GET", route(self.queue))
        a.route(f"{BASE}/queues/<stage>/claim", "POST", route(self.claim))
        a.route(f"{BASE}/tasks/<stage>", "GET", route(self.tasks))
        a.route(f"{BASE}/metrics/summary", "GET", route(self.summary))
        a.route(f"{BASE}/metrics/throughput", "GET", route(self.throughput))
        a.route(f"{BASE}/hosts", "GET", route(self.hosts))
        RejectedRoutes(self).install(a, BASE)
        a.route("/metrics", "GET", route(self.prometheus))

    def health(self):
        return 200, {"status": "ok"}

    def ready(self):
        """Ready or not, for anyone (a load balancer's probe); why, and which database, only to
        a caller holding the token (the log says it too)."""
        detail = self._token_given()
        try:
            self.ensure_schema()
            tables = self.tracker.schema.present()
        except db.UNAVAILABLE as exc:
            self.conns.discard()
            log.warning("not ready: database %s unreachable: %s", self.settings.pipeline_db, exc)
            return 503, {"status": "unavailable", **({"error": f"database unreachable: {exc}"} if detail else {})}
        if len(tables) < len(schema.TABLES):
            log.warning("not ready: tracking schema missing (tables: %s)", tables)
            return 503, {"status": "unavailable", **({"error": "schema missing", "tables": tables} if detail else {})}
        return 200, {"status": "ready", **({"database": str(self.settings.pipeline_db)} if detail else {})}

    def register(self):
        data = _body()
        filename = _filename(_required(data, "filename"))
        shards = data.get("shards", list(range(self.settings.shard_count)))
        if not isinstance(shards, list) or not shards:
            raise BadRequest("'shards' must be a non-empty list of shard numbers", "shards")
        shards = sorted({self._shard(s, "shards") for s in shards})
        done = data.get(Status.DONE, False)   # the file is complete: its ingest status is done
        if not isinstance(done, bool):
            raise BadRequest(f"'{Status.DONE}' must be true or false", Status.DONE)
        if not done:
            return 200, self.tracker.register(filename, shards)
        # `done`: the file is complete; mark event-ingest done too (one request and transaction
        # where an importer made two), answered with `updated_rows` as that `done` would be.
        events = data.get("events")
        result = self.tracker.register(filename, shards, True, _text(data.get("worker"), "worker", 128),
                                       None if events is None else _int(events, "events", 0, 2**31 - 1))
        if result["updated_rows"]:
            self.watch.hint(STAGES[1], None)
        return 200, result

    def stage_action(self, stage: str, action: str):
        if stage == FIRST and action != Action.DONE:
            raise HttpError(404, f"{FIRST} has no transition {action[:40]!r}: it is started by "
                                 f"POST {BASE}/files/register and finished by .../stages/{FIRST}/{Action.DONE}")
        if stage == FIRST:
            data = _body()
            events = data.get("events")
            result = self.tracker.ingest_done(
                _filename(_required(data, "filename")), _text(data.get("worker"), "worker", 128),
                None if events is None else _int(events, "events", 0, 2**31 - 1))
            if result["updated_rows"]:
                self.watch.hint(STAGES[1], None)
            return 200, result
        stage = self._stage(stage)
        if action not in (*TRANSITIONS, Action.HEARTBEAT):
            raise HttpError(404, f"unknown transition {action[:40]!r}; expected one of "
                                 f"{', '.join((*TRANSITIONS, Action.HEARTBEAT))}")
        action = Action(action)
        data = _body()
        if action == Action.RETRY and data.get("all") is not None:
            if data["all"] is not True:
                raise BadRequest("'all' must be true when given", "all")
            shard = None if data.get("shard") is None else self._shard(data["shard"])
            return 200, self.tracker.retry_all(stage, shard, _text(data.get("worker"), "worker", 128))
        filename = _filename(_required(data, "filename"))
        shard = self._shard(_required(data, "shard"))
        if action == Action.HEARTBEAT:
            owner = _text(_required(data, "worker"), "worker", 128, required=True)
            return 200, self.tracker.heartbeat(stage, filename, shard, owner)
        stats = _stats(data.get("stats"))
        events = data.get("events")
        events = None if events is None else _int(events, "events", 0, 2**31 - 1)
        error = data.get("error")
        if error is not None and not isinstance(error, str):
            raise BadRequest("'error' must be a string", "error")
        owner = _text(data.get("worker"), "worker", 128)
        then = self._then_claim(stage, data, owner) if action == Action.DONE else None
        if then is not None:
            self._reap_now_and_then()
            seen = self.watch.generation
            got = self.tracker.done_and_claim(stage, [(filename, shard, events, stats)], owner, *then)
            if got is not None:
                self._hint(stage, action, shard)
                return 200, {**got[0][0].as_dict(), "next": self._claim(stage, *then, owner, self._wait(),
                                                                        (seen, got[1]))}
        moved = self.tracker.transition(
            stage, action, filename, shard, owner=owner,
            error=None if error is None else error[:schema.ERROR_MAX], events=events, stats=stats)
        if moved.changed:
            self._hint(stage, action, shard)
        if then is not None:
            return 200, {**moved.as_dict(), "next": self._claim(stage, *then, owner, self._wait())}
        return 200, moved.as_dict()

    @staticmethod
    def _wait() -> float:
        """A `done`'s `?wait=`: its claim, finding nothing, waits as a long-poll claim would."""
        return _query_seconds("wait", MAX_WAIT)

    def _then_claim(self, stage: Stage, data: dict, owner: str | None) -> tuple[int, int | None] | None:
        """A `done`'s optional `claim` ({"limit": n, "shard": s}, the claim endpoint's fields):
        the caller's next claim, made in the same request (and, when the `done` is a first one,
        the same transaction); its tasks are answered as `next`."""
        spec = data.get("claim")
        if spec is None:
            return None
        if not isinstance(spec, dict):
            raise BadRequest("'claim' must be an object such as {\"limit\": 1, \"shard\": 0}", "claim")
        if owner is None:
            raise BadRequest("'worker' is required with 'claim' (the tasks are claimed for it)", "worker")
        limit = _int(spec.get("limit", 1), "claim.limit", 1, 1000)
        shard = None if spec.get("shard") is None else self._shard(spec["shard"], "claim.shard")
        if stage in ORDERED and shard is None:
            raise BadRequest(f"{stage} takes each shard's files in order: 'claim.shard' is required", "claim.shard")
        return limit, shard

    def _hint(self, stage: Stage, action: Action, shard: int | None) -> None:
        """Wake this process's waiters that the change may have given work: a `done` readies
        the next stage (and frees an ordered stage's shard); a task sent back readies its own
        stage (a rewind also the one before)."""
        following = STAGES[STAGES.index(stage) + 1] if stage != STAGES[-1] else None
        if action == Action.DONE:
            woken = (following, stage if stage in ORDERED else None)
        else:
            woken = (stage, stage.previous if action == Action.REWIND else None)
        for s in woken:
            if s in WORK_STAGES:
                self.watch.hint(s, shard)

    def done_batch(self, stage: str):
        """`done` of several tasks in one request: each answered as its own `done` would be
        (the moved task, or its refusal), in the order given. When all are first `done`s of a
        named worker they share one transaction (and the optional `claim`'s, see `_then_claim`)."""
        stage = self._stage(stage)
        data = _body()
        items = data.get("items")
        if not isinstance(items, list) or not 1 <= len(items) <= MAX_BATCH:
            raise BadRequest(f"'items' must be a list of 1 to {MAX_BATCH} tasks", "items")
        owner = _text(data.get("worker"), "worker", 128)
        tasks = []
        for item in items:
            if not isinstance(item, dict):
                raise BadRequest("each of 'items' must be an object", "items")
            events = item.get("events")
            tasks.append((_filename(_required(item, "filename")), self._shard(_required(item, "shard")),
                          None if events is None else _int(events, "events", 0, 2**31 - 1), _stats(item.get("stats"))))
        then = self._then_claim(stage, data, owner)
        if then is not None:
            self._reap_now_and_then()
        seen = self.watch.generation
        got = self.tracker.done_and_claim(stage, tasks, owner, *(then or (0, None))) if owner else None
        if got is not None:
            for moved in got[0]:
                self._hint(stage, Action.DONE, moved.shard)
            answer = {"stage": stage, "items": [{"status_code": 200, **m.as_dict()} for m in got[0]]}
            if then is None:
                return 200, answer
            return 200, {**answer, "next": self._claim(stage, *then, owner, self._wait(), (seen, got[1]))}
        out = []
        for filename, shard, events, stats in tasks:
            try:
                moved = self.tracker.transition(stage, Action.DONE, filename, shard, owner=owner, events=events,
                                                stats=stats)
            except errors.TaskError as exc:
                out.append({"status_code": HTTP_STATUS.get(type(exc), 400), **exc.body})
                continue
            if moved.changed:
                self._hint(stage, Action.DONE, shard)
            out.append({"status_code": 200, **moved.as_dict()})
        if then is not None:
            return 200, {"stage": stage, "items": out, "next": self._claim(stage, *then, owner, self._wait())}
        return 200, {"stage": stage, "items": out}

    def claim(self, stage: str):
        stage = self._stage(stage)
        data = _body()
        limit = _int(data.get("limit", 1), "limit", 1, 1000)
        shard = None if data.get("shard") is None else self._shard(data["shard"])
        owner = _text(_required(data, "worker"), "worker", 128, required=True)
        if stage in ORDERED and shard is None:
            raise BadRequest(f"{stage} takes each shard's files in order: 'shard' is required", "shard")
        items = self._claim(stage, limit, shard, owner, _query_seconds("wait", MAX_WAIT))
        return 200, {"stage": stage, "worker": owner, "items": items}

    def _claim(self, stage: Stage, limit: int, shard: int | None, owner: str, wait: float,
               found: tuple[int, list[dict]] | None = None) -> list[dict]:
        """A claim, held up to `wait` seconds while it finds nothing (a long poll). `found`:
        (the watch's generation before it, the items) of a claim already made (a `done`'s)."""
        deadline = time.monotonic() + wait
        seen, items = found if found is not None else (0, None)
        ask_first = True  # the first claim from here asks one read first (see Leases.may_claim)
        while True:
            if items is None:
                seen = self.watch.generation
                if wait > 0 and self.watch.idle(stage, shard):
                    items = []   # nothing ready, nothing started: no need to ask the database
                elif wait > 0 and ask_first and not self.tracker.may_claim(stage, shard, owner):
                    items = []   # one read said so (a long poll, mostly after a `done` that claimed nothing)
                else:
                    self._reap_now_and_then()
                    items = self.tracker.claim(stage, limit, shard, owner)
                ask_first = False
            if items:
                return self._linger(stage, limit, shard, owner, items, deadline)
            if wait <= 0 or not self.watch.wait(stage, shard, seen, deadline) or _caller_gone():
                return items
            items = None

    def _linger(self, stage: Stage, limit: int, shard: int | None, owner: str, items: list[dict],
                deadline: float) -> list[dict]:
        """A per-shard claim that got fewer tasks than its limit while the previous stage still
        works on the shard's files tops itself up with those that become ready within
        CLAIM_LINGER_SECONDS (never past the request's own wait): a daemon that keeps up would
        otherwise take its files one or two at a time, a request and a transaction each. What it
        holds is claimed already; a lone file (nothing started upstream) returns at once."""
        linger = self.settings.claim_linger
        if linger <= 0 or len(items) >= limit or shard is None or stage not in PER_SHARD:
            return items
        end = min(time.monotonic() + linger, deadline)
        held = {(r["filename"], r["shard"]) for r in items}
        try:
            while len(items) < limit and time.monotonic() < end:
                seen = self.watch.generation
                ready, upstream = self.tracker.upstream(stage, shard)
                if not ready and not upstream:
                    break
                if not ready and not self.watch.wait(stage, shard, seen, end):
                    # No news here (another API process may have made it ready): one last look.
                    if not self.tracker.upstream(stage, shard)[0]:
                        break
                more = [r for r in self.tracker.claim(stage, limit, shard, owner)
                        if (r["filename"], r["shard"]) not in held]
                if not more:
                    break
                items = items + more
                held.update((r["filename"], r["shard"]) for r in more)
        except db.UNAVAILABLE as exc:
            # What is claimed (and a done's commit) stands: hand it over rather than answer 503.
            if (exc.args[0] if exc.args else None) not in db.DEADLOCK_CODES:
                self.conns.discard()
            log.warning("claim linger cut short: %s", exc)
        return items

    def queue(self, stage: str):
        stage = self._stage(stage)
        offset, after = _page()
        return 200, self.tracker.queue(stage, _query_int("limit", 100, 1, 1000), offset, self._query_shard(), after)

    def tasks(self, stage: str):
        stage = self._stage(stage, allow_ingest=True)
        status = bottle.request.query.get("status") or Status.FAILED
        if status not in STATUSES:
            raise BadRequest(f"query parameter 'status' must be one of {', '.join(STATUSES)}", "status")
        offset, after = _page()
        return 200, self.tracker.tasks(stage, Status(status), self._query_shard(), _query_int("limit", 100, 1, 1000),
                                       offset, after)

    def file(self, filename: str):
        try:
            _filename(filename)
        except BadRequest as exc:
            raise HttpError(404, str(exc)) from None
        return 200, self.tracker.file(filename)

    def summary(self):
        return 200, self.tracker.summary()

    def prometheus(self):
        return 200, Text(self.metrics.render(), metrics.CONTENT_TYPE)

    def throughput(self):
        return 200, self.tracker.throughput(_query_int("minutes", 15, 1, 180))

    def hosts(self):
        return 200, self.tracker.hosts(_query_int("minutes", 5, 1, 180))

    # -- background -------------------------------------------------------------------------------

    def _reap_now_and_then(self) -> None:
        """Claims reap too (at most once a second per process), so an expired lease is
        noticed at the moment someone wants work, whatever the reaper thread's interval."""
        now = time.monotonic()
        if now - self._last_reap >= 1.0:
            self._last_reap = now
            try:
                self.tracker.reap()
            except pymysql.err.OperationalError as exc:
                if not exc.args or exc.args[0] not in db.DEADLOCK_CODES:
                    raise
                log.info("reaping skipped (lock contention); the reaper thread will do it")

    def start_reaper(self) -> None:
        def loop():
            while True:
                time.sleep(self.settings.reap_interval)
                try:
                    self.ensure_schema()
                    for item in self.tracker.reap():
                        log.warning("reaped %s shard %s at %s -> %s", item["filename"], item["shard"],
                                    item["stage"], item["status"])
                except Exception as exc:
                    self.conns.discard()
                    log.debug("reaper: %s", exc)
        threading.Thread(target=loop, name="reaper", daemon=True).start()
        threading.Thread(target=self._prune_loop, name="pruner", daemon=True).start()

    def _prune_loop(self) -> None:
        """pipeline_transitions past TRANSITIONS_WINDOW, deleted now and then (every minute, or
        a quarter of a short window); one process of all instances at a time (retention.py)."""
        pruning = retention.Retention(self.tracker.store, self.settings.transitions_window)
        every = min(60.0, max(self.settings.transitions_window / 4, 0.5))
        while True:
            time.sleep(every)
            try:
                self.ensure_schema()
                deleted = pruning.prune()
                if deleted:
                    log.info("pruned %d transitions older than %gs", deleted, self.settings.transitions_window)
            except Exception as exc:
                self.conns.discard()
                log.debug("pruner: %s", exc)


_APIS: list[Api] = []


def _stop_waiting() -> None:
    """The gunicorn process stops: long-poll claims answer now (with nothing)."""
    for api in _APIS:
        api.watch.close()


def create_app(settings: Settings | None = None, reaper: bool = True) -> bottle.Bottle:
    api = Api(settings or Settings.from_env())
    _APIS.append(api)
    if reaper:
        api.start_reaper()
    return api.app


LISTINGS = (f"{BASE}/queues/", f"{BASE}/tasks/", f"{BASE}/metrics/", f"{BASE}/hosts", f"{BASE}/rejected")
WAIT_QUERY = re.compile(r"(^|&)wait=(?!0*(\.0*)?(&|$))")


def is_waiting(method: str, path: str, query: str) -> bool:
    """A long-poll claim (a `wait=` above 0), or a `done` whose claim may wait: it may sleep,
    so on a lane of its own."""
    return method == "POST" and WAIT_QUERY.search(query) is not None and (
        (path.startswith(f"{BASE}/queues/") and path.endswith("/claim"))
        or (path.startswith(f"{BASE}/stages/") and path.endswith(("/done", "/done-batch"))))


def is_listing(method: str, path: str) -> bool:
    """Requests that may read many rows (the dashboard's, an operator's, a scraper's): they get
    their own threads, so however many arrive, claims, transitions and heartbeats never wait
    for them."""
    return method in ("GET", "HEAD") and (path.startswith(LISTINGS) or path == "/metrics")


def serve(settings: Settings, app_factory=None) -> None:
    """Run gunicorn (app/api/server.py's process class) with the production options;
    `app_factory(settings)` builds the WSGI app in each gunicorn process after fork (the
    benchmark's floor endpoint reuses these options)."""
    from gunicorn.app.base import BaseApplication

    from .server import BufferingProcess

    factory = app_factory or create_app
    BufferingProcess.configure(settings.api_request_timeout, MAX_BODY, settings.api_read_threads, is_listing,
                               settings.api_wait_threads, is_waiting, on_stop=_stop_waiting)

    class Server(BaseApplication):
        def load_config(self):
            options = {
                "bind": f"{settings.api_host}:{settings.api_port}",
                "workers": settings.api_processes,
                "worker_class": BufferingProcess,
                "threads": settings.api_threads,
                "worker_connections": 1000,
                "timeout": 30,
                "graceful_timeout": 10,
                "keepalive": 30,
                "backlog": 1024,
                "accesslog": None,
                "errorlog": "-",
                "loglevel": "warning",
                "proc_name": "pipeline-apid",
            }
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self):
            # Runs in each gunicorn process after fork: connections and the reaper thread are per process.
            return factory(settings)

    Server().run()


def main(argv: list[str] | None = None) -> None:
    settings = Settings.from_env()
    check_api_exposure(settings)
    setup_logging("pipeline-apid", None)
    if settings.api_token is None and not is_loopback(settings.api_host):
        log.warning("PIPELINE_API_INSECURE=1: listening on %s:%s with no token: anyone who can reach it can "
                    "register, fail, retry, rewind and claim tasks", settings.api_host, settings.api_port)
    try:
        db.migrations(schema.SCHEMA)  # the files first: a broken install stops here, database or not
        db.ensure_database(settings.pipeline_db)
        conn = db.connect(settings.pipeline_db)
        try:
            for migration in db.migrate(conn, schema.SCHEMA):
                log.info("database %s: migration %s applied", settings.pipeline_db, migration)
        finally:
            conn.close()
    except db.MigrationLockTimeout as exc:
        log.warning("%s; serving 503 until the schema is ready", exc)
    except db.MigrationError as exc:
        raise SystemExit(f"pipeline-apid: database schema: {exc}") from None
    except db.UNAVAILABLE as exc:
        log.warning("database %s not reachable yet (%s); serving 503 until it is", settings.pipeline_db, exc)
    log.info("pipeline-apid on http://%s:%s%s (gunicorn, %d processes x (%d + %d for listings) threads)",
                settings.api_host, settings.api_port, BASE, settings.api_processes, settings.api_threads,
                settings.api_read_threads)
    serve(settings)
