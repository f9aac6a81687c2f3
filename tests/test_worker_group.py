"""Several small files of a shard decided together (`WorkerStage.group`, `_process_group`): one
start script, one transaction, one commit, one folder fsync for the group, and still every
file's decisions recorded on their own, so that deciding a claim's files together gives the
outputs, statistics, records and state that deciding them one by one gives, and a re-run of
any one file alone replays it byte for byte. The real WorkerStage on the test server."""
from __future__ import annotations

import dataclasses
import gc
import os
import random
import weakref

import pytest

from app import db, layout, rejected, safefiles
from app.client import Task
from app.daemon import Done, Failed, Retryable, TaskFailed
from app.worker import stage as stage_module
from app.worker.ledger import ALL_BALANCES
from app.worker.state import Recent
from tests import servers
from tests.test_worker_state import Worker, sql
from tests.test_worker_support import price_change, purchase, refund, restock, shop_status

NAMES = [f"20260301{12 + i // 60:02d}{i % 60:02d}00" for i in range(12)]
ENV = dict(HOLD_SECONDS="90", DEDUP_WINDOW="1h", ORDER_WINDOW="1h")


def generated(seed: int = 1, files: int = len(NAMES), per: int = 30) -> list[list[bytes]]:
    """Files with duplicates (within and across files), returns held by one file and released
    or expired by later ones, returns of purchases in earlier files, rejected purchases, stock,
    prices, shop status, malformed lines and events out of order."""
    rng = random.Random(seed)
    out, seen, orders = [], [], []
    at = 0
    for f in range(files):
        lines = []
        for _ in range(per):
            at += rng.randint(0, 4000)
            when = at - rng.randint(0, 150_000) if rng.random() < 0.25 else at   # late, some past HOLD_SECONDS
            roll = rng.random()
            if roll < 0.30:
                order = rng.randint(1, 10_000)
                orders.append((order, when))
                line = purchase(when, order, user=rng.randint(1, 6), shop=rng.choice([2, 4, 2, 6, 3]),
                                price=rng.choice([5, 50, 400, 900]))
            elif roll < 0.45 and orders:
                order, _ = rng.choice(orders)
                line = refund(when, order, user=rng.randint(1, 6), amount=rng.choice([5, 50, 0]), shop=rng.choice([2, 4, 2, 6, 3]))
            elif roll < 0.55:   # a return before its purchase: held, its purchase comes (or not) later
                order = 20_000 + at // 30_000 * 3 + rng.randint(0, 2)
                line = refund(when, order, user=order % 6 + 1, amount=5, shop=2)
                if rng.random() < 0.7:
                    orders.append((order, when))
            elif roll < 0.62:
                order = 20_000 + at // 30_000 * 3 + rng.randint(0, 2)     # the purchase of a held return, maybe
                line = purchase(when, order, user=order % 6 + 1, shop=2, price=5)
            elif roll < 0.72:
                line = restock(when, rng.choice([2, 4, 2, 6, 3]), rng.choice([2, 4, 2, 6, 3]), rng.randint(-3, 5))
            elif roll < 0.76:
                line = price_change(when, rng.choice([2, 4, 2, 6, 3]), 1, rng.choice([0, 3, 7]))
            elif roll < 0.80:
                line = shop_status(when, rng.choice([2, 4, 2, 6, 3]), rng.random() < 0.7)
            elif roll < 0.83:
                line = b'{"event_type": 1, "broken'
            elif seen:
                line = rng.choice(seen)                  # an exact duplicate, maybe of another file
            else:
                line = restock(when, 1, 1, 1)
            seen.append(line)
            lines.append(line)
        out.append(lines)
    return out


def write(w: Worker, name: str, lines: list[bytes]) -> None:
    path = layout.splitter_output(w.shared, name, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(x + b"\n" for x in lines))


def records(url) -> list:
    return sql(url, "SELECT f.filename, b.first_line, b.line_count, b.digest, b.codes FROM worker_batches b "
                    "JOIN worker_files f ON f.id=b.file_id ORDER BY f.filename, b.first_line")


