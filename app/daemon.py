"""The loop every stage daemon runs: claim, work, report, heartbeat, clean up.

A stage supplies only what differs (`StageWork.process`); this module owns polling with backoff,
leases, signals and the promise that a stopped daemon leaves no task `started` and its folder
empty.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import stat
import threading
import time
import traceback
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from . import owned
from .atomic import is_temp, writer_alive
from .db import MigrationError, migrations
from .client import ApiError, ApiUnavailable, PipelineClient, Task
from .config import Settings, shard_arg
from .logs import ACTIVITY_LOG, setup_logging
from .safefiles import Folder, Refused, under
from .shutdown import StopFlag, stop_on_signals
from .stages import Action, Stage

# A claim of several tasks (files queued up) is worked group by group; in the stages named in
# REPORT_DEFER_STAGES the `done`s of the groups before the last wait for the last one's report
# and travel in its one request and transaction (a `done-batch` with the next claim), as long as
# the first of them waits at most REPORT_DEFER_SECONDS and no more than REPORT_BATCH_MOST are
# waiting. At 500-event files a report was a request and a transaction per file and stage. Not
# the splitter: a done that waits holds the next stage's work back, and the splitter's next stage
# is the workers, the pipeline's heaviest; a sender waits for a worker's files at little cost (and
# then takes them together, so a worker's batch makes one of the sender's).
REPORT_DEFER_STAGES = frozenset({Stage.WORKER, Stage.SENDER})
REPORT_DEFER_SECONDS = 0.5
REPORT_BATCH_MOST = 32


class StopRequested(Exception):
    """Raised inside `process` when the daemon is asked to stop: the task is handed back."""


class InputMissing(Exception):
    """The stage's input file is gone: send the task back to the stage that produces it."""


class TaskFailed(Exception):
    """The task cannot succeed as it is (bad input, wrong shard): mark it failed with the reason."""


class Retryable(Exception):
    """A passing outside fault (a database down): hand the task back and back off."""


@dataclass
class Done:
    events: int | None = None
    stats: dict = field(default_factory=dict)


@dataclass
class Failed:
    reason: str
    stats: dict = field(default_factory=dict)


@dataclass
class Rewind:
    reason: str


Outcome = Done | Failed | Rewind


class Context:
    """What `process` may ask of the loop."""

    def __init__(self, stop: StopFlag, log: logging.Logger):
        self._stop = stop
        self.log = log

    def stopping(self) -> bool:
        return self._stop.is_set()

    def check(self) -> None:
        if self._stop.is_set():
            raise StopRequested()


class StageWork(ABC):
    """One stage's part. `process` gets tasks of one group and returns an outcome per task
    (same order), or raises one of the exceptions above for the whole group."""

    name: Stage          # the tracking stage
    service: str         # the process name: name.program(shard), e.g. shard-worker-0
    shard: int | None    # claim only this shard's tasks
    folder: Path         # this daemon's own folder, emptied when it stops
    claim_limit: int = 4
    schemas: tuple[str, ...] = ()  # the db/migrations components it applies (read at start)

    def group(self, tasks: list[Task]) -> list[list[Task]]:
        return [[t] for t in tasks]

    def setup(self, ctx: Context) -> None:
        """Called once before the loop (open connections, apply DDL)."""

    def teardown(self) -> None:
        """Called once after the loop."""

    def idle(self, ctx: Context) -> None:
        """Called when a claim found no work (time-based upkeep: expiring, pruning)."""

    @abstractmethod
    def process(self, tasks: list[Task], ctx: Context) -> list[Outcome]:
        ...


def owner_id(service: str) -> str:
    """The daemon's name as the owner of the tasks it claims (the API's `worker` field, the
    WORKER_ID variable): stable across restarts on one host, so a restarted daemon gets its own
    tasks back."""
    return os.environ.get("WORKER_ID") or f"{socket.gethostname()}/{service}"


