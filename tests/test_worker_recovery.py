"""shard-worker under failure: re-runs repeat the first run's decisions, a kill -9 loses and
duplicates nothing, two shard workers share one balance safely, a missing input heals itself,
and the original generator's file goes through the real ingest, splitter and worker."""
from __future__ import annotations

import shutil
import signal
import threading
from decimal import Decimal
from pathlib import Path

from app import layout
from app.daemon import Daemon
from app.ingest.service import Ingest
from app.sender.loader import check_line
from app.splitter.stage import Splitter
from tests import servers
from tests.test_worker_support import (SPLITTER, module_api, mixed, pipeline, purchase, refund,  # noqa: F401
                                       reset, restock)

F1, F2 = "20260301120000", "20260301120010"
FIXTURE = Path("/work/shared/fixtures/original-generator")


def outputs(pipeline, filename, shard=0):
    return pipeline.prepared_bytes(filename, shard), pipeline.rejected_bytes(filename, shard), \
        pipeline.stats(filename, shard)


def test_rerun_with_outputs_deleted_gives_the_same_output_and_state(pipeline):
    f1 = mixed(400, seed=11) + [refund(10_000, 4242, user=3, amount=7, shop=2)]          # held at the end
    f2 = [purchase(10_100, 4242, user=3, shop=2, price=7)] + mixed(400, seed=12, start_ms=10_200)
    pipeline.feed(F1, {0: f1})
    pipeline.feed(F2, {0: f2})
    w = pipeline.worker(0, WORKER_BATCH_LINES=64)
    pipeline.wait_done(F1)
    pipeline.wait_done(F2)
    first = {f: outputs(pipeline, f) for f in (F1, F2)}
    state = pipeline.state()
    assert first[F2][2]["released"] >= 1 and b'"order_id":4242' in first[F2][0]

    for f in (F1, F2):   # the prepared files vanish before the sender reads them
        layout.worker_output(pipeline.shared, f, 0).unlink()
        layout.worker_rejected(pipeline.shared, f, 0).unlink()
        pipeline.client.rewind("mysql-sender", f, 0, "test-sender", "prepared file missing")

    def worked_twice(f):
        return [h["action"] for h in pipeline.task(f, 0)["history"] if h["stage"] == "shard-worker"].count("done") == 2
    servers.wait_until(lambda: worked_twice(F1) and worked_twice(F2), 30, 0.05, "both files worked again")
    again = {f: outputs(pipeline, f) for f in (F1, F2)}
    w.stop()
    assert again == first
    assert pipeline.state() == state


def test_missing_input_goes_back_to_the_splitter_and_heals(pipeline):
    lines = [restock(0, 2, 1, 5), purchase(1, 1, user=1, shop=2)]
    pipeline.feed(F1, {0: lines})
    layout.splitter_output(pipeline.shared, F1, 0).unlink()
    w = pipeline.worker(0)
    servers.wait_until(lambda: pipeline.task(F1, 0)["shard_splitter_status"] == "new", 20, 0.05,
                       "the task rewound to the splitter")
    history = pipeline.task(F1, 0)["history"]
    assert any(h["stage"] == "shard-worker" and h["action"] == "rewind" for h in history)
    # the splitter runs again (here: the test playing it)
    pipeline.write_split(F1, 0, lines)
    pipeline.client.start("shard-splitter", F1, 0, "test-splitter")
    pipeline.client.done("shard-splitter", F1, 0, "test-splitter", events=2)
    pipeline.wait_done(F1)
    prepared = pipeline.prepared(F1)
    w.stop()
    assert len(prepared) == 2


def test_kill_9_mid_file_then_restart_gives_the_uninterrupted_result(pipeline):
    lines = mixed(6000, seed=5)
    batch = 50
    # the reference: one uninterrupted run
    pipeline.feed(F1, {0: lines})
    w = pipeline.worker(0, WORKER_BATCH_LINES=batch)
    pipeline.wait_done(F1, timeout=120)
    reference = (pipeline.prepared_bytes(F1), pipeline.rejected_bytes(F1), pipeline.state())
    stats = pipeline.stats(F1)
    w.stop()
    assert stats["in"] == 6000 and stats["released"] > 0 and stats["expired"] > 0
    assert len(stats["rejected"]) >= 8

    # the same from scratch, with the worker process killed in the middle of the file
    reset(pipeline.db_url)
    shutil.rmtree(layout.worker_dir(pipeline.shared, 0), ignore_errors=True)
    pipeline.feed(F1, {0: lines})
    proc = pipeline.worker_process(0, WORKER_BATCH_LINES=batch)

    def some_batches():
        try:
            return pipeline.sql("SELECT COUNT(*) FROM worker_batches")[0][0] >= 8
        except Exception:
            return False   # tables not created yet
    servers.wait_until(some_batches, 60, 0.01, "a few committed batches")
    proc.kill_group()
    proc.proc.wait(10)
    decided = pipeline.sql("SELECT COALESCE(SUM(line_count), 0) FROM worker_batches")[0][0]
    assert decided < 6000, "the worker finished before it was killed"
    assert pipeline.task(F1, 0)["shard_worker_status"] == "started"

    pipeline.worker_process(0, WORKER_BATCH_LINES=batch)
    pipeline.wait_done(F1, timeout=120)
    assert (pipeline.prepared_bytes(F1), pipeline.rejected_bytes(F1), pipeline.state()) == reference
    assert pipeline.stats(F1) == stats
    for n, raw in enumerate(pipeline.prepared_bytes(F1).splitlines(), 1):
        check_line(raw, n, F1, 0, 2)     # what the sender will accept