def state(url) -> list:
    return [sql(url, f"SELECT user_id, balance FROM ({ALL_BALANCES}) b ORDER BY user_id"),
            sql(url, "SELECT shop_id, good_id, count FROM worker_stock ORDER BY 1, 2"),
            sql(url, "SELECT o.order_id, o.state, o.amount, f.filename, o.line FROM worker_orders o "
                     "JOIN worker_files f ON f.id=o.file_id ORDER BY o.order_id"),
            sql(url, "SELECT f.filename, h.line, h.state, h.code, r.filename, h.resolved_line, h.resolved_seq "
                     "FROM worker_holds h JOIN worker_files f ON f.id=h.file_id "
                     "LEFT JOIN worker_files r ON r.id=h.resolved_file_id ORDER BY f.filename, h.line"),
            sql(url, "SELECT COUNT(*) FROM worker_seen"),
            sql(url, "SELECT filename, stage, shard, line_no, reason, detail, line FROM rejected_lines "
                     "ORDER BY filename, line_no, reason"),
            sql(url, "SELECT newest_event FROM worker_shards")]


def stats(outcome) -> tuple:
    return type(outcome).__name__, getattr(outcome, "events", None), getattr(outcome, "stats", None)


@pytest.fixture
def two(make_database, tmp_path):
    made = []

    def make(**env):
        for side in ("one", "group"):
            shared = tmp_path / side
            shared.mkdir()
            made.append(Worker(make_database(side), shared, **{**ENV, **env}))
        return made[-2], made[-1]
    yield make
    for w in made:
        w.close()


@pytest.mark.parametrize("lookups,env,infile,batch", [
    ("recent", {}, True, None),
    ("every batch guesses wrong", {}, True, None),
    ("recent", {"PURCHASE_TAKES_STOCK": "1"}, True, None),          # a return's stock looked up apart
    ("every batch guesses wrong", {"RULE_DEDUP": "0"}, True, None),  # a key may be recorded twice in a group
    ("every batch guesses wrong", {}, False, None),                   # the state by INSERTs, not LOAD DATA
    ("recent", {}, True, 60),                 # a group holds two files: a claim of four is two groups
])
def test_files_decided_together_come_out_as_one_by_one_and_each_replays_alone(two, monkeypatch, lookups, env,
                                                                              infile, batch):
    one, grouped = two(**env)
    one.stage.state.use_infile = grouped.stage.state.use_infile = infile
    if batch:
        monkeypatch.setattr(stage_module, "GROUP_LINES", batch)
    if lookups != "recent":
        # the optimistic first try never looks a key up: each duplicate of a key committed by an
        # earlier claim is a SeenConflict and the whole group is decided again with every key
        # looked up (a duplicate of a key of the group's own files is caught in memory)
        monkeypatch.setattr(Recent, "among", lambda self, items: set())
    together, tries = [], []
    real = stage_module.WorkerStage._decide_together
    monkeypatch.setattr(stage_module.WorkerStage, "_decide_together",
                        lambda self, runs, *a: together.append(len(runs)) or real(self, runs, *a))
    real_tx = stage_module.WorkerStage._decide_group_tx
    monkeypatch.setattr(stage_module.WorkerStage, "_decide_group_tx",
                        lambda self, cur, runs, *a: tries.append(len(runs)) or real_tx(self, cur, runs, *a))
    files = generated()
    first = {}
    for name, lines in zip(NAMES, files):
        write(one, name, lines)
        write(grouped, name, lines)
        [first[name]] = one.stage.process([Task(name, 0)], one.ctx)
    claims = [NAMES[0:4], NAMES[4:8], NAMES[8:11], NAMES[11:12]]
    for claim in claims:
        tasks = [Task(n, 0) for n in claim]
        groups = grouped.stage.group(tasks)
        assert groups == [tasks]
        for group in groups:
            for task, outcome in zip(group, grouped.stage.process(group, grouped.ctx)):
                assert stats(outcome) == stats(first[task.filename]), task.filename
    assert together == ([2, 2, 2, 2, 2] if batch else [4, 4, 3])
    if lookups == "recent":
        assert tries == together
    elif env.get("RULE_DEDUP") != "0":
        assert len(tries) > 3      # some group was decided again: the retry path is what is compared
    for name in NAMES:
        assert grouped.outputs(name) == one.outputs(name), name
    assert records(grouped.url) == records(one.url)
    assert state(grouped.url) == state(one.url)
    totals = [sum(first[n].stats[k] for n in NAMES) for k in ("held", "released", "expired")]
    totals += [sum(first[n].stats["rejected"].get(k, 0) for n in NAMES)
               for k in ("duplicate", "orphan_return", "malformed", "insufficient_balance", "purchase_rejected")]
    if not env:
        assert all(totals), str(totals)    # the data has each case
    # a re-run of any one file, alone, replays its records: the same bytes, no state changed
    before = state(grouped.url)
    for name in reversed(NAMES):
        outcome = grouped.again(name)
        assert stats(outcome) == stats(first[name]) and grouped.outputs(name) == one.outputs(name), name
    assert state(grouped.url) == before and records(grouped.url) == records(one.url)


