"""One of each piece of database plumbing (app/db.py): the multi-statement batch runner and the
transaction built on it, the reconnecting connection, the error codes a refused LOAD DATA LOCAL
answers with (the splitter's order index and the sender's loader share one set)."""
from __future__ import annotations

import shutil

import pymysql
import pymysql.cursors
import pytest

from app import db
from app.splitter.order_index import OrderIndex
from tests import servers


@pytest.fixture
def table(make_database):
    url = make_database("plumb")
    conn = db.connect(url, multi_statements=True)
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE t (id INT AUTO_INCREMENT PRIMARY KEY, v VARCHAR(32)) ENGINE=InnoDB")
    yield url, conn
    conn.close()


def test_a_script_answers_per_tag_across_round_trips(table):
    url, conn = table
    script = db.Script(max_bytes=60)  # a few statements per round trip
    script.add("insert", [f"INSERT INTO t (v) VALUES ('{n}')" for n in range(7)])
    script.add("pct", "INSERT INTO t (v) VALUES (%s)", ("50%s %d",))
    script.add("read", "SELECT v FROM t WHERE v LIKE %s ORDER BY id", ("5%",))
    script.add("update", "UPDATE t SET v = CONCAT(v, '!') WHERE id <= 3")
    with conn.cursor() as cur:
        got = script.run(cur)
    assert got["insert"].rowcount == 7 and got["insert"].rows == []
    assert got["pct"].rowcount == 1 and got["pct"].lastrowid == 8
    assert got["read"].rows == [("5",), ("50%s %d",)]   # the '%' in a value stays as sent
    assert got["update"] == db.Result([], 3, got["update"].lastrowid)
    assert servers.query(url, "SELECT COUNT(*) FROM t") == [(8,)]


def test_a_scripts_failing_statement_is_named_in_its_error_with_the_servers_code(table):
    """The server stops a script at its first failing statement; the error says which one (its
    tag, its place, its kind) and keeps the server's class and code, whether it fails in the
    first statement of a round trip or a later one. The connection stays usable."""
    url, conn = table
    servers.query(url, "INSERT INTO t (id, v) VALUES (5, 'five')")
    script = db.Script()
    script.add("first", "INSERT INTO t (v) VALUES ('a')")
    script.add("clash", "INSERT INTO t (id, v) VALUES (%s, %s)", (5, "secret value"))
    script.add("never", "INSERT INTO t (v) VALUES ('c')")
    with conn.cursor() as cur, pytest.raises(pymysql.err.IntegrityError) as raised:
        script.run(cur)
    code, message = raised.value.args
    assert code == 1062 and "Duplicate entry" in message
    assert "script statement 2 of 3, 'clash': INSERT INTO t ..." in message
    assert "secret value" not in message    # the statement's kind, never its values
    conn.rollback()

    script.add("missing", "SELECT v FROM no_such_table")
    script.add("after", "SELECT 1")
    with conn.cursor() as cur, pytest.raises(pymysql.err.ProgrammingError) as raised:
        script.run(cur)
    assert raised.value.args[0] == 1146
    assert "script statement 1 of 2, 'missing': SELECT v FROM no_such_table ..." in raised.value.args[1]
    conn.rollback()
    with conn.cursor() as cur:   # usable; the statement before the failing one ran (autocommit)
        cur.execute("SELECT v FROM t ORDER BY id")
        assert cur.fetchall() == (("five",), ("a",))


def test_a_script_loads_rows_from_memory_among_its_statements_and_counts_what_went_in(table):
    """Two LOAD DATA LOCAL files in one script, each answered with its own bytes; a duplicate
    key is skipped (the count says so) and is no error."""
    url, _ = table
    conn = db.connect(url, local_infile=True, multi_statements=True)
    try:
        script = db.Script()
        script.add("insert", "INSERT INTO t (id, v) VALUES (1, 'a')")
        script.load("loaded", "LOAD DATA LOCAL INFILE 'one' INTO TABLE t (id, v)", "one", b"2\tb\n3\tc\n")
        script.add("read", "SELECT COUNT(*) FROM t")
        script.load("loaded", "LOAD DATA LOCAL INFILE 'two' INTO TABLE t (id, v)", "two", b"3\tdup\n4\td\n")
        with conn.cursor() as cur:
            got = script.run(cur)
        assert got["loaded"].rowcount == 3 and got["read"].rows == [(3,)] and conn.offered is None
        assert servers.query(url, "SELECT id, v FROM t ORDER BY id") == [(1, "a"), (2, "b"), (3, "c"), (4, "d")]
        with pytest.raises(ValueError):
            script.load("x", "LOAD DATA LOCAL INFILE 'one' INTO TABLE t (id, v)", "one", b"")
            script.load("x", "LOAD DATA LOCAL INFILE 'one' INTO TABLE t (id, v)", "one", b"")
    finally:
        conn.close()


