"""The API store's deadlock retry: a real deadlock on the test server is retried, once, and the
pauses between retries are spread at random, so transactions that deadlocked each other do not
all come back in step and meet again."""
from __future__ import annotations

import threading

from app import db
from app.api import store as store_module
from app.api.store import DEADLOCK_BACKOFF, Store, deadlock_pause


def test_pauses_grow_with_the_attempt_and_are_spread_at_random():
    for attempt in range(5):
        pauses = [deadlock_pause(attempt) for _ in range(200)]
        low, high = DEADLOCK_BACKOFF * (attempt + 1) * 0.5, DEADLOCK_BACKOFF * (attempt + 1) * 1.5
        assert all(low <= p <= high for p in pauses), (attempt, min(pauses), max(pauses))
        assert len(set(pauses)) > 150, f"attempt {attempt}: pauses in step: {sorted(set(pauses))[:5]}"
        assert max(pauses) - min(pauses) > (high - low) / 2


def test_a_real_deadlock_is_retried_after_a_random_pause_and_committed_once(make_database, monkeypatch):
    url = make_database("store")
    setup = db.connect(url)
    with setup.cursor() as cur:
        cur.execute("CREATE TABLE t (id INT PRIMARY KEY, n INT NOT NULL) ENGINE=InnoDB")
        cur.execute("INSERT INTO t VALUES " + ",".join(f"({i}, 0)" for i in range(1, 101)))
    setup.close()

    pauses: list[float] = []

    def recorded(attempt: int) -> float:
        pauses.append(deadlock_pause(attempt))
        return pauses[-1]

    monkeypatch.setattr(store_module, "deadlock_pause", recorded)
    holds_two, wants_one = threading.Event(), threading.Event()
    other_error: list[BaseException] = []

    def other() -> None:
        """Locks rows 2-100 (heavier, so InnoDB picks the store's transaction as the victim),
        then waits for row 1, which the store's transaction holds."""
        conn = db.connect(url, autocommit=False)
        try:
            with conn.cursor() as cur:
                cur.execute("UPDATE t SET n = n + 10 WHERE id >= 2")
                holds_two.set()
                wants_one.wait(10)
                cur.execute("UPDATE t SET n = n + 10 WHERE id = 1")
            conn.commit()
        except BaseException as exc:
            other_error.append(exc)
        finally:
            conn.close()

    calls = []

    def work(tx):
        calls.append(1)
        tx.run(("UPDATE t SET n = n + 1 WHERE id = 1", None))
        if len(calls) == 1:
            thread.start()
            assert holds_two.wait(10)
            wants_one.set()
            # The other transaction now asks for row 1; asking for row 2 closes the cycle.
        tx.run(("UPDATE t SET n = n + 1 WHERE id = 2", None))
        return "done"

    thread = threading.Thread(target=other)
    store = Store(db.ThreadConnections(url, multi_statements=True))
    assert store.tx(work) == "done"
    thread.join(15)
    assert not other_error, other_error
    assert len(calls) == 2, "the deadlock was not retried exactly once"
    assert len(pauses) == 1 and DEADLOCK_BACKOFF * 0.5 <= pauses[0] <= DEADLOCK_BACKOFF * 1.5
    rows = {r["id"]: r["n"] for r in store.read("SELECT id, n FROM t WHERE id IN (1, 2)")}
    assert rows == {1: 11, 2: 11}, rows