def test_a_group_shares_one_start_one_commit_and_one_folder_fsync(two, monkeypatch):
    _, w = two()
    for name, lines in zip(NAMES[:4], generated(files=4)):
        write(w, name, lines)
    conn_class = type(w.stage.state.open())
    commits, synced, locks = [], [], []
    real_commit, real_fsync, real_starts = conn_class.commit, safefiles.Folder.fsync, w.stage.state.start_files
    real_run = db.Script.run
    monkeypatch.setattr(conn_class, "commit", lambda self: commits.append(1) or real_commit(self))
    monkeypatch.setattr(db.Script, "run", lambda self, cur: commits.extend(1 for t, *_ in self.items if t == "commit")
                        or real_run(self, cur))
    monkeypatch.setattr(safefiles.Folder, "fsync", lambda self: synced.append(1) or real_fsync(self))
    monkeypatch.setattr(w.stage.state, "start_files", lambda names, *a: locks.append(names) or real_starts(names, *a))
    monkeypatch.setattr(w.stage, "_prune_after", lambda newest: None)
    outcomes = w.stage.process([Task(n, 0) for n in NAMES[:4]], w.ctx)
    assert [type(o) for o in outcomes] == [Done] * 4
    assert locks == [NAMES[:4]] and len(commits) == 1 and len(synced) == 1
    assert [r[0] for r in records(w.url)] == NAMES[:4]        # a record per file all the same


def test_a_group_is_one_batch_one_read_script_and_one_write_script(two, monkeypatch):
    """A claim's small files are one batch: the start script, one script reading (and locking)
    what all of them need, one writing what all of them changed with each file's record (before,
    a read and a write script per file: nine scripts for four files)."""
    _, w = two()
    for name, lines in zip(NAMES[:4], generated(files=4)):
        write(w, name, lines)
    conn = w.stage.state.open()
    scripts, sent = [], []
    real_run, real_query = db.Script.run, type(conn).query
    monkeypatch.setattr(db.Script, "run", lambda self, cur: scripts.append([t for t, *_ in self.items])
                        or real_run(self, cur))
    monkeypatch.setattr(type(conn), "query", lambda self, sql, *a, **k: sent.append(sql) or real_query(self, sql, *a, **k))
    monkeypatch.setattr(w.stage, "_prune_due", lambda newest: False)
    outcomes = w.stage.process([Task(n, 0) for n in NAMES[:4]], w.ctx)
    assert [type(o) for o in outcomes] == [Done] * 4
    starts = [s for s in scripts if "lock" in s]
    reads = [s for s in scripts if "begin" in s]
    writes = [s for s in scripts if any(t.startswith("record") for t in s)]
    assert len(starts) == 1 and len(reads) == 1 and len(writes) == 1 and len(scripts) == 4, scripts
    # the four files' records: one INSERT of their batch rows, one UPDATE of their progress
    assert [t for t in writes[0] if t.startswith("record")] == ["records", "records"], writes[0]
    # and their rows made and read in two statements in all (were two a file)
    assert [t for t in starts[0] if t.startswith(("file", "info"))] == ["files", "infos"], starts[0]
    # the three and the commit's: the rejected rows, the COMMIT and the unlock in one
    assert scripts[-1] == ["rejected", "commit", "unlock"], scripts
    assert len(sent) == 4 and sent[-1].startswith("INSERT INTO rejected_lines"), [q[:60] for q in sent]
    assert sent[-1].endswith(f"COMMIT;DO RELEASE_LOCK('{w.stage.state.lock_name}')"), sent[-1][-80:]
    assert len(sql(w.url, "SELECT id FROM rejected_lines")) == sum(
        sum(o.stats["rejected"].values()) for o in outcomes)