def test_a_loaded_value_the_server_would_only_warn_about_fails_the_script(table):
    """A LOCAL load stores a value out of range (or a line short of columns) with a warning
    where an INSERT in strict mode fails: the script raises, after reading every result (the
    connection stays usable), and the transaction can be rolled back."""
    url, _ = table
    conn = db.connect(url, local_infile=True, multi_statements=True)
    try:
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE n (id INT PRIMARY KEY, amount DECIMAL(5,2) NOT NULL)")
        for data in (b"1\t12345678.5\n", b"1\n", b"1\tx\n"):
            conn.begin()
            script = db.Script()
            script.load("n", "LOAD DATA LOCAL INFILE 'n' INTO TABLE n (id, amount)", "n", data)
            script.add("after", "SELECT 1")
            with conn.cursor() as cur:
                with pytest.raises(db.LoadWarnings):
                    script.run(cur)
            conn.rollback()
            assert servers.query(url, "SELECT COUNT(*) FROM n") == [(0,)]
        with pytest.raises(TypeError):   # a connection that cannot send local data
            script = db.Script()
            script.load("n", "LOAD DATA LOCAL INFILE 'n' INTO TABLE n (id, amount)", "n", b"1\t1\n")
            with table[1].cursor() as cur:
                script.run(cur)
    finally:
        conn.close()


def test_a_transaction_answers_per_statement_and_commits_or_rolls_back_with_its_last_batch(table):
    url, conn = table
    with conn.cursor(pymysql.cursors.DictCursor) as cur:
        tx = db.Transaction(cur)
        first = tx.run(("INSERT INTO t (v) VALUES (%s)", ("a",)), ("SELECT COUNT(*) n FROM t", None))
        assert first[0].rowcount == 1 and first[0].lastrowid == 1 and first[1].one() == {"n": 1}
        assert servers.query(url, "SELECT COUNT(*) FROM t") == [(0,)]   # not committed yet
        done = tx.finish(("UPDATE t SET v = %s WHERE id = %s", ("b", 1)))
        assert [r.rowcount for r in done] == [1] and tx.closed and not tx.open
        assert servers.query(url, "SELECT v FROM t") == [("b",)]
        tx = db.Transaction(cur)
        tx.run(("DELETE FROM t", None))
        tx.finish(commit=False)
    assert servers.query(url, "SELECT v FROM t") == [("b",)]


def test_a_call_in_a_script_answers_its_result_set_and_the_statements_after_it_their_own(table):
    """A stored procedure's CALL answers its result set and then an OK of its own: the script
    reads both, so the statements after it (in the same packet) get their own results, and the
    connection is left with nothing unread."""
    url, conn = table
    with conn.cursor() as cur:
        cur.execute("CREATE PROCEDURE two_rows(IN p VARCHAR(32)) BEGIN INSERT INTO t (v) VALUES (p), (p);"
                    " SELECT id, v FROM t WHERE v = p ORDER BY id; END")
    with conn.cursor(pymysql.cursors.DictCursor) as cur:
        tx = db.Transaction(cur)
        got = tx.finish((db.Call("CALL two_rows(%s)"), ("x",)), ("SELECT COUNT(*) n FROM t", None),
                        ("INSERT INTO t (v) VALUES (%s)", ("y",)))
        assert got[0].rows == [{"id": 1, "v": "x"}, {"id": 2, "v": "x"}]
        assert got[1].one() == {"n": 2}
        assert got[2].rowcount == 1 and got[2].lastrowid == 3
        assert not conn._result.has_next   # the COMMIT's OK was read: nothing pending
    assert servers.query(url, "SELECT v FROM t ORDER BY id") == [("x",), ("x",), ("y",)]


def _kill(url, conn) -> None:
    servers.query(url, f"KILL CONNECTION {conn.thread_id()}")


def test_a_reconnecting_connection_comes_back_after_the_server_dropped_it(table):
    url, _ = table
    opened = []
    connection = db.Reconnecting(url, check_after=0, on_open=opened.append)
    first = connection.get()
    assert connection.get() is first and opened == [first]
    _kill(url, first)
    second = connection.get()
    assert second is not first and opened == [first, second]
    with second.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM t")
        assert cur.fetchone() == (0,)
    connection.discard()
    assert connection.conn is None and connection.get() is not second


