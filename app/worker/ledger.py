"""Money of the shard workers: one balance per user across all shards, debits and credits
keyed by order (see docs/business-rules.md).

A batch locks the balances it may touch (ascending user_id, so two shard workers wait for each
other instead of both spending the same money), decides in memory, and writes the new balances
with its orders in the same transaction. New users go to `worker_balances_young` and move to
`worker_balances` in key order later (`seal`, db/migrations/worker/0007): the two workers'
interleaved inserts of new users would split worker_balances' pages. The young table is a ring
of three partitions by epoch (0008): a pass copies an epoch and empties one by TRUNCATE
PARTITION, never by a DELETE. One `worker_orders` row per order makes every money
movement idempotent; a concurrent writer of the same order or user is detected and the batch is
decided again. The statements are built here and sent in the batch's scripts (`db.Script`).
"""
from __future__ import annotations

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
# Young rows of dead epochs (copied, their partition not emptied yet) are not balances.
ALL_BALANCES = ("SELECT user_id, balance FROM worker_balances "
                "UNION ALL SELECT y.user_id, y.balance FROM worker_balances_young y "
                "JOIN worker_ledger l ON l.id = 1 AND y.epoch >= l.epoch - 1")
# New users' balances start young, in the current epoch (see `seal`).
SQL_NEW_BALANCES = "INSERT INTO worker_balances_young (user_id, epoch, balance) VALUES "
# A worker tries a sealing pass after creating this many users since its last one.
SEAL_AFTER = 5_000
# The young table's partitions (migration 0008): epoch E's rows are in partition E % RING. Live:
# the current epoch and the one before; the one before that is dead (copied) until its
# partition is emptied for the next epoch.
RING = 3
# The epoch of a database no pass has moved on yet (0008's default): a Ledger's until its
# first locking read.
FIRST_EPOCH = 1
# Seconds a pass's TRUNCATE PARTITION waits for the other worker's open batch (its metadata
# lock on the young table); then the pass is skipped and tried after a later file.
TRUNCATE_LOCK_WAIT = 10
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
_YOUNG_ROW = "%d\t%d\t%s\n"


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


def young_rows(users: list[int], epochs, balances: dict[int, Decimal]) -> bytes:
    """The `worker_balances_young` LOAD DATA rows (user_id, epoch, balance) of `users`: each
    user's epoch from `epochs`, a mapping or one int for all."""
    values: list = []
    add = values.extend
    if type(epochs) is int:
        for u in users:
            add((u, epochs, balances[u]))
    else:
        for u in users:
            add((u, epochs[u], balances[u]))
    text = (_YOUNG_ROW * len(users)) % tuple(values)
    if not _plain(text):
        values[2::3] = map(_number, values[2::3])
        text = (_YOUNG_ROW * len(users)) % tuple(values)
    return text.encode()


