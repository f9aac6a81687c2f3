"""The sender claims several small files a request, and one at a time after a slow file."""
from __future__ import annotations

import logging

from app.client import Task
from app.config import Settings
from app.daemon import Context, Done
from app.sender import stage
from app.sender.loader import LoadResult
from app.shutdown import StopFlag


def test_claim_limit_follows_how_fast_files_load(monkeypatch):
    settings = Settings.from_env({"CLAIM_LIMIT": "6"})
    sender = stage.Sender(settings, 0)
    assert sender.claim_limit == 1                          # nothing known yet: one file at a time
    ctx = Context(StopFlag(), logging.getLogger("test"))
    clock = [100.0]
    took = [0.05]

    def load_file(*args, **kwargs):
        clock[0] += took[0]
        return LoadResult("f", 500, 500, 0, "load_data", took[0], "x")
    monkeypatch.setattr(stage.loader, "load_file", load_file)
    monkeypatch.setattr(stage.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(sender.shard_db, "get", lambda: None)
    [out] = sender.process([Task("20260101000000", 0)], ctx)
    assert isinstance(out, Done) and out.events == 500
    assert sender.claim_limit == 6                          # a small file: the next claim takes several
    took[0] = 2 * stage.FAST_LOAD_SECONDS
    sender.process([Task("20260101000001", 0)], ctx)
    assert sender.claim_limit == 1                          # a slow one: back to one at a time
