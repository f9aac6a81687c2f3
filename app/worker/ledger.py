"""Money of the shard workers: one balance per user across all shards, debits and credits
keyed by order (see docs/business-rules.md).

A batch locks the balances it may touch (ascending user_id, so two shard workers wait for each
other instead of both spending the same money), decides in memory, and writes the new balances
with its orders in the same transaction. New users go to `worker_balances_young` and move to
`worker_balances` in key order later (`seal`, db/migrations/worker/0007): the two workers'
interleaved inserts of new users would split worker_balances' pages. One `worker_orders` row per order makes every money
movement idempotent; a concurrent writer of the same order or user is detected and the batch is
decided again. The statements are built here and sent in the batch's scripts (`db.Script`).
"""
from __future__ import annotations

import bisect
from decimal import Decimal

import pymysql

from .. import db
from .rules import Order, buyer_of

# worker_orders.state
REJECTED, DEBITED, CREDITED = 0, 1, 2
ORDER_INSERT = "INSERT INTO worker_orders (shard, file_id, line, order_id, shop_id, buyer, qty, amount, state) VALUES "
# Credits on earlier orders: an UPDATE through the order id (the row is there, read by this
# batch), where an INSERT ... ON DUPLICATE KEY UPDATE of the whole row first tried to insert it
# (9.0 -> 7.4 µs of server CPU a credit; the orders' statements, docs/performance.md).
CREDIT_UPDATE = f"UPDATE worker_orders SET state={CREDITED:d} WHERE state={DEBITED:d} AND order_id IN ("
# Every balance, wherever it is (tools and tests; the worker itself reads only its batch's users).
ALL_BALANCES = ("SELECT user_id, balance FROM worker_balances "
                "UNION ALL SELECT user_id, balance FROM worker_balances_young")
# New users' balances start young (see `seal`).
SQL_NEW_BALANCES = "INSERT INTO worker_balances_young (user_id, balance) VALUES "
# The newest users (by id) stay young: the range both workers may still be creating users in.
YOUNG_KEEP = 10_000
# A worker tries a sealing pass after creating this many users since its last one.
SEAL_AFTER = 5_000
# Where a batch's balances are: the tag `lock_sql` gives each table's row, and the table.
MAIN, YOUNG = 0, 1
TABLES = {MAIN: "worker_balances", YOUNG: "worker_balances_young"}



class LedgerConflict(Exception):
    """Another worker wrote one of this batch's orders or users first: decide again."""


def _number(amount: Decimal) -> str:
    """A finite Decimal as an SQL number: `str` (three times cheaper than `format`) unless it
    prints in exponent form or is not finite."""
    text = str(amount)
    if "E" in text or not text[-1].isdigit():
        if not amount.is_finite():
            raise ValueError(f"not a finite amount: {amount}")
        return format(amount, "f")
    return text


def _order_id(o: Order) -> str:
    return "%d" % o.order_id


_ORDER_ROW = "%d\t%d\t%d\t%d\t%d\t%d\t%s\t%d\n"
_BALANCE_ROW = "%d\t%s\n"


def _plain(text: str) -> bool:
    """Whether `text` (rows of ints and `str` of Decimals) has no amount in exponent form
    ("1E+3") and none infinite or NaN: then every `str` printed what `_number` prints."""
    return "E" not in text and "I" not in text and "N" not in text


def order_rows(orders: list[Order], file_id: int) -> bytes:
    """The `worker_orders` LOAD DATA rows of `orders` (file_id, line, order_id, shop_id, buyer,
    qty, amount, state), rendered in one format of the chunk's values as the prepared lines are
    (a format per row cost 0.25 µs more per order); `_number`'s per-amount checks only when the
    text shows an amount they would change."""
    values: list = []
    add = values.extend
    for o in orders:
        add(o.stored_at or (file_id, o.line))
        add((o.order_id, o.shop_id, buyer_of(o.user_id, o.good_id) if o.buyer is None else o.buyer, o.qty, o.amount,
             REJECTED if not o.debited else DEBITED if o.credit is None else CREDITED))
    text = (_ORDER_ROW * len(orders)) % tuple(values)
    if not _plain(text):
        values[6::8] = map(_number, values[6::8])
        text = (_ORDER_ROW * len(orders)) % tuple(values)
    return text.encode()