class Ledger:
    def __init__(self, opening_balance: Decimal):
        self.opening = opening_balance
        self.young: dict[int, int] = {}  # users of the last `balances` in worker_balances_young: epoch
        self.epoch = FIRST_EPOCH         # where new users go: worker_ledger's, read by the last `balances`
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

    @staticmethod
    def lock_sql(conn, users) -> str:
        """Lock the users' balance rows until the transaction ends (a range scan of each
        table's primary key: ascending user_id), after a shared lock on `worker_ledger`'s row
        (the sealing pass takes it exclusive: no user moves between the tables, or is sealed
        while this batch takes it for new), one statement. The balances come back packed in one
        row a table, (table, count, "user balance user balance ..."): thousands of rows decoded one by one
        by PyMySQL cost the worker more than deciding them (`balances` checks the count, so a
        text cut short by group_concat_max_len, which `WorkerState` raises on its connection,
        cannot go unnoticed). The primary key is forced: a young table the optimizer takes for
        small is otherwise scanned whole, and a locking scan waits for every row the other shard
        worker has locked, matching or not (the two workers took turns). The ledger's row gives
        the current epoch, young rows their epoch ("user epoch balance ..."): rows of a dead epoch
        (copied, not emptied yet) are dropped by `balances`."""
        ids = db.sql_list(conn, sorted(users))
        return " UNION ALL ".join(["(SELECT -1, epoch, NULL FROM worker_ledger WHERE id = 1 LOCK IN SHARE MODE)"] + [
            f"(SELECT {tag:d}, COUNT(*), GROUP_CONCAT({fields} ORDER BY user_id SEPARATOR ' ') "
            f"FROM {table} FORCE INDEX (PRIMARY) WHERE user_id IN {ids} FOR UPDATE)"
            for tag, table, fields in ((MAIN, TABLES[MAIN], "user_id, ' ', balance"),
                                       (YOUNG, TABLES[YOUNG], "user_id, ' ', epoch, ' ', balance"))])

    def balances(self, rows, users) -> tuple[dict[int, Decimal], set[int]]:
        """The locked balances (the rows `lock_sql` answers), and the users not in either table
        yet (they start with OPENING_BALANCE; `write` inserts them into the young table, and a
        concurrent creator makes that fail). Which users are young, and their epochs, are kept
        for `add_writes`, and the current epoch (where new users go)."""
        balances: dict[int, Decimal] = {}
        young: dict[int, int] = {}
        rows = sorted(rows, key=lambda r: r[0])     # the ledger's row (-1) first: the epoch
        for tag, count, packed in rows:
            if tag == -1:
                self.epoch = int(count)
                continue
            if not count:
                continue
            parts = (packed.decode() if type(packed) is bytes else packed).split(" ")
            width = 3 if tag == YOUNG else 2
            if len(parts) != width * count:
                raise ValueError(f"balances of {count} users came back as {len(parts)} fields: "
                                 "is group_concat_max_len too small?")
            if tag == YOUNG:
                live = self.epoch - 1
                found = {}
                for u, e, b in zip(map(int, parts[0::3]), map(int, parts[1::3]), parts[2::3]):
                    if e >= live:
                        found[u] = Decimal(b)
                        young[u] = e
            else:
                found = dict(zip(map(int, parts[0::2]), map(Decimal, parts[1::2])))
            if balances.keys() & found.keys():
                raise ValueError(f"users in both balance tables: {sorted(balances.keys() & found.keys())[:5]}")
            balances.update(found)
        new = {u for u in users if u not in balances}
        balances.update((u, self.opening) for u in new)
        self.young = young
        return balances, new

    def create_users(self, cur, users) -> None:
        """Insert new users now, so they are locked too (a batch decided again after a conflict)."""
        try:
            db.insert_rows(cur, SQL_NEW_BALANCES, [(u, self.epoch, self.opening) for u in sorted(users)])
            self.young.update(dict.fromkeys(users, self.epoch))
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
        New users go to worker_balances_young in the current epoch, the others to the row
        `balances` found them in (table, and epoch if young)."""
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

        epoch, young = self.epoch, self.young

        def new_values(u: int) -> str:
            return "(%d,%d,%s)" % (u, epoch, _number(balances[u]))

        def young_values(u: int) -> str:
            return "(%d,%d,%s)" % (u, young[u], _number(balances[u]))
        # A new order written meanwhile by another worker is skipped (0 rows, where its line
        # counts 1) and a credit changes only a debited order (1 row), so the count is
        # `expected_orders` only if every order went in and every credit happened.
        if not infile:
            script.add("orders", db.insert_statements(conn, ORDER_INSERT, new,
                                                      " ON DUPLICATE KEY UPDATE order_id=order_id", render=values_row))
            script.add("users", db.insert_statements(conn, SQL_NEW_BALANCES, sorted(changed & new_users),
                                                     render=new_values))
            script.add("balances", db.insert_statements(conn, f"INSERT INTO {TABLES[MAIN]} (user_id, balance) VALUES ",
                                                        sorted(changed - new_users - young.keys()),
                                                        " ON DUPLICATE KEY UPDATE balance=VALUES(balance)",
                                                        render=balance_values))
            script.add("balances", db.insert_statements(conn, f"INSERT INTO {TABLES[YOUNG]} (user_id, epoch, balance) "
                                                        "VALUES ", sorted((changed - new_users) & young.keys()),
                                                        " ON DUPLICATE KEY UPDATE balance=VALUES(balance)",
                                                        render=young_values))
        elif new:
            script.load("orders", "LOAD DATA LOCAL INFILE 'worker_orders' INTO TABLE worker_orders (file_id, line, "
                                  f"order_id, shop_id, buyer, qty, amount, state) SET shard={shard:d}",
                        "worker_orders", order_rows(new, file_id))
        script.add("orders", db.insert_statements(conn, CREDIT_UPDATE, credited, ")", render=_order_id))
        created = sorted(changed & new_users)
        self.created += len(created)
        if created and infile:   # a user another worker created meanwhile is skipped: `expected_users`
            script.load("users", "LOAD DATA LOCAL INFILE 'worker_users' INTO TABLE worker_balances_young "
                                 "(user_id, epoch, balance)", "worker_users", young_rows(created, epoch, balances))
        updated = changed - new_users if infile else set()
        # rows this batch locked: REPLACE updates each in place (the key is the only index)
        users = sorted(updated - young.keys())
        if users:
            script.load("balances", f"LOAD DATA LOCAL INFILE '{TABLES[MAIN]}' REPLACE INTO TABLE {TABLES[MAIN]} "
                                    "(user_id, balance)", TABLES[MAIN], balance_rows(users, balances))
        users = sorted(updated & young.keys())
        if users:
            script.load("balances", f"LOAD DATA LOCAL INFILE '{TABLES[YOUNG]}' REPLACE INTO TABLE {TABLES[YOUNG]} "
                                    "(user_id, epoch, balance)", TABLES[YOUNG], young_rows(users, young, balances))

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

    @staticmethod
    def pass_lock(conn) -> str:
        """The named lock serializing the two workers' passes: the database's own (named locks
        are the server's; at most 64 characters on MySQL 8.0, as the shard locks')."""
        with conn.cursor() as cur:
            cur.execute("SELECT DATABASE()")
            return f"event_pipeline.worker.ledger.{cur.fetchone()[0]}"[:64]

    def seal(self, conn) -> int | None:
        """A pass of the ring: under the named lock `pass_lock` (the other worker's pass waits,
        so a late TRUNCATE never empties a partition that pass gave to a new epoch), empty the
        partition the next epoch will use (`truncate_dead`: it holds the epoch the pass before
        copied), then in one transaction holding `worker_ledger`'s row exclusive (it waits for
        the batches reading balances to commit, and they wait for it) copy the previous epoch's
        users to worker_balances in key order (appended there, its pages stay full) and move the
        epoch on (`copy_and_advance`). No row is deleted. Users copied; None when the pass was
        skipped (the other worker's pass running, or its open batch holding the young table
        longer than TRUNCATE_LOCK_WAIT): it stays due. Called after files, once this worker
        created SEAL_AFTER users since its last pass (`due`). A worker killed between the two
        steps leaves an emptied dead partition: the next pass empties it again."""
        name = self.pass_lock(conn)
        with conn.cursor() as cur:
            cur.execute("SELECT GET_LOCK(%s, 0)", (name,))
            if cur.fetchone()[0] != 1:
                return None         # the other worker's pass: this one is not needed now
            try:
                cur.execute("SELECT epoch FROM worker_ledger WHERE id = 1")
                row = cur.fetchone()
                if row is None:
                    raise RuntimeError("worker_ledger has no row: run the worker migrations (0007)")
                epoch = row[0]
                if not self.truncate_dead(cur, epoch):
                    return None
                moved = self.copy_and_advance(conn, epoch)
            finally:
                cur.execute("DO RELEASE_LOCK(%s)", (name,))
        self.created = 0
        return moved

    @staticmethod
    def truncate_dead(cur, epoch: int) -> bool:
        """Empty the partition epoch + 1 will use (epoch - 2's: copied by the pass before, dead),
        waiting at most TRUNCATE_LOCK_WAIT for the transactions using the young table (the
        other worker's open batch): False when that wait ran out, or the server chose the
        TRUNCATE as a deadlock's victim (a transaction of the other worker asking for the table
        again behind it)."""
        cur.execute("SET SESSION lock_wait_timeout = %s", (TRUNCATE_LOCK_WAIT,))
        try:
            cur.execute(f"ALTER TABLE worker_balances_young TRUNCATE PARTITION p{(epoch + 1) % RING:d}")
        except pymysql.err.OperationalError as exc:
            if exc.args and exc.args[0] in db.DEADLOCK_CODES:   # a metadata lock's wait too
                return False
            raise
        finally:
            cur.execute("SET SESSION lock_wait_timeout = DEFAULT")
        return True

    @staticmethod
    def copy_and_advance(conn, epoch: int) -> int:
        """Copy epoch - 1's users to worker_balances in key order and make epoch + 1 the
        current one, in one transaction holding worker_ledger's row exclusive. Users copied."""
        with conn.cursor() as cur:
            conn.begin()
            try:
                cur.execute("SELECT epoch FROM worker_ledger WHERE id = 1 FOR UPDATE")
                now = cur.fetchone()[0]
                if now != epoch:
                    raise RuntimeError(f"worker_ledger's epoch moved from {epoch} to {now} during a pass: "
                                       "passes must hold the ledger's named lock")
                moved = cur.execute("INSERT INTO worker_balances (user_id, balance) SELECT user_id, balance "
                                    "FROM worker_balances_young WHERE epoch = %s ORDER BY user_id", (epoch - 1,))
                cur.execute("UPDATE worker_ledger SET epoch = %s WHERE id = 1", (epoch + 1,))
                conn.commit()
            except BaseException:
                conn.rollback()
                raise
        return moved

    def due(self) -> bool:
        return self.created >= SEAL_AFTER
