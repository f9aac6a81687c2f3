"""Rejected lines outlive the stop that empties the stages' folders: every one is a row of
`rejected_lines` (written by the stage that rejected it, once, whatever the re-runs), listed by
`GET /rejected`, and exported and re-injected as a new file with `python -m app.ingest`."""
from __future__ import annotations

import logging
import subprocess
import sys
from collections import Counter
from pathlib import Path

import orjson
import pytest
import requests

from app import rejected
from app.ingest.generator import Rates, generate_files
from app.lines import PREFIX_BYTES
from tests import ground_truth, servers
from tests.pipeline_harness import Pipeline, check_against_truth

CASES = Rates(duplicate=0.03, later_duplicate=0.03, return_first=0.03, over_balance=0.03, malformed=0.05,
              unroutable_return=0.03)
LIMIT = 4096   # MAX_LINE_BYTES of the run: a longer line is too_large


def _hand_file(folder: Path) -> tuple[str, list[bytes]]:
    """A file of lines no generator writes: not UTF-8, too large, long but within the limit,
    blank, and one good purchase."""
    good = (b'{"event_type":1,"payload":{"order_id":9000000000000000001,"user_id":7,"shop_id":3,"good_id":2,'
            b'"qty":1,"price_at_order":1.50},"saved_at":"2026-01-02 00:00:00.000","timestamp":'
            b'"2026-01-02 00:00:00.001"}')
    lines = [b'{"event_type":1,"payload":{"shop_id":"\xff\xfe"}}',
             b'{"event_type":0,"payload":{"shop_id":1,"pad":"' + b"x" * (3 * LIMIT) + b'"}}',
             b'{"event_type":"' + b"y" * 3000 + b'"}',
             b"",
             good]
    name = "20260102000000"
    (folder / f"{name}{ground_truth.SUFFIX}").write_bytes(b"\n".join(lines) + b"\n")
    return name, lines


def ground_truth_splitter_reasons(truth, name: str) -> set[str]:
    return set(truth.splitter_rejected[name])


def _rows(pipe: Pipeline) -> list[tuple]:
    return servers.query(pipe.pipeline_db, "SELECT filename, stage, shard, line_no, reason, line, line_bytes, "
                                           "line_truncated FROM rejected_lines ORDER BY filename, line_no")