def balance_rows(users: list[int], balances: dict[int, Decimal]) -> bytes:
    """The `worker_balances` LOAD DATA rows (user_id, balance) of `users`, as `order_rows`."""
    values: list = []
    add = values.append
    for u in users:
        add(u)
        add(balances[u])
    text = (_BALANCE_ROW * len(users)) % tuple(values)
    if not _plain(text):
        values[1::2] = map(_number, values[1::2])
        text = (_BALANCE_ROW * len(users)) % tuple(values)
    return text.encode()


def _locking_read(conn, tag: int, ids: list[int]) -> str:
    """One balance table's part of `Ledger.lock_sql`: `ids` (ascending) locked and packed."""
    return (f"(SELECT {tag:d}, COUNT(*), GROUP_CONCAT(user_id, ' ', balance ORDER BY user_id SEPARATOR ' ') "
            f"FROM {TABLES[tag]} FORCE INDEX (PRIMARY) WHERE user_id IN {db.sql_list(conn, ids)} FOR UPDATE)")


class Ledger:
    def __init__(self, opening_balance: Decimal):
        self.opening = opening_balance
        # `worker_ledger.sealed_below` as the last locking read answered it: no user above it is
        # in worker_balances (None: not read yet, every user looked up there too)
        self.bound: int | None = None
        self.young: set[int] = set()    # users of the last `balances` in worker_balances_young
        # users created since the last sealing pass; a process starts due, so a worker restarted
        # more often than it creates SEAL_AFTER users still seals
        self.created = SEAL_AFTER

    # -- orders ---------------------------------------------------------------------------------

    @staticmethod
    def orders_sql(conn, order_ids) -> str:
        return ("SELECT order_id, shop_id, buyer, qty, amount, state, file_id, line "
                "FROM worker_orders WHERE order_id IN " + db.sql_list(conn, order_ids))

    @staticmethod
    def parse_orders(rows) -> dict[int, Order]:
        """Orders as the ledger keeps them: no user or good (their digest, `buyer`), and only
        whether a credit happened (`credit` True), not its amount."""
        return {r[0]: Order(r[0], None, r[4], r[1], None, r[3], r[5] != REJECTED, True if r[5] == CREDITED else None,
                            stored_at=(r[6], r[7]), buyer=r[2])
                for r in rows}

    @classmethod
    def orders(cls, cur, order_ids) -> dict[int, Order]:
        if not order_ids:
            return {}
        cur.execute(cls.orders_sql(cur.connection, order_ids))
        return cls.parse_orders(cur.fetchall())

    # -- balances -------------------------------------------------------------------------------

    def lock_sql(self, conn, users) -> str:
        """Lock the users' balance rows until the transaction ends (a range scan of each
        table's primary key: ascending user_id), after a shared lock on `worker_ledger`'s row
        (the sealing pass takes it exclusive: no user moves between the tables, or is sealed
        while this batch takes it for new), one statement. The balances come back packed in one
        row a table, (table, count, "user balance user balance ..."): thousands of rows decoded one by one
        by PyMySQL cost the worker more than deciding them (`balances` checks the count, so a
        text cut short by group_concat_max_len, which `WorkerState` raises on its connection,
        cannot go unnoticed). The primary key is forced: a young table the optimizer takes for
        small is otherwise scanned whole, and a locking scan waits for every row the other shard
        worker has locked, matching or not (the two workers took turns).
        `worker_balances` is read only for users at or below the ledger's bound as this worker
        last read it (`self.bound`: no user above the bound is there, and most of a fresh
        file's users are new, above it); the ledger's row answers the bound under its lock, and
        `balances` reads again the users a pass sealed since (`recheck_sql`)."""
        ordered = sorted(users)
        bound = self.bound
        sealed = ordered if bound is None else ordered[:bisect.bisect_right(ordered, bound)]
        parts = ["(SELECT -1, sealed_below, NULL FROM worker_ledger WHERE id = 1 LOCK IN SHARE MODE)"]
        for tag, ids in ((MAIN, sealed), (YOUNG, ordered)):
            if ids:
                parts.append(_locking_read(conn, tag, ids))
        return " UNION ALL ".join(parts)

    def balances(self, rows, users, cur) -> tuple[dict[int, Decimal], set[int]]:
        """The locked balances (the rows `lock_sql` answers), and the users not in either table
        yet (they start with OPENING_BALANCE; `write` inserts them into the young table, and a
        concurrent creator makes that fail). Which users are young is kept for `add_writes`.
        Users `lock_sql` did not look for in `worker_balances` whom a pass may have moved there
        since this worker last read the bound (between the bound it used and the one the
        ledger's row answered now, found in neither table) are read there with `cur`, in the
        same transaction and under the same shared lock."""
        balances: dict[int, Decimal] = {}
        young: set[int] = set()
        used, answered = self.bound, None
        rows = list(rows)
        for n in (0, 1):
            for tag, count, packed in rows:
                if tag == -1:
                    answered = count
                    continue
                if not count:
                    continue
                parts = (packed.decode() if type(packed) is bytes else packed).split(" ")
                if len(parts) != 2 * count:
                    raise ValueError(f"balances of {count} users came back as {len(parts)} fields: "
                                     "is group_concat_max_len too small?")
                found = dict(zip(map(int, parts[0::2]), map(Decimal, parts[1::2])))
                if tag == YOUNG:
                    young.update(found)
                if balances.keys() & found.keys():
                    raise ValueError(f"users in both balance tables: {sorted(balances.keys() & found.keys())[:5]}")
                balances.update(found)
            if n or answered is None:
                break
            self.bound = answered
            if used is None or answered <= used:
                break
            missed = [u for u in users if used < u <= answered and u not in balances]
            if not missed:
                break
            cur.execute(self.recheck_sql(cur.connection, missed))
            rows = cur.fetchall()
        new = {u for u in users if u not in balances}
        balances.update((u, self.opening) for u in new)
        self.young = young
        return balances, new

    @staticmethod
    def recheck_sql(conn, users) -> str:
        """`worker_balances`' locking read of `users` alone (`balances`)."""
        return _locking_read(conn, MAIN, sorted(users))

    def create_users(self, cur, users) -> None:
        """Insert new users now, so they are locked too (a batch decided again after a conflict)."""
        try:
            db.insert_rows(cur, SQL_NEW_BALANCES, [(u, self.opening) for u in sorted(users)])
            self.young |= set(users)
            self.created += len(users)
        except pymysql.err.IntegrityError as exc:
            if exc.args and exc.args[0] == db.DUP_ENTRY:
                raise LedgerConflict("a new user was created by another worker meanwhile") from exc
            raise

    # -- the batch's writes --------------------------------------------------------------------------

    def add_writes(self, script, conn, shard: int, file_id: int, new: list[Order], credited: list[Order],
                   balances: dict[int, Decimal], changed: set[int], new_users: set[int], infile: bool = True) -> None:
        """The batch's writes, by tag: "orders" (this batch's orders and credits on earlier
        ones, whose affected-row count must be `expected_orders`), "users" (users created by
        this batch, whose count must be `expected_users`: a duplicate means a concurrent
        creator) and "balances" (users this batch locked). Rows go in by LOAD DATA LOCAL
        (`db.Script.load`): the server parses a row for less than its INSERT text (a ledger
        row 6.4 -> 5.1 µs of server CPU, bench/worker_state_sql.py); `infile` False (the server
        refuses LOAD DATA LOCAL): by INSERTs, a new user's duplicate failing its statement.
        New users go to worker_balances_young, the others to the table `balances` found them in."""
        def order_row(o: Order) -> str:
            at_file, at_line = o.stored_at or (file_id, o.line)
            return "%d\t%d\t%d\t%d\t%d\t%d\t%s\t%d\n" % (
                at_file, at_line, o.order_id, o.shop_id, buyer_of(o.user_id, o.good_id) if o.buyer is None
                else o.buyer, o.qty, _number(o.amount),
                REJECTED if not o.debited else DEBITED if o.credit is None else CREDITED)

        def values_row(o: Order) -> str:   # the order as `ORDER_INSERT`'s (...)
            return "(%d,%s)" % (shard, order_row(o)[:-1].replace("\t", ","))

        def balance_values(u: int) -> str:
            return "(%d,%s)" % (u, _number(balances[u]))
        # A new order written meanwhile by another worker is skipped (0 rows, where its line
        # counts 1) and a credit changes only a debited order (1 row), so the count is
        # `expected_orders` only if every order went in and every credit happened.
        if not infile:
            script.add("orders", db.insert_statements(conn, ORDER_INSERT, new,
                                                      " ON DUPLICATE KEY UPDATE order_id=order_id", render=values_row))
            script.add("users", db.insert_statements(conn, SQL_NEW_BALANCES, sorted(changed & new_users),
                                                     render=balance_values))
            for table, users in ((TABLES[MAIN], sorted(changed - new_users - self.young)),
                                 (TABLES[YOUNG], sorted((changed - new_users) & self.young))):
                script.add("balances", db.insert_statements(conn, f"INSERT INTO {table} (user_id, balance) VALUES ",
                                                            users, " ON DUPLICATE KEY UPDATE balance=VALUES(balance)",
                                                            render=balance_values))
        elif new:
            script.load("orders", "LOAD DATA LOCAL INFILE 'worker_orders' INTO TABLE worker_orders (file_id, line, "
                                  f"order_id, shop_id, buyer, qty, amount, state) SET shard={shard:d}",
                        "worker_orders", order_rows(new, file_id))
        script.add("orders", db.insert_statements(conn, CREDIT_UPDATE, credited, ")", render=_order_id))
        created = sorted(changed & new_users)
        self.created += len(created)
        if created and infile:   # a user another worker created meanwhile is skipped: `expected_users`
            script.load("users", "LOAD DATA LOCAL INFILE 'worker_users' INTO TABLE worker_balances_young "
                                 "(user_id, balance)", "worker_users", balance_rows(created, balances))
        updated = changed - new_users if infile else set()
        for table, users in ((TABLES[MAIN], sorted(updated - self.young)),
                             (TABLES[YOUNG], sorted(updated & self.young))):
            if users:   # rows this batch locked: REPLACE updates each in place (the key is the only index)
                script.load("balances", f"LOAD DATA LOCAL INFILE '{table}' REPLACE INTO TABLE {table} "
                                        "(user_id, balance)", table, balance_rows(users, balances))

    @staticmethod
    def expected_users(changed: set[int], new_users: set[int]) -> int:
        """Rows the users load inserts when no other worker created one of them meanwhile."""
        return len(changed & new_users)

    @staticmethod
    def expected_orders(new: list[Order], credited: list[Order]) -> int:
        """Rows the orders statements change when nobody else wrote them: 1 per inserted order,
        1 per credit recorded on an existing one."""
        return len(new) + len(credited)

    # -- sealing ---------------------------------------------------------------------------------

    def seal(self, conn, keep: int = YOUNG_KEEP) -> int:
        """Move the young users below the newest `keep` ids to worker_balances, in key order (so
        they are appended there and its pages stay full), in one transaction that holds
        `worker_ledger`'s row exclusive: it waits for the batches reading balances to commit
        and they wait for it. Users moved. Called after files, once this worker created
        SEAL_AFTER users since its last pass (`due`)."""
        self.created = 0
        with conn.cursor() as cur:
            conn.begin()
            try:
                cur.execute("SELECT sealed_below FROM worker_ledger WHERE id = 1 FOR UPDATE")
                if cur.fetchone() is None:
                    raise RuntimeError("worker_ledger has no row: run the worker migrations (0007)")
                cur.execute("SELECT MAX(user_id) FROM worker_balances_young")
                newest = cur.fetchone()[0]
                moved = 0
                if newest is not None and newest - keep > -(1 << 63):
                    below = newest - keep
                    cur.execute("INSERT INTO worker_balances (user_id, balance) SELECT user_id, balance "
                                "FROM worker_balances_young WHERE user_id < %s ORDER BY user_id", (below,))
                    moved = cur.execute("DELETE FROM worker_balances_young WHERE user_id < %s", (below,))
                    # never lowered: `lock_sql` takes every user above it for not in worker_balances
                    cur.execute("UPDATE worker_ledger SET sealed_below = GREATEST(sealed_below, %s) WHERE id = 1",
                                (below,))
                conn.commit()
            except BaseException:
                conn.rollback()
                raise
        if moved:
            self.bound = below   # the ledger's is at least this now (`balances` reads any higher one)
        return moved

    def due(self) -> bool:
        return self.created >= SEAL_AFTER
