"""The shard worker's outputs per file: what it costs the file system to publish them, and that
the prepared lines rendered a batch at a time are the bytes rendered one line at a time. The
real WorkerStage on the test server (tests/test_worker_state.py's `worker`)."""
from __future__ import annotations

import orjson

from app import layout, safefiles
from tests.test_worker_state import F1, F2, worker  # noqa: F401
from tests.test_worker_support import purchase, refund, restock


def test_a_files_two_outputs_are_published_with_one_folder_fsync(worker, monkeypatch):
    w = worker()
    synced = []
    real = safefiles.Folder.fsync
    monkeypatch.setattr(safefiles.Folder, "fsync", lambda self: synced.append(1) or real(self))
    lines = [purchase(0, 100, user=1, shop=2, price=10), b'{"event_type": 1', restock(1, 2, 1, 5)]
    assert w.decide(F1, lines).events == 2
    assert len(synced) == 1
    prepared, rejected = w.outputs(F1)
    assert len(prepared.splitlines()) == 2 and orjson.loads(rejected)["reason"] == "malformed"
    assert layout.worker_rejected(w.shared, F1, 0).stat().st_mode & 0o777 == 0o600
    assert layout.worker_output(w.shared, F1, 0).stat().st_mode & 0o777 == 0o644
    # a file with nothing rejected still gets its (empty) rejected file, as before
    assert w.decide(F2, [refund(2, 100, user=1, amount=4, shop=2)]).events == 1
    assert w.outputs(F2)[1] == b"" and len(synced) == 2