def test_an_unchecked_connection_is_replaced_only_when_its_owner_says_so(table):
    url, _ = table
    connection = db.Reconnecting(url, check_after=None)
    first = connection.get()
    _kill(url, first)
    assert connection.get() is first      # no ping per use: the owner sees the error ...
    with pytest.raises(pymysql.err.OperationalError):
        with first.cursor() as cur:
            cur.execute("SELECT 1")
    connection.discard()                   # ... and drops it
    assert connection.get() is not first


def test_one_thread_finding_the_server_gone_has_every_thread_check_its_connection(table):
    """The API's threads each keep a connection, checked when idle a second; after a restart
    of the server within that second, a thread whose connection was not checked answered its
    next request 503 (seen in the outage test on a loaded machine)."""
    import threading
    url, _ = table
    conns = db.ThreadConnections(url, check_after=3600)
    other = threading.Event()
    done = threading.Event()
    result = {}

    def thread_b():
        first = conns.get()
        result["first"] = first
        other.set()
        done.wait(10)
        again = conns.get()
        with again.cursor() as cur:
            cur.execute("SELECT 1")
            result["answer"] = cur.fetchone()
        result["again"] = again
    b = threading.Thread(target=thread_b)
    b.start()
    assert other.wait(10)
    _kill(url, result["first"])               # the server dropped B's connection
    mine = conns.get()                        # this thread meets the error and says so
    _kill(url, mine)
    with pytest.raises(pymysql.err.OperationalError):
        with mine.cursor() as cur:
            cur.execute("SELECT 1")
    conns.discard()
    done.set()
    b.join(10)
    assert result["answer"] == (1,) and result["again"] is not result["first"]


def test_a_new_connection_whose_preparation_fails_is_closed_and_not_kept(table):
    url, _ = table
    seen = []

    def prepare(conn):
        seen.append(conn)
        raise RuntimeError("schema refused")
    connection = db.Reconnecting(url, on_open=prepare)
    with pytest.raises(RuntimeError):
        connection.get()
    assert connection.conn is None and not seen[0].open


@pytest.fixture
def refusing_index():
    """(url, order index) on a private MariaDB started with local_infile off, which answers
    LOAD DATA LOCAL with error 4166; the server stopped and removed after the test."""
    server = servers.new_private_mariadb(["--local-infile=0"])
    try:
        url = server.url("pipeline_db")
        db.ensure_database(url)
        index = OrderIndex(url)
        index.ensure_schema()
        yield url, index
        index.close()
    finally:
        server.stop()
        shutil.rmtree(server.datadir, ignore_errors=True)


def test_the_order_index_falls_back_to_inserts_where_the_server_refuses_local_infile(refusing_index):
    """MariaDB started with local_infile off answers LOAD DATA LOCAL with error 4166, which the
    order index did not know (its own set said 1148, 3948, 2068): it failed the split instead of
    indexing with INSERTs as the sender's loader, knowing 4166, did."""
    url, index = refusing_index
    chunk = b"".join(b"%d\t1\t%d\t%d\n" % (order, line, order % 7) for line, order in enumerate(range(100, 130), 1))
    index.load("orders.tsv", chunk)
    assert index.use_infile is False
    assert servers.query(url, "SELECT COUNT(*), SUM(shop_id) FROM splitter_order") == \
        [(30, sum(o % 7 for o in range(100, 130)))]


@pytest.mark.parametrize("code", sorted(db.LOCAL_INFILE_REFUSED))
def test_one_set_of_local_infile_refusals_for_every_loader(code):
    from app.sender import loader
    from app.splitter import order_index
    assert not hasattr(loader, "LOCAL_INFILE_REFUSED") and not hasattr(order_index, "INFILE_REFUSED")
    assert code in db.LOCAL_INFILE_REFUSED


def _plain(url):
    """PyMySQL's own connection, as db.connect opens one, to compare results with."""
    return pymysql.connections.Connection(host=url.host, port=url.port, user=url.user, password=url.password,
                                          database=url.database, charset="utf8mb4", ssl_disabled=True,
                                          client_flag=pymysql.constants.CLIENT.MULTI_STATEMENTS,
                                          init_command="SET time_zone = '+00:00'")


