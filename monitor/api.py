"""The dashboard's view of pipeline-apid: one `fetch()` per refresh, plus the operator's actions.

Polls never retry: an unreachable API must show as a banner at once, and the next refresh is the
retry. Actions (retry, file detail) get a few seconds of retries, since the operator is waiting.
Polling and actions use separate HTTP sessions because they run on different worker threads.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from app.client import ApiError, ApiUnavailable, PipelineClient
from app.stages import STAGES, STATUSES, WORK_STAGES, Stage, Status

__all__ = ["STAGES", "STATUSES", "WORK_STAGES", "ApiSource", "Snapshot", "Status", "describe", "key"]


HOSTS_MINUTES = 5  # a host is listed while a program of it moved a task this recently, or holds one


def key(stage: str) -> str:
    """The API's dict keys spell stages with underscores."""
    return Stage(stage).column if stage in STAGES else stage


@dataclass
class Snapshot:
    """Everything one refresh shows about the pipeline."""

    summary: dict
    throughput: dict
    failed: dict[str, list[dict]] = field(default_factory=dict)
    started: dict[str, list[dict]] = field(default_factory=dict)
    took: float = 0.0
    hosts: list[dict] = field(default_factory=list)  # GET /hosts: which host runs what

    def stage_metrics(self, stage: str) -> dict:
        return (self.summary.get("stages") or {}).get(key(stage)) or {}

    def counts(self, stage: str) -> dict:
        return (self.summary.get("by_stage") or {}).get(key(stage)) or {s.value: 0 for s in STATUSES}


class ApiSource:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 3.0,
                 task_limit: int = 200, minutes: int = 30):
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.task_limit = task_limit
        self.minutes = minutes
        self._poll = PipelineClient(self.base_url, token, timeout=timeout, max_wait=0)

    def _actions(self) -> PipelineClient:
        return PipelineClient(self.base_url, self.token, timeout=max(self.timeout, 10.0), max_wait=5.0)

    def fetch(self) -> Snapshot:
        began = time.monotonic()
        c = self._poll
        summary = c.summary()
        throughput = c.throughput(self.minutes)
        failed, started = {}, {}
        for stage in WORK_STAGES:
            counts = (summary.get("by_stage") or {}).get(key(stage)) or {}
            # Skip the listing when the summary says it would be empty: fewer requests per tick.
            failed[stage] = (c.tasks(stage, Status.FAILED, limit=self.task_limit)["items"]
                             if counts.get(Status.FAILED) else [])
            started[stage] = (c.tasks(stage, Status.STARTED, limit=self.task_limit)["items"]
                              if counts.get(Status.STARTED) else [])
        try:
            hosts = c.hosts(HOSTS_MINUTES)["hosts"]
        except ApiError:  # an API older than /hosts: the panel stays empty
            hosts = []
        return Snapshot(summary, throughput, failed, started, time.monotonic() - began, hosts)

    def retry(self, stage: str, filename: str, shard: int) -> dict:
        return self._actions().retry(stage, filename, shard)

    def retry_all(self, stage: str) -> int:
        return int(self._actions().retry_all(stage).get("retried", 0))

    def file(self, filename: str) -> dict:
        return self._actions().file(filename)

    def rejected(self, filename: str, limit: int = 500) -> list[dict]:
        """The file's first rejected lines (GET /rejected), in the order they were recorded."""
        return self._actions().call("GET", "/rejected", params={"file": filename, "limit": limit})["items"]


def describe(exc: BaseException) -> str:
    """One line for the banner: what failed, without a traceback."""
    if isinstance(exc, ApiUnavailable):
        text = str(exc)
        for marker in ("ConnectionError: ", "ReadTimeout: ", "ConnectTimeout: "):
            if marker in text:
                kind = marker.rstrip(": ")
                detail = "connection refused" if "refused" in text.lower() else text.split(marker, 1)[1]
                return f"{kind}: {detail}"[:200]
        return text[:200]
    if isinstance(exc, ApiError):
        return str(exc)[:200]
    return f"{type(exc).__name__}: {exc}"[:200]
