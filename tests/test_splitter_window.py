"""The order index's window and pruning (ORDER_INDEX_WINDOW), its compact layout, and the
upgrade from migration 0001, on the real MariaDB."""
from __future__ import annotations

import logging

import pytest

from app import db, layout
from app.config import Settings
from app.daemon import Context, Failed
from app.shutdown import StopFlag
from app.splitter.order_index import ENTRY, OrderIndex, WindowPruned
from app.splitter.stage import Splitter
from app.client import Task
from tests import servers
from tests.test_splitter_routing import ev, split, write_source

WINDOW = 3600.0


def buy(order, shop):
    return ev(1, order_id=order, user_id=1, shop_id=shop, good_id=1, qty=1, price_at_order=1.0)


def ret(order):
    return ev(3, order_id=order, user_id=1, good_id=1, qty=1, refund_amount=1.0)


@pytest.fixture
def index(pipeline_db, shared_dir):
    layout.splitter_dir(shared_dir).mkdir(parents=True)
    idx = OrderIndex(pipeline_db, window=WINDOW, epoch_rows=1)   # every file with purchases: an epoch
    yield idx
    idx.close()


def age(url, filename: str, seconds: float) -> None:
    """As if the file's index had completed (and it was opened) `seconds` ago."""
    servers.query(url, "UPDATE splitter_file SET indexed_at = NOW(3) - INTERVAL %s SECOND, "
                       "opened_at = NOW(3) - INTERVAL %s SECOND WHERE filename = %s", (seconds, seconds, filename))


def rows_by_file(url) -> dict[str, int]:
    """The order index's purchases per file: hot rows of epochs not sealed, and sealed entries."""
    names = dict(servers.query(url, "SELECT file_id, filename FROM splitter_file"))
    found = dict(servers.query(url, "SELECT f.filename, COUNT(*) FROM splitter_order o JOIN splitter_file f "
                                    "ON f.file_id = o.file_id LEFT JOIN splitter_epoch e ON e.epoch = o.epoch "
                                    "WHERE COALESCE(e.sealed, 0) = 0 GROUP BY f.filename"))
    for (entries,) in servers.query(url, "SELECT entries FROM splitter_sealed"):
        for _, file_id, _, _ in ENTRY.iter_unpack(entries):
            found[names[file_id]] = found.get(names[file_id], 0) + 1
    return found


def test_rows_past_two_windows_go_inside_stay_and_routing_inside_the_window_is_unchanged(
        shared_dir, index, pipeline_db):
    old, mid, new = 2**60 + 1, 2**60 + 2, 2**60 + 3
    write_source(shared_dir, "20260101000001", [buy(old, 3)])
    write_source(shared_dir, "20260101000002", [buy(mid, 4)])
    write_source(shared_dir, "20260101000003", [buy(new, 5)])
    for name in ("20260101000001", "20260101000002", "20260101000003"):
        split(shared_dir, index, name)
    age(pipeline_db, "20260101000001", 2 * WINDOW + 60)    # past the window and the re-split grace
    age(pipeline_db, "20260101000002", WINDOW + 60)        # past the window, inside the grace
    # A file first split now sees only files indexed within the window: `new`, not `mid` or `old`.
    write_source(shared_dir, "20260101000009", [ret(new), ret(mid), ret(old)])
    before, out, rec = split(shared_dir, index, "20260101000009")
    assert out == {0: b"", 1: ret(new)}
    assert [(r["line_no"], r["reason"]) for r in rec] == [(2, "unroutable"), (3, "unroutable")]

    assert index.prune() == 1
    assert rows_by_file(pipeline_db) == {"20260101000002": 1, "20260101000003": 1}
    assert index.prune() == 0
    # The same file split again after pruning: the same bytes, the same records.
    assert split(shared_dir, index, "20260101000009")[1:] == (out, rec)
    # Within the window, routing by an earlier file is what it always was.
    write_source(shared_dir, "20260101000010", [ret(new)])
    assert split(shared_dir, index, "20260101000010")[1] == {0: b"", 1: ret(new)}


def test_a_resplit_whose_window_was_pruned_fails_by_name_instead_of_routing_differently(
        shared_dir, index, pipeline_db):
    order = 2**60 + 7
    write_source(shared_dir, "20260101000001", [buy(order, 3)])
    write_source(shared_dir, "20260101000002", [ret(order)])
    split(shared_dir, index, "20260101000001")
    _, out, _ = split(shared_dir, index, "20260101000002")
    assert out == {0: b"", 1: ret(order)}
    age(pipeline_db, "20260101000001", 3 * WINDOW)
    age(pipeline_db, "20260101000002", 3 * WINDOW)
    write_source(shared_dir, "20260101000003", [buy(2**60 + 8, 2)])   # a newer epoch to keep
    split(shared_dir, index, "20260101000003")
    assert index.prune() == 1
    with pytest.raises(WindowPruned, match="ORDER_INDEX_WINDOW"):
        split(shared_dir, index, "20260101000002")
    # A file whose returns need no lookup in the database is not concerned.
    assert split(shared_dir, index, "20260101000003")[1] == {0: buy(2**60 + 8, 2), 1: b""}


