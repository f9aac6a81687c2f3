"""What the API reports: queues, task listings, a file's history, the summary and throughput."""
from __future__ import annotations

import statistics
import time
from datetime import datetime, timezone

import orjson

from ..stages import FIRST, STAGES, WORK_STAGES, Stage, Status, sql_in
from .errors import NotFound
from .queries import (DONE, FAILED, NEW, READY, SQL_TASK_COUNTS, STARTED, STATUS_KEYS, iso, iso_s, next_page, sql_ready,
                      status_index)
from .store import Store


class Reports:
    def __init__(self, store: Store):
        self.store = store
        self._read = store.read

    def queue(self, stage: str, limit: int, offset: int, shard: int | None, after: int | None = None) -> dict:
        """Ready tasks, oldest first; `after`: only those past that id (keyset paging)."""
        stage = Stage(stage)
        args = [shard] if shard is not None else []
        extra = ""
        if after is not None:
            extra, args = " AND id > %s", [*args, after]
        rows = self._read(sql_ready(stage, shard is not None, "id, filename, shard, created_at", "LIMIT %s OFFSET %s",
                                    extra), (*args, limit, offset))
        return {"stage": stage, "limit": limit, "offset": offset, **next_page(rows, limit, after),
                "items": [{"filename": r["filename"], "shard": r["shard"], "created_at": iso_s(r["created_at"])}
                          for r in rows]}

    def tasks(self, stage: str, status: str, shard: int | None, limit: int, offset: int,
              after: int | None = None) -> dict:
        """Tasks of one stage in one status, with owner, lease, attempts and last error, read
        through the status column's index (which holds the id: `after` is a range of it)."""
        stage = Stage(stage)
        status = Status(status)
        status_col = stage.status_column
        where, args = f"{status_col}=%s", [status]
        if after is not None:
            where += " AND id > %s"
            args.append(after)
        if shard is not None:
            where += " AND shard=%s"
            args.append(shard)
        att = stage.attempts_column or "0"
        rows = self._read(
            f"SELECT id, filename, shard, created_at, updated_at, owner, started_at, lease_expires_at, "
            f"{att} AS attempts, last_error, lease_expires_at < NOW(3) AS lease_expired, "
            f"TIMESTAMPDIFF(MICROSECOND, started_at, NOW(3)) DIV 1000 AS running_ms "
            f"FROM pipeline_tracking FORCE INDEX ({status_index(stage)}) WHERE {where} ORDER BY id "
            f"LIMIT %s OFFSET %s", (*args, limit, offset))
        return {"stage": stage, "status": status, "limit": limit, "offset": offset,
                **next_page(rows, limit, after), "items": [
            {"filename": r["filename"], "shard": r["shard"], "created_at": iso_s(r["created_at"]),
             "updated_at": iso(r["updated_at"]), "attempts": r["attempts"], "last_error": r["last_error"],
             **({"owner": r["owner"], "started_at": iso(r["started_at"]),
                 "lease_expires_at": iso(r["lease_expires_at"]), "lease_expired": bool(r["lease_expired"]),
                 "running_ms": r["running_ms"]} if status == STARTED else {})}
            for r in rows]}

    def file(self, filename: str) -> dict:
        rows = self._read("SELECT * FROM pipeline_tracking WHERE filename=%s ORDER BY shard", (filename,))
        if not rows:
            raise NotFound(f"file {filename!r} is not registered", filename=filename)
        marks = ",".join(["%s"] * len(rows))
        history = self._read("SELECT id, tracking_id, stage, from_status, to_status, action, at, actor, error, "
                             f"duration_ms, events, stats FROM pipeline_transitions WHERE tracking_id IN ({marks})",
                             [r["id"] for r in rows])
        history.sort(key=lambda h: h["id"])
        shards = []
        for r in rows:
            entry = {"shard": r["shard"], **{s.status_column: r[s.status_column] for s in STAGES},
                     "updated_at": iso_s(r["updated_at"]), "created_at": iso_s(r["created_at"]),
                     "attempts": {s.value: r.get(s.attempts_column, 0) for s in WORK_STAGES},
                     "last_error": r.get("last_error"), "owner": r.get("owner"),
                     "lease_expires_at": iso(r.get("lease_expires_at")), "stats": {}, "history": []}
            for h in history:
                if h["tracking_id"] != r["id"]:
                    continue
                try:
                    stats = orjson.loads(h["stats"]) if h["stats"] else None
                except orjson.JSONDecodeError:
                    stats = {"unreadable": h["stats"][:200]}
                entry["history"].append({"stage": h["stage"], "from": h["from_status"], "to": h["to_status"],
                                         "action": h["action"], "at": iso(h["at"]), "by": h["actor"],
                                         "error": h["error"], "duration_ms": h["duration_ms"],
                                         "events": h["events"], "stats": stats})
                if h["to_status"] == DONE and (stats or h["events"] is not None):
                    entry["stats"][h["stage"]] = {"events": h["events"], **(stats if isinstance(stats, dict) else {})}
            shards.append(entry)
        return {"filename": filename, "shards": shards}

    def counts(self) -> dict[tuple[str, int, str], int]:
        """(stage, shard, status or READY) -> tasks, from the counts the triggers keep."""
        return {(r["stage"], r["shard"], r["status"]): int(r["n"]) for r in self._read(SQL_TASK_COUNTS)}

    def summary(self) -> dict:
        """The contract's counts plus per-stage queue metrics: every figure is an index read of
        a bounded size (the kept counts, the first ready row, the last minute's transitions),
        so it is fresh on every call at any table size."""
        began = time.monotonic()
        counts = self.counts()
        by_stage = {s.column: dict.fromkeys(STATUS_KEYS, 0) for s in STAGES}
        by_shard: dict[int, dict] = {}
        for (stage, shard, status), n in counts.items():
            if status not in STATUS_KEYS or stage not in STAGES:
                continue
            by_stage[Stage(stage).column][status] += n
            sh = by_shard.setdefault(shard, {"shard": shard, "total": 0, **dict.fromkeys(STATUS_KEYS, 0)})
            if stage == FIRST:
                sh["total"] += n
            if stage == STAGES[-1]:
                sh[status] += n
        stage_metrics = {}
        for stage in WORK_STAGES:
            oldest = self._read(sql_ready(stage, False, "TIMESTAMPDIFF(MICROSECOND, created_at, NOW(3)) DIV 1000 age",
                                          "LIMIT 1"))
            recent = self._read("SELECT COUNT(*) n, COALESCE(SUM(events), 0) ev FROM pipeline_transitions "
                                f"WHERE stage=%s AND to_status={DONE.sql} AND at > NOW(3) - INTERVAL 60 SECOND",
                                (stage,))[0]
            runs = [r["duration_ms"] for r in self._read(
                f"SELECT duration_ms FROM pipeline_transitions WHERE stage=%s AND to_status={DONE.sql} "
                "AND duration_ms IS NOT NULL ORDER BY at DESC LIMIT 500", (stage,))]
            stage_metrics[stage.column] = {
                "ready": sum(n for (st, _, status), n in counts.items() if st == stage and status == READY),
                "oldest_ready_age_seconds": oldest[0]["age"] / 1000 if oldest and oldest[0]["age"] is not None
                else None,
                "done_last_minute": recent["n"], "events_last_minute": int(recent["ev"]),
                "median_run_ms": statistics.median(runs) if runs else None,
            }
        return {"total": sum(by_stage[FIRST.column].values()), "by_stage": by_stage,
                "by_shard": [{"shard": s["shard"], "total": s["total"],
                              **{k: s[k] for k in (DONE.value, FAILED.value, NEW.value, STARTED.value)}}
                             for s in sorted(by_shard.values(), key=lambda x: x["shard"])],
                "stages": stage_metrics, "as_of": iso(datetime.now(timezone.utc).replace(tzinfo=None)),
                "took_ms": round((time.monotonic() - began) * 1000, 1)}

    def throughput(self, minutes: int) -> dict:
        """Files and events finished per stage per minute, oldest minute first."""
        rows = self._read("SELECT stage, TIMESTAMPDIFF(MINUTE, at, NOW(3)) ago, COUNT(*) files, "
                          "COALESCE(SUM(events), 0) events FROM pipeline_transitions "
                          f"WHERE stage IN {sql_in(*STAGES)} "
                          f"AND to_status={DONE.sql} AND at > NOW(3) - INTERVAL %s MINUTE GROUP BY stage, ago",
                          (minutes,))
        out = {s.column: {"files": [0] * minutes, "events": [0] * minutes} for s in STAGES}
        for r in rows:
            i = minutes - 1 - int(r["ago"])
            if 0 <= i < minutes:
                out[Stage(r["stage"]).column]["files"][i] = int(r["files"])
                out[Stage(r["stage"]).column]["events"][i] = int(r["events"])
        return {"minutes": minutes, "stages": out}