def test_every_rejected_line_is_a_row_once_after_the_stop_and_counts_are_unchanged(tmp_path, pipeline_db,
                                                                                   shard_dbs):
    source = tmp_path / "in"
    names = list(generate_files(source, 4, 200, seed=77, rates=CASES, start="20260101000000"))
    truth = ground_truth.compute(sorted(source.glob(f"*{ground_truth.SUFFIX}")))
    (tmp_path / "hand").mkdir()
    hand, hand_lines = _hand_file(tmp_path / "hand")
    pipe = Pipeline(tmp_path / "run", pipeline_db, shard_dbs, extra_env={"MAX_LINE_BYTES": str(LIMIT)}).start()
    try:
        pipe.import_files(source)
        pipe.wait_loaded(len(names), timeout=150)
        check_against_truth(pipe, truth, names)     # the counts and the rejected files, as before
        pipe.import_files(tmp_path / "hand")
        pipe.wait_loaded(len(names) + 1, timeout=150)
        api = pipe.api.client()
        stats = {name: api.file(name)["shards"] for name in [*names, hand]}
    finally:
        codes = pipe.stop()
    assert all(code == 0 for code in codes.values()), codes
    assert not list((pipe.shared / "shard-splitter").glob("*.rejected.txt")), "the stop empties the folders"

    rows = _rows(pipe)
    assert len(rows) == len({r[:4] for r in rows})
    # Every line of the generated files that the ground truth rejects is a row with its reason,
    # and nothing else is; the line is the source's, byte for byte.
    # A splitter row names the source file's line; a worker row the line of its shard's file
    # (the worker's input), which is the n-th source line the splitter routed to that shard.
    fates = ground_truth.resolved_fates(truth)
    want, source_line = {}, {}
    for name in names:
        lines, _ = ground_truth.file_lines(source / f"{name}{ground_truth.SUFFIX}")
        routed = Counter()
        for no, line in enumerate(lines, 1):
            fate = fates[(name, no)]
            if fate in ground_truth_splitter_reasons(truth, name):
                where = (name, "shard-splitter", rejected.NO_SHARD, no)
            else:
                shard = orjson.loads(line)["payload"]["shop_id"] % 2
                routed[shard] += 1
                where = (name, "shard-worker", shard, routed[shard])
            source_line[where] = line.rstrip(b"\r\n")
            if fate not in ("accepted", "held"):
                want[where] = fate
    got = {r[:4]: r[4] for r in rows if r[0] != hand}
    assert got == want
    for f, stage, shard, n, reason, line, size, cut in rows:
        if f != hand:
            raw = source_line[(f, stage, shard, n)]
            assert (bytes(line), size, cut) == (raw, len(raw), 0), (f, n, reason)
    # Per reason, the rows agree with the counts every stage reported.
    for name in names:
        reported = Counter()
        for entry in stats[name]:
            reported.update(entry["stats"]["shard-worker"]["rejected"])
        reported.update(stats[name][0]["stats"]["shard-splitter"]["rejected"])
        assert Counter(r[4] for r in rows if r[0] == name) == reported, name
    # The hand-made file: bytes kept exactly (not UTF-8 too), a too_large line as its prefix and
    # its whole length, blank line as empty.
    mine = {r[3]: r for r in rows if r[0] == hand and r[1] == "shard-splitter"}
    assert sorted(mine) == [1, 2, 3, 4]
    assert (mine[1][4], bytes(mine[1][5])) == ("malformed_json", hand_lines[0])
    assert (mine[2][4], bytes(mine[2][5]), mine[2][6], mine[2][7]) == (
        "too_large", hand_lines[1][:PREFIX_BYTES], len(hand_lines[1]), 1)
    assert (mine[3][4], bytes(mine[3][5]), mine[3][7]) == ("malformed_json", hand_lines[2], 0)
    assert (mine[4][4], bytes(mine[4][5])) == ("empty_line", b"")


def test_a_rerun_writes_each_row_once(make_database):
    url = make_database("rej")
    w = rejected.RejectedWriter(url)
    records = [orjson.dumps({"line_no": n, "reason": "malformed_json", "line": f"bad {n}"}) + b"\n"
               for n in range(1, 1201)]
    try:
        for _ in range(2):   # the same task twice (a retry, a rewind, a second replica)
            out = []
            tee = w.tee(out.append, "20260101000000", "shard-splitter", None)
            for r in records:
                tee(r)
            tee.flush()
            assert out == records          # the stage's own file is unchanged
        assert servers.query(url, "SELECT COUNT(*), COUNT(DISTINCT line_no) FROM rejected_lines") == [(1200, 1200)]
        # A long line (within MAX_LINE_BYTES) keeps its first LINE_KEEP_BYTES and its length.
        long = "é" * 40000
        tee = w.tee(lambda _: None, "20260101000009", "shard-worker", 0)
        tee(orjson.dumps({"reason": "malformed", "source_file": "20260101000009", "line_no": 3, "line": long}))
        tee.flush()
        [(line, size, cut)] = servers.query(url, "SELECT line, line_bytes, line_truncated FROM rejected_lines "
                                                 "WHERE filename='20260101000009'")
        assert (bytes(line), size, cut) == (long.encode()[:rejected.LINE_KEEP_BYTES], 80000, 1)
        # Bulk: the 1200 rows took a handful of statements, not one each.
        w._conn.get().query("SHOW SESSION STATUS LIKE 'Com_insert'")
        inserts = int(w._conn.get()._result.rows[0][1])
        assert 0 < inserts <= 12, inserts
    finally:
        w.close()


