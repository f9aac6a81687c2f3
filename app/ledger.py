"""Money of the shard workers: one balance per user across all shards, debits and credits
keyed by order (see docs/business-rules.md).

A batch locks the balances it may touch (ascending user_id, so two shard workers wait for each
other instead of deadlocking), decides in memory, and writes the new balances with its orders
in the same transaction. One `worker_orders` row per order makes every money movement
idempotent; a concurrent writer of the same order or user is detected and the batch is
decided again.
"""
from __future__ import annotations

from decimal import Decimal

import pymysql

from . import db
from .rules import Order

DUPLICATE_KEY = 1062


class LedgerConflict(Exception):
    """Another worker wrote one of this batch's orders or users first: decide again."""


class Ledger:
    def __init__(self, opening_balance: Decimal):
        self.opening = opening_balance

    @staticmethod
    def orders(cur, order_ids) -> dict[int, Order]:
        if not order_ids:
            return {}
        cur.execute("SELECT order_id, user_id, shop_id, good_id, qty, amount, debited, credit FROM worker_orders "
                    "WHERE order_id IN " + db.sql_list(cur, order_ids))
        return {r[0]: Order(r[0], r[1], r[5], r[2], r[3], r[4], bool(r[6]), r[7]) for r in cur.fetchall()}

    def lock_balances(self, cur, users, create: bool) -> tuple[dict[int, Decimal], set[int]]:
        """Balances of `users`, locked until the transaction ends, and which of them are new
        (they start with OPENING_BALANCE). With `create` the new ones are inserted (and so
        locked) now; without, `write` inserts them and a concurrent creator makes it fail."""
        if not users:
            return {}, set()
        ordered = sorted(users)
        cur.execute("SELECT user_id, balance FROM worker_balances WHERE user_id IN "
                    + db.sql_list(cur, ordered) + " ORDER BY user_id FOR UPDATE")
        balances = dict(cur.fetchall())
        missing = [u for u in ordered if u not in balances]
        balances.update((u, self.opening) for u in missing)
        if missing and create:
            self._insert_users(cur, [(u, self.opening) for u in missing])
            return balances, set()
        return balances, set(missing)

    @staticmethod
    def _insert_users(cur, rows: list[tuple]) -> None:
        try:
            db.insert_rows(cur, "INSERT INTO worker_balances (user_id, balance) VALUES ", rows)
        except pymysql.err.IntegrityError as exc:
            if exc.args and exc.args[0] == DUPLICATE_KEY:
                raise LedgerConflict("a new user was created by another worker meanwhile") from exc
            raise

    @classmethod
    def write(cls, cur, shard: int, file_id: int, new: list[Order], credited: list[Order],
              balances: dict[int, Decimal], changed: set[int], new_users: set[int]) -> None:
        """Insert this batch's orders and record credits on earlier ones, in one statement whose
        affected-row count proves nobody else wrote them meanwhile; then the balances."""
        if new or credited:
            def render(o: Order) -> str:
                return "(%d,%d,%d,%d,%d,%d,%s,%d,%s,%d,%d)" % (
                    o.order_id, shard, o.user_id, o.shop_id, o.good_id, o.qty, _number(o.amount), o.debited,
                    "NULL" if o.credit is None else _number(o.credit), file_id, o.line)
            changed_rows = db.insert_rows(
                cur, "INSERT INTO worker_orders (order_id, shard, user_id, shop_id, good_id, qty, amount, debited,"
                     " credit, file_id, line) VALUES ", new + credited,
                " ON DUPLICATE KEY UPDATE credit=IF(credit IS NULL, VALUES(credit), credit)", render=render)
            expected = len(new) + 2 * len(credited)
            if changed_rows != expected:
                raise LedgerConflict(f"orders of this batch were written by another worker "
                                     f"({changed_rows} rows changed, {expected} expected)")
        created = sorted(changed & new_users)
        if created:
            cls._insert_users(cur, [(u, balances[u]) for u in created])
        existing = sorted(changed - new_users)
        if existing:
            db.insert_rows(cur, "INSERT INTO worker_balances (user_id, balance) VALUES ", existing,
                           " ON DUPLICATE KEY UPDATE balance=VALUES(balance)",
                           render=lambda u: "(%d,%s)" % (u, _number(balances[u])))


def _number(amount: Decimal) -> str:
    if not amount.is_finite():
        raise ValueError(f"not a finite amount: {amount}")
    return format(amount, "f")