def empty_folder(folder: Path, root: Path | None = None) -> None:
    """Remove from `folder` what this host wrote or nobody did, and this host's dead ledgers
    (app/owned.py): never the activity log, another live process's unfinished temporary
    files, nor a file another host wrote (shared folders across hosts). On a single host that
    is everything but the log and live temporary files. The folder is opened without
    following links below `root` (see app/safefiles.py): a link planted at its name is
    `Refused`, never emptied; links inside it are removed, never followed."""
    try:
        handle = Folder(folder, under(folder, root))
    except FileNotFoundError:
        return
    with handle:
        names = handle.names()
        writers = owned.written(handle, names)  # read after listing: a name seen is in a ledger
        for name in names:
            if name == ACTIVITY_LOG or owned.is_ledger(name):
                continue
            try:
                st = handle.lstat(name)
            except FileNotFoundError:
                continue
            if is_temp(Path(name)):
                if writer_alive(folder / name, other_than_me=True, mtime=st.st_mtime):
                    continue
            elif owned.spare(writers, name, st.st_ino):
                continue
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(name, ignore_errors=True, dir_fd=handle.fd)
            else:
                handle.unlink(name)
        for name in names:
            if owned.removable_ledger(name):
                handle.unlink(name)


class Daemon:
    def __init__(self, stage: StageWork, settings: Settings, client: PipelineClient | None = None,
                 owner: str | None = None):
        self.stage = stage
        self.settings = settings
        self.stop = StopFlag()
        self.owner = owner or owner_id(stage.service)
        self.client = client or PipelineClient(settings.pipeline_url, settings.api_token, stop=self.stop)
        self.log = logging.getLogger(stage.service)
        self.held: dict[tuple[str, int], Task] = {}
        # Tasks the last report claimed (a `done` with `claim`): the loop works them next.
        self.handed: list[Task] | None = None
        # When each held task's lease was last set (claim or heartbeat), monotonic.
        self.leased_at: dict[tuple[str, int], float] = {}
        # Held tasks whose done is being reported: no heartbeat (the done may be committed while
        # its request still waits for the next claim; a heartbeat then is refused, 409).
        self.reporting: set[tuple[str, int]] = set()
        # Done tasks whose report waits for the claim's last group (REPORT_DEFER_SECONDS), and
        # when the first of them was done (monotonic). Still held: heartbeats go on for them.
        self.deferred: list[tuple[Task, Done]] = []
        self.deferred_since = 0.0
        self.defer_for = REPORT_DEFER_SECONDS if stage.name in REPORT_DEFER_STAGES else 0.0
        self._held_lock = threading.Lock()

    # -- lifecycle --------------------------------------------------------------------------------

    def install_signals(self) -> None:
        stop_on_signals(self.stop)

    def run(self) -> None:
        stage = self.stage
        root = self.settings.shared_dir
        Folder(stage.folder, under(stage.folder, root), create=True).close()
        empty_folder(stage.folder, root)  # what a killed predecessor left is not trusted
        ctx = Context(self.stop, self.log)
        self.log.info("%s starting as %r (shard %s)", stage.service, self.owner, stage.shard)
        heart = threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True)
        heart.start()
        try:
            stage.setup(ctx)
            self._loop(ctx)
        finally:
            if self.stop.is_set():
                self.log.info("%s received: handing back what this daemon holds", self.stop.signal_name)
            self._release_all("daemon stopping")
            try:
                stage.teardown()
            finally:
                empty_folder(stage.folder, self.settings.shared_dir)
                self.log.info("%s stopped; %s emptied", stage.service, stage.folder)

    def _loop(self, ctx: Context) -> None:
        s = self.settings
        idle = s.poll_min
        backoff = 0.0
        while not self.stop.is_set():
            tasks, self.handed = self.handed, None
            if tasks == []:
                self.stage.idle(ctx)   # the report's claim waited and found nothing
            if not tasks:
                asked = time.monotonic()
                try:
                    tasks = self.client.claim(self.stage.name, self.owner, self.stage.claim_limit, self.stage.shard,
                                              wait=s.claim_wait)
                except ApiUnavailable:
                    continue
                except ApiError as exc:
                    self.log.error("claim refused: %s", exc)
                    self.stop.wait(s.poll_max)
                    continue
                if not tasks:
                    self.stage.idle(ctx)
                    if s.claim_wait <= 0 or time.monotonic() - asked < s.claim_wait / 2:
                        # The API did not hold the claim (stopping, or one without long polls): poll.
                        self.stop.wait(idle)
                        idle = min(idle * 2, s.poll_max)
                    continue
                self._hold(tasks)
            idle = s.poll_min
            groups = self.stage.group(tasks)
            for n, group in enumerate(groups):
                if self.stop.is_set():
                    break
                outcomes = self._work(group, ctx, claim_next=n == len(groups) - 1)
                if outcomes is None:
                    backoff = min(max(backoff * 2, 0.5), 30.0)
                    self.log.warning("backing off %.1fs before the next claim", backoff)
                    self._report_deferred()
                    self._release_all("outside fault; backing off")
                    self.stop.wait(backoff)
                    break
                backoff = 0.0
                if Stage(self.stage.name).ordered and any(isinstance(o, Rewind) for o in outcomes):
                    # The file went back upstream: the shard's later files, claimed with it, wait
                    # for it (a later file decided first would see a return before its purchase).
                    later = [t for g in groups[n + 1:] for t in g]
                    if later:
                        self._release(later, "an earlier file of the shard went back upstream")
                    break
            self._report_deferred()  # a stop between groups: what is done is reported

    def _hold(self, tasks: list[Task]) -> None:
        now = time.monotonic()
        with self._held_lock:
            self.held.update({t.key: t for t in tasks})
            self.leased_at.update({t.key: now for t in tasks})

    def _next_claim(self) -> dict | None:
        """The claim a report of the last group carries (the API claims in the same request
        and transaction): none while stopping."""
        if self.stop.is_set():
            return None
        claim = {"limit": self.stage.claim_limit}
        if self.stage.shard is not None:
            claim["shard"] = self.stage.shard
        return claim

    def _handed(self, tasks: list[Task] | None) -> None:
        """Tasks a report claimed (a long poll of CLAIM_WAIT_SECONDS when none was ready):
        held at once (a stop hands them back), worked next. None (an API older than the
        report's `claim` field) or an empty list leave the next claim to the loop."""
        if tasks:
            self._hold(tasks)
        self.handed = tasks

    def _work(self, group: list[Task], ctx: Context, claim_next: bool = False) -> list[Outcome] | None:
        """Process one group and report each task: their outcomes, or None when the stage
        asked to back off. `claim_next`: the last group of what was claimed; when every task
        of it is done, the report also claims the next tasks (`self.handed`). The `done`s of
        a group before the last may wait and go with a later report (REPORT_DEFER_STAGES);
        any other outcome reports them first."""
        names = ", ".join(f"{t.filename}/{t.shard}" for t in group)
        started = time.monotonic()
        try:
            outcomes = self.stage.process(group, ctx)
        except StopRequested:
            self._release(group, "daemon stopping")
            return []
        except InputMissing as exc:
            outcomes = [Rewind(str(exc))] * len(group)
        except TaskFailed as exc:
            outcomes = [Failed(str(exc))] * len(group)
        except Retryable as exc:
            self.log.warning("%s: %s", names, exc)
            self._release(group, f"retryable: {exc}")
            return None
        except MigrationError:
            raise  # the code and its database disagree: stop (the tasks are handed back), fail no task
        except Exception as exc:
            self.log.error("%s failed unexpectedly:\n%s", names, traceback.format_exc())
            outcomes = [Failed(f"{type(exc).__name__}: {exc}")] * len(group)
        done = [(t, o) for t, o in zip(group, outcomes) if isinstance(o, Done)]
        now = time.monotonic()
        if not claim_next and len(done) == len(group) and self._may_defer(len(done), now):
            if not self.deferred:
                self.deferred_since = now
            self.deferred += done
            return outcomes
        done, self.deferred = self.deferred + done, []
        with self._held_lock:
            self.reporting.update(t.key for t, _ in done)
        claim = self._next_claim() if claim_next and all(isinstance(o, Done) for o in outcomes) else None
        if len(done) > 1:
            self._report_done(done, now - started, claim)
        elif done:
            self._report(*done[0], now - started, claim)
        for task, outcome in zip(group, outcomes):
            if not isinstance(outcome, Done):
                self._report(task, outcome, now - started)
        return outcomes

    def _may_defer(self, more: int, now: float) -> bool:
        """Whether a group's `done`s may wait for the next group's report (see
        REPORT_DEFER_SECONDS): not while stopping, not past the time or count bound."""
        if self.stop.is_set() or len(self.deferred) + more > REPORT_BATCH_MOST:
            return False
        return now - (self.deferred_since if self.deferred else now) < self.defer_for

    def _report_deferred(self) -> None:
        """Report the `done`s still waiting (a stop, a back-off, a break between groups): one
        request, no claim."""
        done, self.deferred = self.deferred, []
        if not done:
            return
        with self._held_lock:
            self.reporting.update(t.key for t, _ in done)
        seconds = time.monotonic() - self.deferred_since
        if len(done) > 1:
            self._report_done(done, seconds)
        else:
            self._report(*done[0], seconds)

    def _report_done(self, done: list[tuple[Task, Done]], seconds: float, claim: dict | None = None) -> None:
        """Several tasks done at once (a file's shards): one request (with `claim`, the next
        claim too)."""
        items = [{"filename": t.filename, "shard": t.shard, "events": o.events, "stats": o.stats or None}
                 for t, o in done]
        try:
            answers, handed = self.client.done_batch_and_claim(self.stage.name, items, self.owner, claim,
                                                               self.settings.claim_wait)
            if claim is not None:   # else the tasks a previous report claimed stay handed
                self._handed(handed)
        except ApiError as exc:   # the request as a whole was refused: report one by one
            self.log.warning("batch done refused (%s); reporting each task", exc)
            for task, outcome in done:
                self._report(task, outcome, seconds)
            return
        except ApiUnavailable as exc:
            self.log.error("could not report %d tasks (stopping): %s", len(done), exc)
            return  # still held: the leases expire and the reaper hands them back
        for (task, outcome), answer in zip(done, answers):
            if answer.get("status_code") == 200:
                self.log.info("done %s shard %s in %.3fs: %s", task.filename, task.shard, seconds,
                              outcome.stats or outcome.events)
            else:
                self.log.error("could not report %s shard %s: HTTP %s: %s", task.filename, task.shard,
                               answer.get("status_code"), answer.get("error"))
            self._forget(task)

    def _forget(self, task: Task) -> None:
        with self._held_lock:
            self.held.pop(task.key, None)
            self.leased_at.pop(task.key, None)
            self.reporting.discard(task.key)

    def _report(self, task: Task, outcome: Outcome, seconds: float, claim: dict | None = None) -> None:
        c, stage = self.client, self.stage.name
        try:
            if isinstance(outcome, Done) and claim is not None:
                self._handed(c.done_and_claim(stage, task.filename, task.shard, self.owner, claim, outcome.events,
                                              outcome.stats or None, self.settings.claim_wait)[1])
                self.log.info("done %s shard %s in %.3fs: %s", task.filename, task.shard, seconds,
                              outcome.stats or outcome.events)
            elif isinstance(outcome, Done):
                c.done(stage, task.filename, task.shard, self.owner, outcome.events, outcome.stats or None)
                self.log.info("done %s shard %s in %.3fs: %s", task.filename, task.shard, seconds,
                              outcome.stats or outcome.events)
            elif isinstance(outcome, Failed):
                c.fail(stage, task.filename, task.shard, outcome.reason, self.owner, outcome.stats or None)
                self.log.error("failed %s shard %s: %s", task.filename, task.shard, outcome.reason)
            else:
                result = c.rewind(stage, task.filename, task.shard, self.owner, outcome.reason)
                self.log.warning("input of %s shard %s missing (%s): sent back to %s", task.filename,
                                 task.shard, outcome.reason, result.get("rewound_to") or result.get("status"))
        except ApiError as exc:
            # The lease was lost (reaped and maybe taken by another daemon): our result is void.
            self.log.error("could not report %s shard %s: %s", task.filename, task.shard, exc)
        except ApiUnavailable as exc:
            self.log.error("could not report %s shard %s (stopping): %s", task.filename, task.shard, exc)
            return  # still held: the lease expires and the reaper hands it back
        self._forget(task)

    def _release(self, tasks: list[Task], reason: str) -> None:
        for task in tasks:
            try:
                self.client.call("POST", f"/stages/{self.stage.name}/{Action.RELEASE}",
                                 {"filename": task.filename, "shard": task.shard, "worker": self.owner,
                                  "error": reason}, max_wait=10.0)
            except ApiError as exc:
                self.log.warning("release of %s shard %s refused: %s", task.filename, task.shard, exc)
            except ApiUnavailable as exc:
                self.log.error("could not hand back %s shard %s: %s (its lease will expire)",
                               task.filename, task.shard, exc)
                continue
            self._forget(task)

    def _release_all(self, reason: str) -> None:
        with self._held_lock:
            tasks = list(self.held.values())
        if tasks:
            self._release(tasks, reason)

    def _heartbeats(self) -> None:
        """Extend the lease of each task held for a third of a lease since it was last set: a
        task that ends well within its lease (most do) costs no heartbeat."""
        interval = max(self.settings.lease_seconds / 3, 0.2)
        client = PipelineClient(self.settings.pipeline_url, self.settings.api_token, max_wait=interval)
        while not self.stop.wait(interval / 2):
            now = time.monotonic()
            with self._held_lock:
                tasks = [t for k, t in self.held.items()
                         if k not in self.reporting and now - self.leased_at.get(k, 0.0) >= interval]
            for task in tasks:
                try:
                    client.heartbeat(self.stage.name, task.filename, task.shard, self.owner)
                    with self._held_lock:
                        if task.key in self.held:
                            self.leased_at[task.key] = now
                except ApiError as exc:
                    with self._held_lock:
                        still_held = task.key in self.held and task.key not in self.reporting
                    if still_held:   # else it was reported done meanwhile: no lease to lose
                        self.log.warning("lease of %s shard %s lost: %s", task.filename, task.shard, exc)
                except ApiUnavailable:
                    pass