def test_one_bad_file_of_a_group_fails_alone_and_the_others_are_decided_one_by_one(two, monkeypatch):
    one, w = two()
    files = generated(files=4)
    for name, lines in zip(NAMES[:4], files):
        write(w, name, lines)
        write(one, name, lines)
    expected = {n: stats(one.stage.process([Task(n, 0)], one.ctx)[0]) for n in (NAMES[0], NAMES[2], NAMES[3])}
    real = stage_module.FileRun._decide_lines

    def failing(self, *a, **k):   # deciding its lines, alone or in the group's one batch
        if self.filename == NAMES[1]:
            raise TaskFailed("a bad input")
        return real(self, *a, **k)
    monkeypatch.setattr(stage_module.FileRun, "_decide_lines", failing)
    outcomes = w.stage.process([Task(n, 0) for n in NAMES[:4]], w.ctx)
    assert [type(o) for o in outcomes] == [Done, Failed, Done, Done] and outcomes[1].reason == "a bad input"
    for n in expected:
        assert stats(outcomes[NAMES.index(n)]) == expected[n]
        assert w.outputs(n) == one.outputs(n)
    assert [r[0] for r in records(w.url)] == [NAMES[0], NAMES[2], NAMES[3]]   # nothing kept of the bad one


def test_groups_leave_out_missing_large_and_other_shard_files_and_start_after_decided_ones(two, monkeypatch):
    _, w = two()
    files = generated(files=6)
    for name, lines in zip(NAMES[:6], files):
        write(w, name, lines)
    tasks = [Task(n, 0) for n in NAMES[:6]]
    layout.splitter_output(w.shared, NAMES[2], 0).unlink()
    monkeypatch.setattr(stage_module, "GROUP_FILE_BYTES", max(len(b"\n".join(f)) for f in files) + 10)
    write(w, NAMES[4], files[4] * 3)                          # larger than GROUP_FILE_BYTES
    assert w.stage.group(tasks + [Task(NAMES[6], 1)]) == [tasks[0:2], [tasks[2]], [tasks[3]], [tasks[4]],
                                                           [tasks[5]], [Task(NAMES[6], 1)]]
    # a file of more lines than one batch: decided alone after those before it went together
    monkeypatch.setattr(stage_module, "GROUP_FILE_BYTES", 1 << 20)
    write(w, NAMES[2], files[2])
    write(w, NAMES[4], files[4] * 5)
    w.stage.settings = dataclasses.replace(w.settings, worker_batch_lines=4 * len(files[0]))
    together = []
    real = stage_module.WorkerStage._decide_together
    monkeypatch.setattr(stage_module.WorkerStage, "_decide_together",
                        lambda self, runs, *a: together.append([r.filename for r in runs]) or real(self, runs, *a))
    assert [type(o) for o in w.stage.process(tasks[:5], w.ctx)] == [Done] * 5
    assert together == [NAMES[:4]]
    # a group whose first file was decided already: all one by one (a replay first)
    assert [type(o) for o in w.stage.process([tasks[3], tasks[5]], w.ctx)] == [Done, Done]
    assert together == [NAMES[:4]]
    # an input gone between the claim's grouping and its work: the group is handed back whole
    layout.splitter_output(w.shared, NAMES[6], 0).parent.mkdir(parents=True, exist_ok=True)
    write(w, NAMES[6], files[0][:3])
    with pytest.raises(Retryable):
        w.stage.process([Task(NAMES[6], 0), Task(NAMES[7], 0)], w.ctx)
    assert sql(w.url, "SELECT COUNT(*) FROM worker_files WHERE filename=%s", (NAMES[6],)) == [(0,)]
    assert servers.query(w.url, "SELECT IS_USED_LOCK(%s)", (w.stage.state.lock_name,)) == [(None,)]


