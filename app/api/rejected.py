"""`GET /rejected`: the rejected lines (app/rejected.py's table), paged by keyset, by file,
reason, stage and shard. A listing: served on the read threads (service.is_listing)."""
from __future__ import annotations

import re
import threading

import bottle

from .. import db, rejected
from ..stages import Stage

STAGES = (Stage.SPLITTER.value, Stage.WORKER.value)   # the stages that reject lines
REASON = re.compile(r"^[a-z_]{1,64}$")


class RejectedRoutes:
    def __init__(self, api):
        self.api = api
        self._ready = False
        self._lock = threading.Lock()

    def install(self, app: bottle.Bottle, base: str) -> None:
        app.route(f"{base}/rejected", "GET", self.api.endpoint(self.listing))

    def _ensure_schema(self) -> None:
        """The table's migrations, once per process: the API may list before any stage wrote."""
        if self._ready:
            return
        with self._lock:
            if not self._ready:
                db.migrate(self.api.conns.get(), rejected.SCHEMA)
                self._ready = True

    def listing(self):
        from .service import BadRequest, _filename, _query_int, _page
        query = bottle.request.query
        filename = query.get("file") or query.get("filename") or None
        if filename is not None:
            filename = _filename(filename, "file")
        reason = query.get("reason") or None
        if reason is not None and not REASON.fullmatch(reason):
            raise BadRequest("query parameter 'reason' must be a reason name such as malformed_json", "reason")
        stage = query.get("stage") or None
        if stage is not None and stage not in STAGES:
            raise BadRequest(f"query parameter 'stage' must be one of {', '.join(STAGES)}", "stage")
        shard = self.api._query_shard()
        offset, after = _page()
        if offset:
            raise BadRequest("page with after=<next_after of the previous page>, not offset", "offset")
        limit = _query_int("limit", 100, 1, 1000)
        self._ensure_schema()
        sql, args = rejected.listing_sql(filename, reason, stage, shard, after, limit)
        rows = self.api.tracker.store.read(sql, args)
        items = [rejected.as_json(r) for r in rows]
        return 200, {"items": items, "limit": limit, "after": after,
                     "next_after": items[-1]["id"] if len(items) == limit else None}
