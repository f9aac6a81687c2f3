"""The task counts an API transaction writes itself (migration 0007): a hot transaction (a
claim, a `done` that claims, a registration) sets @pipeline_counted, so the count triggers skip
its rows, and sends its net changes to `pipeline_task_counts` in one statement with its COMMIT.
A trigger cost the server ~55-60 us per row it counted; one `INSERT ... VALUES` counts all of a
transaction's rows, and a `done`'s started -1 cancels its claim's +1 of the same shard.
Everything here is decided from rows the transaction holds locked: the counts it writes are the
changes it commits.
"""
from __future__ import annotations

from collections import Counter

from ..stages import FIRST, STAGES, Stage
from .queries import DONE, NEW, STARTED

READY = "ready"


def following(stage: Stage) -> Stage | None:
    i = STAGES.index(stage)
    return STAGES[i + 1] if i + 1 < len(STAGES) else None


def claimed(stage: Stage, shards: list[int]) -> Counter:
    """Ready tasks (previous stage done, this one new) claimed: new and ready -1, started +1."""
    out: Counter = Counter()
    for shard in shards:
        out[(stage.value, shard, NEW.value)] -= 1
        out[(stage.value, shard, READY)] -= 1
        out[(stage.value, shard, STARTED.value)] += 1
    return out


def done(stage: Stage, shards: list[int], next_statuses: list[str]) -> Counter:
    """Started tasks done: started -1, done +1; and the next stage ready +1 where it is new
    (`next_statuses`: the next stage's status of each moved row, any order; empty for the last
    stage), as the trigger decided."""
    out: Counter = Counter()
    for shard in shards:
        out[(stage.value, shard, STARTED.value)] -= 1
        out[(stage.value, shard, DONE.value)] += 1
    nxt = following(stage)
    for shard, status in next_statuses:
        if status == NEW:
            out[(nxt.value, shard, READY)] += 1
    return out


def registered(shards: list[int], done: bool) -> Counter:
    """Rows inserted with the first stage started (or done) and the others new."""
    out: Counter = Counter()
    for shard in shards:
        out[(FIRST.value, shard, (DONE if done else STARTED).value)] += 1
        for stage in STAGES[1:]:
            out[(stage.value, shard, NEW.value)] += 1
        if done:
            out[(STAGES[1].value, shard, READY)] += 1
    return out


def counts_sql(changes: Counter) -> tuple[str, list] | None:
    """One statement adding the net changes to pipeline_task_counts, its rows in primary-key
    order (as the triggers' were: transactions lock shared counters in one order), or None
    when nothing changes."""
    rows = sorted((k, n) for k, n in changes.items() if n)
    if not rows:
        return None
    return ("INSERT INTO pipeline_task_counts (stage, shard, status, n) VALUES "
            + ",".join(["(%s,%s,%s,%s)"] * len(rows)) + " ON DUPLICATE KEY UPDATE n = n + VALUES(n)",
            [v for (st, sh, su), n in rows for v in (st, sh, su, n)])