def test_get_rejected_pages_by_keyset_and_filters_by_file_and_reason(api, make_database):
    w = rejected.RejectedWriter(_url(api.process.env["MYSQL_PIPELINE_URL"]))
    try:
        for name in ("20260101000001", "20260101000002"):
            tee = w.tee(lambda _: None, name, "shard-worker", 1)
            for n in range(1, 8):
                reason = "duplicate" if n % 2 else "insufficient_balance"
                tee(orjson.dumps({"reason": reason, "source_file": name, "line_no": n, "line": f"l{n}"}))
            tee.flush()
    finally:
        w.close()
    base = f"{api.base}/rejected"
    seen, after = [], None
    while True:
        page = requests.get(base, params={"file": "20260101000001", "limit": 3,
                                          **({"after": after} if after else {})}, timeout=10).json()
        seen += page["items"]
        after = page["next_after"]
        if after is None:
            break
    assert [i["line_no"] for i in seen] == list(range(1, 8))
    assert {i["filename"] for i in seen} == {"20260101000001"}
    assert seen[0] | {"id": 0, "created_at": ""} == {
        "id": 0, "created_at": "", "filename": "20260101000001", "stage": "shard-worker", "shard": 1,
        "line_no": 1, "reason": "duplicate", "detail": None, "line": "l1", "line_bytes": 2, "line_truncated": False}
    dup = requests.get(base, params={"reason": "insufficient_balance"}, timeout=10).json()["items"]
    assert len(dup) == 6 and {i["reason"] for i in dup} == {"insufficient_balance"}
    both = requests.get(base, params={"reason": "duplicate", "file": "20260101000002"}, timeout=10).json()
    assert [i["line_no"] for i in both["items"]] == [1, 3, 5, 7] and both["next_after"] is None
    for bad in ({"file": "../x"}, {"reason": "DROP TABLE"}, {"limit": 0}, {"stage": "mysql-sender"},
                {"offset": 5}):
        r = requests.get(base, params=bad, timeout=10)
        assert r.status_code == 400, (bad, r.text)


def _url(text: str):
    from app.config import MySQLURL
    return MySQLURL.parse("MYSQL_PIPELINE_URL", text)