def test_a_link_or_a_fifo_in_place_of_a_shard_file_is_never_grouped(two, tmp_path):
    """Whether a file is small is read from the shared folder's own entry (lstat): a link is
    not followed out of the folder, a FIFO (size 0) is not taken for a small file; each goes
    alone, where the safe open refuses it."""
    _, w = two()
    files = generated(files=2)
    write(w, NAMES[0], files[0])
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"\n".join(files[1]))
    link = layout.splitter_output(w.shared, NAMES[1], 0)
    link.symlink_to(outside)
    fifo = layout.splitter_output(w.shared, NAMES[2], 0)
    os.mkfifo(fifo)
    write(w, NAMES[3], files[0])
    tasks = [Task(n, 0) for n in NAMES[:4]]
    assert w.stage.group(tasks) == [[tasks[0]], [tasks[1]], [tasks[2]], [tasks[3]]]


def test_a_fresh_files_start_reads_neither_records_nor_resolved_holds_and_a_rerun_still_does(two, monkeypatch):
    """A fresh file's start script is the lock, its row (with whether it has records or
    resolved holds) and the shard clock with the held keys and whether idle-expired holds wait:
    four statements, where seven were sent before (two empty result sets a file and the clock
    apart), and its read script looks for holds to adopt only when some wait. A re-run's
    records and resolved holds are read all the same (a round trip more) and it replays byte
    for byte; holds the idle expiry left are adopted by the next group's first file."""
    _, w = two()
    files = generated(files=8)
    scripts, starts = [], []
    real_run, real_starts = db.Script.run, w.stage.state.start_files
    monkeypatch.setattr(db.Script, "run", lambda self, cur: scripts.append([t for t, *_ in self.items])
                        or real_run(self, cur))
    monkeypatch.setattr(w.stage.state, "start_files",
                        lambda names, *a: starts.append(real_starts(names, *a)) or starts[-1])
    outputs = {}
    for name, lines in zip(NAMES[:6], files):
        scripts.clear()
        assert type(w.decide(name, lines)) is Done
        outputs[name] = w.outputs(name)
        first = scripts[0]
        assert first[0] == "lock" and not any(t.startswith(("batches", "resolved", "adopt")) for s in scripts for t in s)
        if name != NAMES[0]:    # the first file of a process reads every held row
            assert first == ["lock", "file0", "info0", "newest"], first
    again = [name for name in NAMES[:6]
             if sql(w.url, "SELECT COUNT(*) FROM worker_holds h JOIN worker_files f ON f.id=h.resolved_file_id "
                           f"WHERE f.filename='{name}'")[0][0]]
    assert again, "the data has a file that resolved a hold"
    for name in NAMES[:6]:
        scripts.clear()
        starts.clear()
        assert type(w.again(name)) is Done
        assert w.outputs(name) == outputs[name]
        [start] = starts[0]
        assert start.records and scripts[1] == [f"batches{start.info.id}", f"resolved{start.info.id}"], scripts
        assert bool(start.resolved) == (name in again)
    held = sql(w.url, "SELECT COUNT(*) FROM worker_holds WHERE state='held'")[0][0]
    assert held and w.stage.state.expire_idle() == held
    for name, lines in zip(NAMES[6:8], files[6:8]):
        write(w, name, lines)
    scripts.clear()
    outcomes = w.stage.process([Task(n, 0) for n in NAMES[6:8]], w.ctx)
    assert [type(o) for o in outcomes] == [Done] * 2
    assert outcomes[0].stats["expired"] >= held
    reads = [s for s in scripts if "begin" in s]
    assert len(reads) == 1 and "adopt" in reads[0], scripts