def test_two_shard_workers_spending_one_balance_never_overspend(pipeline):
    def spend(shard):     # 1500 purchases of 1.00 by user 7 in this shard's shops
        shops = [s for s in range(10) if s % 2 == shard]
        return [purchase(i, shard * 10_000 + i, user=7, shop=shops[i % len(shops)], price=1) for i in range(1500)]

    workers = [pipeline.worker_process(s, WORKER_BATCH_LINES=10) for s in (0, 1)]

    def both_ready():   # both set up (schema applied, shard row written) before any work exists
        try:
            return pipeline.sql("SELECT COUNT(*) FROM worker_shards")[0][0] == 2
        except Exception:
            return False
    servers.wait_until(both_ready, 30, 0.05, "both workers started")
    # Both shards' files become ready in one transaction, so both workers wake at once (fed one
    # after the other, the first worker could spend the whole balance before the second began).
    pipeline.client.register(F1, [0, 1])
    pipeline.client.ingest_done(F1)
    for shard in (0, 1):
        pipeline.write_split(F1, shard, spend(shard))
        pipeline.client.start("shard-splitter", F1, shard, SPLITTER)
    answers = pipeline.client.done_batch("shard-splitter", [{"filename": F1, "shard": s, "events": 1500}
                                                            for s in (0, 1)], SPLITTER)
    assert [a["status_code"] for a in answers] == [200, 200]
    pipeline.wait_done(F1, 0, timeout=120)
    pipeline.wait_done(F1, 1, timeout=120)
    accepted = [pipeline.stats(F1, s)["accepted"] for s in (0, 1)]
    for p in workers:
        p.stop()
    assert sum(accepted) == 1000                         # 1000.00 / 1.00, not one more
    assert min(accepted) > 0, f"the two workers did not compete ({accepted})"
    assert pipeline.balance(7) == Decimal("0.00")
    debited = pipeline.sql("SELECT SUM(amount), COUNT(*) FROM worker_orders WHERE state=1")[0]
    assert debited == (Decimal("1000.00"), 1000)
    assert [pipeline.stats(F1, s)["rejected"] for s in (0, 1)] == [{"insufficient_balance": 1500 - a}
                                                                   for a in accepted]


def test_original_generator_fixture_through_ingest_splitter_and_worker(pipeline):
    source = next(FIXTURE.glob("*.event-ingest.txt"))
    filename = source.name.split(".")[0]
    settings = pipeline.settings()
    Ingest(settings).import_files([source])
    splitter = Daemon(Splitter(settings), settings)
    threading.Thread(target=splitter.run, daemon=True).start()
    workers = [pipeline.worker(s) for s in (0, 1)]
    try:
        tasks = [pipeline.wait_done(filename, s) for s in (0, 1)]
        prepared = {s: pipeline.prepared_bytes(filename, s) for s in (0, 1)}
        rejected = {s: pipeline.rejected(filename, s) for s in (0, 1)}
    finally:
        splitter.stop.set()
        for w in workers:
            w.stop()
    lines = source.read_bytes().splitlines()
    returns = sum(1 for x in lines if x.startswith(b'{"event_type":3'))
    worker = [t["stats"]["shard-worker"] for t in tasks]
    split = tasks[0]["stats"]["shard-splitter"]
    assert sum(w["in"] for w in worker) + split["rejected_total"] == len(lines)
    # its returns name orders never bought: the splitter cannot route them, or the worker
    # never sees their purchase
    unroutable = split["rejected"].get("unroutable", 0)
    orphans = sum(w["rejected"].get("orphan_return", 0) + w["held"] for w in worker)
    assert unroutable + orphans == returns == 16
    for s in (0, 1):
        for n, raw in enumerate(prepared[s].splitlines(), 1):
            check_line(raw, n, filename, s, 2)
        assert all(r["reason"] != "malformed" for r in rejected[s])
    assert sum(w["accepted"] for w in worker) == sum(len(prepared[s].splitlines()) for s in (0, 1)) > 0


def test_sigterm_mid_file_hands_the_task_back_and_empties_the_folder(pipeline):
    lines = mixed(6000, seed=9)
    pipeline.feed(F1, {0: lines})
    proc = pipeline.worker_process(0, WORKER_BATCH_LINES=50)

    def some_batches():
        try:
            return pipeline.sql("SELECT COUNT(*) FROM worker_batches")[0][0] >= 5
        except Exception:
            return False
    servers.wait_until(some_batches, 60, 0.01, "a few committed batches")
    proc.signal(signal.SIGTERM)
    assert proc.proc.wait(30) == 0
    task = pipeline.task(F1, 0)
    assert task["shard_worker_status"] == "new", task
    assert [h["action"] for h in task["history"] if h["stage"] == "shard-worker"][-1] == "release"
    folder = layout.worker_dir(pipeline.shared, 0)
    assert sorted(p.name for p in folder.iterdir()) == ["activity.log"]
    decided = pipeline.sql("SELECT SUM(line_count) FROM worker_batches")[0][0]
    assert 0 < decided < 6000

    pipeline.worker_process(0, WORKER_BATCH_LINES=50)
    pipeline.wait_done(F1, timeout=120)
    assert pipeline.stats(F1)["in"] == 6000
    assert pipeline.sql("SELECT SUM(line_count) FROM worker_batches")[0][0] == 6000