def test_the_upgrade_from_0001_keeps_every_row_and_the_routing_of_old_files(shared_dir, make_database):
    url = make_database("upgrade")
    conn = db.connect(url)
    with conn.cursor() as cur:
        for statement in db.migrations("splitter")[0].statements():
            cur.execute(statement)
        cur.execute("INSERT INTO splitter_file (filename, horizon, indexed_seq, indexed_at, purchases) "
                    "VALUES ('20250101000000', 0, 1, NOW(3), 2), ('20250101000001', 1, NULL, NULL, NULL)")
        cur.execute("UPDATE splitter_seq SET value = 1")
        cur.execute("INSERT INTO splitter_order (file_id, line, order_id, shop_id) VALUES (1, 1, 77, 3), (1, 2, 78, 4)")
    conn.close()
    layout.splitter_dir(shared_dir).mkdir(parents=True)
    idx = OrderIndex(url, window=WINDOW)
    try:
        idx.ensure_schema()
        assert servers.query(url, "SELECT epoch, order_id, file_id, line, shop_id FROM splitter_order "
                                  "ORDER BY order_id") == [(0, 77, 1, 1, 3), (0, 78, 1, 2, 4)]
        assert servers.query(url, "SELECT version FROM schema_migrations WHERE component = 'splitter' "
                                  "ORDER BY version") == [(1,), (2,), (3,), (4,)]
        # A file first split before the upgrade keeps its horizon and sees the old rows (floor 0).
        write_source(shared_dir, "20250101000001", [ret(78), ret(77)])
        _, out, rec = split(shared_dir, idx, "20250101000001")
        assert out == {0: ret(78), 1: ret(77)} and rec == []
        # A new file sees them too: their file was indexed within the window.
        write_source(shared_dir, "20250101000002", [ret(77)])
        _, out, rec = split(shared_dir, idx, "20250101000002")
        assert out == {0: b"", 1: ret(77)} and rec == []
    finally:
        idx.close()


def test_pruning_runs_by_itself_when_the_splitter_is_idle_and_after_a_file(shared_dir, pipeline_db):
    settings = Settings.from_env({"MYSQL_PIPELINE_URL": pipeline_db.secret_text(), "SHARED_DIR": str(shared_dir),
                                  "ORDER_INDEX_WINDOW": "1h"})
    assert settings.order_index_window == 3600.0
    layout.splitter_dir(shared_dir).mkdir(parents=True)
    idx = OrderIndex(pipeline_db, window=settings.order_index_window, epoch_rows=1, prune_every=0.0)
    stage = Splitter(settings, index=idx, client=object())
    ctx = Context(StopFlag(), logging.getLogger("test"))
    try:
        stage.setup(ctx)
        for n in (1, 2):
            write_source(shared_dir, f"2026010100000{n}", [buy(2**60 + n, n)])
            outcome = stage.process([Task(f"2026010100000{n}", 0), Task(f"2026010100000{n}", 1)], ctx)
            assert [type(o).__name__ for o in outcome] == ["Done", "Done"]
        age(pipeline_db, "20260101000001", 3 * 3600)
        stage.idle(ctx)
        assert rows_by_file(pipeline_db) == {"20260101000002": 1}
        age(pipeline_db, "20260101000002", 3 * 3600)
        write_source(shared_dir, "20260101000003", [buy(2**60 + 3, 3)])
        stage.process([Task("20260101000003", 0), Task("20260101000003", 1)], ctx)
        assert rows_by_file(pipeline_db) == {"20260101000003": 1}
        # A re-split that would need pruned rows fails its tasks with the reason, nothing else.
        write_source(shared_dir, "20260101000002", [buy(2**60 + 2, 2), ret(2**60 + 1)])
        assert all(isinstance(o, Failed) and "pruned" in o.reason
                   for o in stage.process([Task("20260101000002", 0), Task("20260101000002", 1)], ctx))
    finally:
        stage.teardown()


def test_settings_refuse_a_window_that_is_not_a_duration():
    from app.config import ConfigError
    assert Settings.from_env({}).order_index_window == 7 * 86400.0
    assert Settings.from_env({"ORDER_INDEX_WINDOW": "30d"}).order_index_window == 30 * 86400.0
    with pytest.raises(ConfigError, match="ORDER_INDEX_WINDOW"):
        Settings.from_env({"ORDER_INDEX_WINDOW": "soon"})
