"""The one vocabulary of stages, statuses and transitions (the contract's names, exactly).

SQL, the API, the daemons, the supervisord program list and the dashboard all build from these;
no other module spells a stage or a status (tests/test_stages.py scans for one). A member is a
`str`, so it goes into JSON, URLs, log lines and SQL text as its value.

Adding a stage: a member here (its place in the order makes the previous stage) and its SHORT
name, a migration adding its status and attempts columns and its ready indexes (db/README.md),
its program in supervisord.conf, its folders in app/layout.py, and its process folder
under app/.
"""
from __future__ import annotations

from enum import StrEnum


class _Word(StrEnum):
    @property
    def sql(self) -> str:
        """As an SQL string literal, `'done'` (a constant of ours, never input)."""
        return f"'{self.value}'"


class Status(_Word):
    """A task's status in one stage (the tracking table's ENUM, in this order)."""

    NEW = "new"
    STARTED = "started"
    DONE = "done"
    FAILED = "failed"


class Action(_Word):
    """What moves a task (the `action` of pipeline_transitions; the first six are the API's
    `POST /stages/{stage}/{action}`, HEARTBEAT only extends a lease)."""

    START = "start"
    DONE = "done"
    FAIL = "fail"
    RETRY = "retry"
    RELEASE = "release"
    REWIND = "rewind"
    HEARTBEAT = "heartbeat"
    REGISTER = "register"
    CLAIM = "claim"
    REAP = "reap"


# The transitions `POST /stages/{stage}/{action}` takes for a work stage (the state machine's).
TRANSITIONS = (Action.START, Action.DONE, Action.FAIL, Action.RETRY, Action.RELEASE, Action.REWIND)


class Stage(_Word):
    """The stages in pipeline order. The first registers files; the others claim tasks."""

    INGEST = "event-ingest"
    SPLITTER = "shard-splitter"
    WORKER = "shard-worker"
    SENDER = "mysql-sender"

    @property
    def column(self) -> str:
        """How the tracking table and the API's JSON keys spell it: `shard_worker`."""
        return _COLUMN[self]

    @property
    def status_column(self) -> str:
        return _STATUS_COLUMN[self]

    @property
    def attempts_column(self) -> str | None:
        """Claims count attempts; the first stage is never claimed and has none."""
        return _ATTEMPTS_COLUMN[self]

    @property
    def previous(self) -> Stage | None:
        return _PREVIOUS[self]

    @property
    def short(self) -> str:
        """The word its index names use: `ix_worker_ready`."""
        return SHORT[self]

    @property
    def ordered(self) -> bool:
        """Whether one shard's tasks must run in registration order (docs/business-rules.md)."""
        return self in ORDERED

    @property
    def per_shard(self) -> bool:
        """Whether its daemons serve one shard each (`--shard N`, program `<stage>-<N>`)."""
        return self in PER_SHARD

    def program(self, shard: int | None = None) -> str:
        """Its daemon's program and service name: `shard-worker-0`, `shard-splitter`."""
        return f"{self.value}-{shard}" if self.per_shard else self.value


FIRST = Stage.INGEST
SHORT = {Stage.INGEST: "ingest", Stage.SPLITTER: "splitter", Stage.WORKER: "worker", Stage.SENDER: "sender"}
STAGES = tuple(Stage)
WORK_STAGES = STAGES[1:]
ORDERED = frozenset({Stage.WORKER})
PER_SHARD = frozenset({Stage.WORKER, Stage.SENDER})
STATUSES = tuple(Status)


def sql_in(*values: StrEnum) -> str:
    """`('new','started')`: members as an SQL list of string literals."""
    return "(" + ",".join(f"'{v.value}'" for v in values) + ")"


_COLUMN = {s: s.value.replace("-", "_") for s in STAGES}
_STATUS_COLUMN = {s: f"{_COLUMN[s]}_status" for s in STAGES}
_ATTEMPTS_COLUMN = {s: None if s is FIRST else f"{_COLUMN[s]}_attempts" for s in STAGES}
_PREVIOUS = {s: (STAGES[i - 1] if i else None) for i, s in enumerate(STAGES)}