_SHAPES = [
    "SELECT id, v FROM t ORDER BY id",
    "SELECT v AS id, id AS v FROM t ORDER BY id",          # the same names, other types
    "SELECT id AS x, CAST(v AS BINARY) AS y, JSON_OBJECT('v', v) AS z, NULL AS n FROM t ORDER BY id",
    "SELECT CAST(id AS DECIMAL(18,2)) AS x, CAST('2026-01-02 03:04:05.678' AS DATETIME(3)) AS y, "
    "CAST(id AS CHAR) AS z, CAST(id AS DOUBLE) AS n FROM t ORDER BY id",
    "SELECT COUNT(*), GROUP_CONCAT(v ORDER BY id SEPARATOR ' ') FROM t",
    "SELECT id, v FROM t WHERE id < 0",
]


@pytest.mark.parametrize("local_infile", [False, True])
def test_column_descriptions_are_parsed_once_per_shape_and_answer_as_pymysqls_own(table, monkeypatch, local_infile):
    """A connection of db.connect parses a result shape's column descriptors once (PyMySQL
    parses each column of every result in Python: a fifth of a small file's worker CPU); the
    rows, types, descriptions and field names are what PyMySQL's own connection gives, for
    shapes of the same width and names but other types, in one script and in separate
    statements, with a dict cursor and an unbuffered one."""
    url, conn = table
    with conn.cursor() as cur:
        cur.execute("INSERT INTO t (v) VALUES ('a'), ('1.5'), (NULL), ('é')")
    parsed = []
    real = pymysql.protocol.FieldDescriptorPacket.__init__
    monkeypatch.setattr(pymysql.protocol.FieldDescriptorPacket, "__init__",
                        lambda self, *a: parsed.append(1) or real(self, *a))
    plain, ours = _plain(url), db.connect(url, multi_statements=True, local_infile=local_infile)

    def answers(c, cursor=pymysql.cursors.Cursor):
        got = []
        with c.cursor(cursor) as cur:
            for sql in _SHAPES:
                cur.execute(sql)
                got.append((cur.fetchall(), cur.description))
            cur.execute(";".join(_SHAPES))
            while True:
                got.append((cur.fetchall(), cur.description))
                if not cur.nextset():
                    break
        return got
    try:
        for cursor in (pymysql.cursors.Cursor, pymysql.cursors.DictCursor, pymysql.cursors.SSCursor):
            want = answers(plain, cursor)
            for _ in range(3):
                assert answers(ours, cursor) == want
        del parsed[:]
        answers(plain)
        columns = len(parsed)
        del parsed[:]
        for _ in range(5):
            answers(ours)
        assert columns > 20 and parsed == []
        ours._descriptions.clear()
        answers(ours)
        assert 0 < len(parsed) < columns   # each shape once (the script repeats them)
    finally:
        plain.close()
        ours.close()


def test_an_error_after_a_remembered_shape_still_fails_its_statement(table):
    url, conn = table
    with conn.cursor() as cur:
        cur.execute("SELECT id, v FROM t")
        cur.execute("SELECT id, v FROM t")
        with pytest.raises(pymysql.err.OperationalError, match="nope"):
            cur.execute("SELECT id, v FROM t; SELECT nope FROM t")
            while cur.nextset():
                pass
        cur.execute("SELECT COUNT(*) FROM t")
        assert cur.fetchall() == ((0,),)


def test_a_refused_completion_load_splits_again_with_inserts(refusing_index):
    """A file's completion loads its last chunk with LOAD DATA LOCAL on the bookkeeping
    connection: refused there (local_infile off), nothing of the file is written, the split is
    to run again (InfileRefused, retryable) and runs with INSERTs, the index complete."""
    from app.daemon import Retryable
    from app.splitter.order_index import InfileRefused
    url, index = refusing_index
    routing = index.open_file("20260101000001", defer=True)
    for line in range(1, 4):
        routing.add_purchase(1000 + line, 7, line)
    with pytest.raises(InfileRefused) as refused:
        routing.finish()
    routing.abort()
    assert isinstance(refused.value, Retryable) and index.use_infile is False
    assert servers.query(url, "SELECT COUNT(*) FROM splitter_file") == [(0,)]
    routing = index.open_file("20260101000001", defer=True)
    for line in range(1, 4):
        routing.add_purchase(1000 + line, 7, line)
    routing.finish()
    assert servers.query(url, "SELECT filename, indexed_seq, purchases FROM splitter_file") == \
        [("20260101000001", 1, 3)]
    assert servers.query(url, "SELECT order_id, line, shop_id FROM splitter_order ORDER BY line") == \
        [(1001, 1, 7), (1002, 2, 7), (1003, 3, 7)]