def test_export_fix_and_import_the_rejected_lines_as_a_new_file(tmp_path, pipeline_db, shard_dbs):
    source = tmp_path / "in"
    source.mkdir()
    good = ('{"event_type":4,"payload":{"shop_id":%d,"active":true},"saved_at":"2026-01-03 00:00:00.000",'
            '"timestamp":"2026-01-03 00:00:00.%03d"}')
    lines = [good % (4, 1), (good % (5, 2)).replace('"shop_id":5', '"shop_id":"5"'),
             good % (6, 3), (good % (8, 4)).replace('"shop_id":8,', '')]
    (source / f"20260103000000{ground_truth.SUFFIX}").write_text("\n".join(lines) + "\n")
    pipe = Pipeline(tmp_path / "run", pipeline_db, shard_dbs).start()
    try:
        pipe.import_files(source)
        pipe.wait_loaded(1)
        out_dir = tmp_path / "out"
        out_dir.mkdir()
        env = {**pipe.env, "WORKER_ID": "test/export"}
        done = subprocess.run([sys.executable, "-m", "app.ingest", "--export-rejected", "20260103000000",
                               "--out", str(out_dir)], cwd=servers.ROOT, env=env, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        [exported] = list(out_dir.iterdir())
        assert exported.name.endswith(ground_truth.SUFFIX)
        assert exported.read_text().splitlines() == [lines[1], lines[3]]
        assert str(exported) in done.stdout
        # The operator fixes the lines, then imports the file: a new file, processed as any other.
        exported.write_text(exported.read_text().replace('"shop_id":"5"', '"shop_id":5')
                            .replace('"payload":{"active"', '"payload":{"shop_id":8,"active"'))
        pipe.import_files([exported])
        pipe.wait_loaded(2)
        new = exported.name[: -len(ground_truth.SUFFIX)]
        entries = pipe.api.client().file(new)["shards"]
        assert sum(e["stats"]["shard-worker"]["accepted"] for e in entries) == 2
        assert entries[0]["stats"]["shard-splitter"]["rejected_total"] == 0
        # The original's rows stay: they record what happened to that file.
        assert len(servers.query(pipe.pipeline_db, "SELECT 1 FROM rejected_lines WHERE filename=%s",
                                 ("20260103000000",))) == 2
    finally:
        pipe.stop()


def _aged_rows(url, w: rejected.RejectedWriter, old: int, young: int) -> None:
    """`old` rows of a file created 10 days ago, then `young` rows of now."""
    rows = [("20260101000000", "shard-splitter", -1, n, "malformed_json", None, 3, 0, b"bad")
            for n in range(1, old + young + 1)]
    w.write(rows[:old])
    servers.query(url, "UPDATE rejected_lines SET created_at = NOW(3) - INTERVAL 10 DAY")
    w.write(rows[old:])


def test_rows_older_than_rejected_window_are_pruned_oldest_first_in_bounded_statements(make_database, monkeypatch):
    url = make_database("rej")
    w = rejected.RejectedWriter(url)
    monkeypatch.setattr(rejected, "PRUNE_IDS", 100)
    monkeypatch.setattr(rejected, "PRUNE_STATEMENTS", 4)
    try:
        _aged_rows(url, w, 650, 30)
        assert w.prune(7 * 86400.0) == 400                 # 4 statements of 100 ids, the rest next time
        assert w.prune(7 * 86400.0) == 250                 # stops at the first range holding a young row
        assert servers.query(url, "SELECT COUNT(*), MIN(line_no) FROM rejected_lines") == [(30, 651)]
        assert w.prune(7 * 86400.0) == 0
        assert w.prune(60.0) == 0                         # young rows: within any window over their age
    finally:
        w.close()


def test_the_splitter_prunes_rejected_lines_by_itself(make_database):
    from app.config import Settings
    from app.daemon import Context
    from app.shutdown import StopFlag
    from app.splitter.stage import Splitter

    url = make_database("rej")
    w = rejected.writer(url)
    _aged_rows(url, w, 120, 5)

    class NoIndex:
        def prune_due(self, now):
            return False

    settings = Settings.from_env({"MYSQL_PIPELINE_URL": url.secret_text(), "REJECTED_WINDOW": "3d"})
    splitter = Splitter(settings, index=NoIndex(), client=object())
    ctx = Context(StopFlag(), logging.getLogger("test"))
    try:
        splitter.idle(ctx)
        assert servers.query(url, "SELECT COUNT(*) FROM rejected_lines") == [(5,)]
        assert not w.prune_due()                           # the next pass in PRUNE_EVERY
    finally:
        w.close()


def test_stage_threads_of_one_process_share_the_writer_safely(make_database):
    """Both shards' workers run as threads of one test process and share its writer: their
    flushes must take turns on its one connection."""
    import threading
    url = make_database("rejthreads")
    w = rejected.RejectedWriter(url)
    errors = []

    def flush_many(shard: int) -> None:
        try:
            for n in range(40):
                tee = w.tee(lambda _: None, f"2026010100{n:04d}", "shard-worker", shard)
                for line in range(1, 51):
                    tee(orjson.dumps({"line_no": line, "reason": "malformed", "line": f"bad {line}"}))
                tee.flush()
        except Exception as exc:   # noqa: BLE001 - the test reports any
            errors.append(exc)
    threads = [threading.Thread(target=flush_many, args=(s,)) for s in (0, 1)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert errors == []
        assert servers.query(url, "SELECT COUNT(*) FROM rejected_lines") == [(2 * 40 * 50,)]
    finally:
        w.close()


def _index_pages(url, table: str) -> dict[str, int]:
    servers.query(url, f"ANALYZE TABLE {table}")
    return dict(servers.query(url, "SELECT index_name, stat_value FROM mysql.innodb_index_stats WHERE "
                                   "database_name=DATABASE() AND table_name=%s AND stat_name='size'", (table,)))


def test_a_rejected_row_keeps_its_stage_in_one_byte_in_the_row_and_the_unique_key(make_database):
    """rejected/0002: `stage` an ENUM of the two stages that reject lines, `shard` a TINYINT (the
    VARCHAR took 13-15 bytes in the row and again in the unique key); 2500 short rows take
    fewer pages, and the stage reads, filters and refuses as before."""
    url = make_database("rejbytes")
    w = rejected.RejectedWriter(url)
    try:
        for shard in (0, 1):
            tee = w.tee(lambda _: None, "20260101000001", "shard-worker", shard)
            for n in range(1, 1251):
                tee(orjson.dumps({"line_no": n, "reason": "duplicate", "line": "x"}))
            tee.flush()
        tee = w.tee(lambda _: None, "20260101000001", "shard-splitter", None)
        tee(orjson.dumps({"line_no": 7, "reason": "malformed_json", "line": "{"}))
        tee.flush()
    finally:
        w.close()
    pages = _index_pages(url, "rejected_lines")
    assert pages["PRIMARY"] + pages["uq_rejected_line"] <= 23, pages   # 17 + 9 with a VARCHAR stage
    sql, args = rejected.listing_sql("20260101000001", None, "shard-splitter", None, None, 10)
    rows = servers.query(url, sql.replace("SELECT", "SELECT stage, shard, line_no, '' AS x,", 1), args)
    assert [r[:3] for r in rows] == [("shard-splitter", rejected.NO_SHARD, 7)]
    with pytest.raises(Exception, match="1265|Data truncated"):
        servers.query(url, "INSERT INTO rejected_lines (filename, stage, shard, line_no, reason, line_bytes, line) "
                           "VALUES ('20260101000001', 'mysql-sender', 0, 1, 'x', 1, 'x')")


def test_rejected_0002_keeps_the_rows_of_0001_and_runs_again_from_the_top(make_database):
    from app import db
    url = make_database("rej0002")
    first, second = db.migrations(rejected.SCHEMA)[:2]
    rows = [("20260101000001", "shard-splitter", -1, 3, "malformed_json", "bad", 1, 0, b"{"),
            ("20260101000001", "shard-worker", 1, 3, "duplicate", None, 5, 0, b"\xff\x00abc")]
    conn = db.connect(url)
    try:
        with conn.cursor() as cur:   # a table of 0001 alone (recorded nowhere: adopted below), with rows
            for statement in first.statements():
                cur.execute(statement)
            cur.executemany(rejected.INSERT + "(%s, %s, %s, %s, %s, %s, %s, %s, %s)", rows)
        conn.commit()
        assert [m.version for m in db.migrate(conn, rejected.SCHEMA)] == [1, 2]
        with conn.cursor() as cur:   # once more from its first statement: nothing changes
            for statement in second.statements():
                cur.execute(statement)
    finally:
        conn.close()
    assert servers.query(url, "SELECT column_name, column_type FROM information_schema.columns WHERE "
                              "table_schema=DATABASE() AND table_name='rejected_lines' AND column_name IN "
                              "('stage', 'shard') ORDER BY 1") == [
        ("shard", "tinyint(4)"), ("stage", "enum('shard-splitter','shard-worker')")]
    assert servers.query(url, "SELECT filename, stage, shard, line_no, reason, detail, line_bytes, line_truncated, "
                              "line FROM rejected_lines ORDER BY id") == rows