def test_a_small_files_commit_carries_its_rejected_rows_and_the_shard_locks_release(two, monkeypatch):
    """A fresh one-batch file (alone, or a group) commits in one round trip with its rejected
    rows and, when no prune pass follows, the shard lock's release: four round trips, where the
    COMMIT, the rows' INSERT on their writer's connection and RELEASE_LOCK were three of six.
    The rows are held back however many (none in the table before the commit); a re-run writes
    them again through the writer and the table keeps each once."""
    one, w = two()
    files = generated(files=4)
    conn = w.stage.state.open()
    scripts, sent, written = [], [], []
    real_run, real_query, real_write = db.Script.run, type(conn).query, rejected.RejectedWriter.write
    monkeypatch.setattr(db.Script, "run", lambda self, cur: scripts.append([t for t, *_ in self.items])
                        or real_run(self, cur))
    monkeypatch.setattr(type(conn), "query",
                        lambda self, sql, *a, **k: sent.append(sql) or real_query(self, sql, *a, **k))
    monkeypatch.setattr(rejected.RejectedWriter, "write", lambda self, rows: written.append(len(rows))
                        or real_write(self, rows))
    monkeypatch.setattr(rejected, "FLUSH_ROWS", 2)
    monkeypatch.setattr(w.stage, "_prune_due", lambda newest: False)
    expected = {name: stats(one.decide(name, lines)) for name, lines in zip(NAMES[:4], files)}
    outputs = {name: one.outputs(name) for name in NAMES[:4]}
    scripts.clear()
    sent.clear()
    written.clear()
    assert stats(w.decide(NAMES[0], files[0])) == expected[NAMES[0]]
    assert w.outputs(NAMES[0]) == outputs[NAMES[0]]
    assert len(scripts) == 4 and scripts[-1] == ["rejected", "commit", "unlock"], scripts
    assert len(sent) == 4 and sent[-1].endswith(f"COMMIT;DO RELEASE_LOCK('{w.stage.state.lock_name}')"), sent
    assert written == [], "the rows went with the commit, not by the writer"
    for name, lines in zip(NAMES[1:4], files[1:4]):
        write(w, name, lines)
    sent.clear()
    outcomes = w.stage.process([Task(n, 0) for n in NAMES[1:4]], w.ctx)
    assert [stats(o) for o in outcomes] == [expected[n] for n in NAMES[1:4]]
    assert [w.outputs(n) for n in NAMES[1:4]] == [outputs[n] for n in NAMES[1:4]]
    assert len(sent) == 4 and written == [], [q[:60] for q in sent]
    table = "SELECT filename, line_no, reason, detail, line FROM rejected_lines ORDER BY filename, line_no"
    rows = sql(w.url, table)
    assert rows == sql(one.url, table) and len(rows) > 2 * 4
    # the lock is free: another connection takes it at once
    assert sql(w.url, "SELECT GET_LOCK(%s, 0), RELEASE_LOCK(%s)", (w.stage.state.lock_name,) * 2) == [(1, 1)]
    for name in NAMES[:4]:
        assert stats(w.again(name)) == expected[name] and w.outputs(name) == outputs[name]
    assert written and sql(w.url, table) == rows