def shard_of(argv: list[str] | None, settings: Settings, module: str) -> int:
    """The shard a per-shard daemon serves: `--shard N`, or `--slot P` for shard P mod
    SHARD_COUNT, or SHARD_ID. supervisord numbers the processes of a group 0, 1, 2, ... and
    cannot compute, so several processes per shard are one group whose process P is replica
    P // SHARD_COUNT of shard P % SHARD_COUNT."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--shard", type=int, default=None, help="the shard to serve (default: SHARD_ID)")
    which.add_argument("--slot", type=int, default=None, help="serve shard SLOT mod SHARD_COUNT")
    args = parser.parse_args(argv)
    if args.slot is not None:
        if args.slot < 0:
            parser.error(f"--slot must be 0 or more, got {args.slot}")
        return args.slot % settings.shard_count
    return shard_arg(None, args.shard, settings.shard_count)


def run_shard_stage(module: str, make_stage, argv: list[str] | None = None) -> None:
    """Entry point of a per-shard daemon: `python -m <module> --shard N|--slot P` (or SHARD_ID=N)."""
    settings = Settings.from_env()
    run_stage(make_stage(settings, shard_of(argv, settings, module)), settings)


def run_stage(stage: StageWork, settings: Settings) -> None:
    """Entry point of a stage daemon: logging, signals, the loop. Its migrations are read
    first: a broken install (the SQL files missing) stops it in one line, before it claims; so
    does a link, FIFO or device planted at the daemon's folder or its activity log."""
    try:
        for component in stage.schemas:
            migrations(component)
    except MigrationError as exc:
        raise SystemExit(f"{stage.service}: database schema: {exc}") from None
    try:
        setup_logging(stage.service, stage.folder, root_dir=settings.shared_dir)
    except Refused as exc:
        raise SystemExit(f"{stage.service}: {exc}") from None
    daemon = Daemon(stage, settings)
    daemon.install_signals()
    try:
        daemon.run()
    except MigrationError as exc:
        daemon.log.critical("database schema: %s", exc)
        raise SystemExit(f"{stage.service}: database schema: {exc}") from None
    except Refused as exc:
        daemon.log.critical("%s", exc)
        raise SystemExit(f"{stage.service}: {exc}") from None