def test_a_failing_statement_before_the_commit_stops_the_script_nothing_committed_lock_released(two, monkeypatch):
    """The server stops a script at its first failing statement: a rejected row the server
    refuses leaves neither the batch nor the rows committed nor the lock released by the
    script (the worker rolls back and releases it); decided again, the files come out as
    they would have."""
    one, w = two()
    files = generated(files=3)
    expected = {name: stats(one.decide(name, lines)) for name, lines in zip(NAMES[:3], files)}
    outputs = {name: one.outputs(name) for name in NAMES[:3]}
    real_insert = rejected.insert_sql
    monkeypatch.setattr(rejected, "insert_sql", lambda conn, rows: real_insert(conn, rows)[:-1]
                        + ["INSERT INTO rejected_lines (no_such_column) VALUES (1)"])
    monkeypatch.setattr(w.stage, "_prune_due", lambda newest: False)
    unlocks = []
    real_unlock = type(w.stage.state).unlock_shard
    monkeypatch.setattr(type(w.stage.state), "unlock_shard",
                        lambda self: unlocks.append(self.released) or real_unlock(self))
    with pytest.raises(Retryable):   # an unknown column: the server's OperationalError
        w.decide(NAMES[0], files[0])
    for name, lines in zip(NAMES[1:3], files[1:3]):
        write(w, name, lines)
    with pytest.raises(Retryable):
        w.stage.process([Task(n, 0) for n in NAMES[1:3]], w.ctx)
    assert unlocks and not any(unlocks), "the script released nothing: the worker's own RELEASE_LOCK did"
    for table in ("worker_batches", "worker_orders", "worker_seen", "rejected_lines", "worker_holds"):
        assert sql(w.url, f"SELECT COUNT(*) FROM {table}") == [(0,)], table
    assert {d for (d,) in sql(w.url, "SELECT lines_decided FROM worker_files")} == {0}
    assert sql(w.url, "SELECT GET_LOCK(%s, 0), RELEASE_LOCK(%s)", (w.stage.state.lock_name,) * 2) == [(1, 1)]
    monkeypatch.setattr(rejected, "insert_sql", real_insert)
    assert stats(w.again(NAMES[0])) == expected[NAMES[0]]
    outcomes = w.stage.process([Task(n, 0) for n in NAMES[1:3]], w.ctx)
    assert [stats(o) for o in outcomes] == [expected[n] for n in NAMES[1:3]]
    assert [w.outputs(n) for n in NAMES[:3]] == [outputs[n] for n in NAMES[:3]]
    mine, theirs = state(w.url), state(one.url)
    assert mine[:4] + mine[5:] == theirs[:4] + theirs[5:]   # keys sealed by `one`'s prune passes, not by w's


def test_the_collector_never_walks_a_file_or_group_still_being_decided(two, monkeypatch):
    """The cyclic collector is off from a file's or group's first line read to its outputs
    written, and back on only once their objects are freed: every collection starts with no
    `FileRun` alive (turned back on inside, the first allocation after a group walked its
    lines, events and orders, still alive; with validation outside the pause, every 700th)."""
    _, w = two()
    for name, lines in zip(NAMES[:5], generated(files=5)):
        write(w, name, lines)
    alive = weakref.WeakSet()
    real_init = stage_module.FileRun.__init__
    monkeypatch.setattr(stage_module.FileRun, "__init__", lambda self, *a: alive.add(self) or real_init(self, *a))
    collections, walked = [], []

    def watch(phase, info):
        if phase == "start":
            collections.append(1)
            if len(alive):
                walked.append(len(alive))
    threshold = gc.get_threshold()
    gc.set_threshold(1)        # any allocation with the collector on starts a collection
    gc.callbacks.append(watch)
    try:
        outcomes = w.stage.process([Task(n, 0) for n in NAMES[:4]], w.ctx)    # a group
        outcomes += w.stage.process([Task(NAMES[4], 0)], w.ctx)               # a file alone
    finally:
        gc.callbacks.remove(watch)
        gc.set_threshold(*threshold)
    assert [type(o) for o in outcomes] == [Done] * 5
    assert collections and not walked, walked
    assert not alive
