"""The whole pipeline as real processes: API, splitter, workers and senders (any replicas),
plus the checks every end-to-end run makes against the ground truth.

Used by the end-to-end and chaos tests and by bench/pipeline.py.
"""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import requests

from app.config import MySQLURL
from tests import ground_truth, servers

FAST = {
    "POLL_MIN_SECONDS": "0.01", "POLL_MAX_SECONDS": "0.1", "LEASE_SECONDS": "4", "REAP_INTERVAL": "0.5",
    "HOLD_SECONDS": "3600", "HOLD_WALL_CAP_SECONDS": "3600", "MAX_ATTEMPTS": "50",
}


@dataclass
class Pipeline:
    root: Path
    pipeline_db: MySQLURL
    shard_dbs: list[MySQLURL]
    replicas: int = 1
    extra_env: dict = field(default_factory=dict)
    api_module: str = "app.apid"  # bench/pipeline.py --profile wraps the API to count requests
    api: servers.ApiServer | None = None
    daemons: dict[str, servers.Process] = field(default_factory=dict)

    def __post_init__(self):
        self.shared = self.root / "shared"
        self.shared.mkdir(parents=True, exist_ok=True)
        self.env = servers.service_env(self.pipeline_db, self.shared, servers.free_port(), self.shard_dbs,
                                       **{**FAST, **self.extra_env})

    @property
    def shard_count(self) -> int:
        return len(self.shard_dbs)

    # -- processes -----------------------------------------------------------------------------

    def start(self) -> "Pipeline":
        self.api = servers.start_api(self.env, self.root / "logs", self.api_module)
        for r in range(1, self.replicas + 1):
            self._daemon(f"shard-splitter-r{r}", "app.splitter", [])
            for n in range(self.shard_count):
                self._daemon(f"shard-worker-{n}-r{r}", "app.worker", ["--shard", str(n)])
                self._daemon(f"mysql-sender-{n}-r{r}", "app.sender", ["--shard", str(n)])
        return self

    def _daemon(self, name: str, module: str, args: list[str]) -> servers.Process:
        env = {**self.env, "WORKER_ID": f"test/{name}"}
        proc = servers.Process(module, args, env, self.root / "logs" / f"{name}.log").start()
        self.daemons[name] = proc
        return proc

    def restart(self, name: str) -> None:
        old = self.daemons[name]
        self.daemons[name] = servers.Process(old.module, old.args, old.env, old.log_path).start()

    def kill(self, name: str) -> None:
        proc = self.daemons[name]
        proc.kill_group(signal.SIGKILL)
        if proc.proc:
            proc.proc.wait(10)

    def kill_api(self, down_for: float = 1.0) -> None:
        """SIGKILL the API (gunicorn and its workers), then start it again on the same port."""
        old = self.api.process
        old.kill_group(signal.SIGKILL)
        old.proc.wait(10)
        time.sleep(down_for)
        self.api = servers.ApiServer(servers.Process(old.module, old.args, old.env, old.log_path).start(),
                                     self.api.port)
        self.api.wait_ready()

    def stop(self) -> dict[str, int | None]:
        codes = {name: p.stop(20) for name, p in self.daemons.items()}
        if self.api:
            self.api.process.stop()
        return codes

    def logs(self) -> str:
        parts = [f"--- {n}\n{p.output()[-2500:]}" for n, p in self.daemons.items()]
        if self.api:
            parts.append(f"--- api\n{self.api.process.output()[-2500:]}")
        return "\n".join(parts)

    def import_files(self, source: Path | list[Path], timeout: float = 120.0) -> list[str]:
        """Register files as the real event-ingest does (`--import`): a folder's files, or the
        files listed."""
        folder = isinstance(source, Path)
        files = sorted(source.glob(f"*{ground_truth.SUFFIX}")) if folder else list(source)
        out = subprocess.run([sys.executable, "-m", "app.ingest", "--import", *map(str, [source] if folder else files)],
                             cwd=servers.ROOT,
                             env={**self.env, "WORKER_ID": "test/ingest"}, capture_output=True, text=True,
                             timeout=timeout)
        assert out.returncode == 0, out.stdout + out.stderr
        return sorted(p.name[: -len(ground_truth.SUFFIX)] for p in files)

    # -- waiting -------------------------------------------------------------------------------

    def summary(self) -> dict:
        return requests.get(f"{self.api.base}/metrics/summary", timeout=10).json()

    def wait_loaded(self, n_files: int, timeout: float = 120.0) -> dict:
        want = n_files * self.shard_count

        def all_loaded():
            s = self.summary()
            return s if s["by_stage"]["mysql_sender"]["done"] == want else None
        try:
            return servers.wait_until(all_loaded, timeout, 0.2, what=f"{want} tasks loaded")
        except TimeoutError:
            raise AssertionError(f"pipeline did not finish: {self.summary()}\n{self.logs()}") from None


# -- the checks ---------------------------------------------------------------------------------

def shard_rows(url: MySQLURL) -> tuple[Counter, int, int]:
    """The rows of one shard's `events` as ground-truth tuples; total rows; distinct keys."""
    rows = servers.query(url, "SELECT event_type, shop_id, user_id, `timestamp`, order_id, good_id, qty, amount, "
                              "payload, source_file, shard, event_key FROM events")
    got = Counter()
    for et, shop, user, ts, order, good, qty, amount, payload, source, shard, _key in rows:
        stamp = ts.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        got[ground_truth.row_tuple(et, shop, user, stamp, order, good, qty, amount,
                                   json.loads(payload, parse_float=Decimal), source)] += 1
    return got, len(rows), len({r[-1] for r in rows})


def check_against_truth(pipe: Pipeline, truth: ground_truth.Truth, filenames: list[str],
                        check_rejected_files: bool = True) -> None:
    """Everything an end-to-end run must satisfy once every task is loaded."""
    api = pipe.api.client()
    # 1. Every task done at every stage: nothing started, nothing failed.
    summary = api.summary()
    for stage, counts in summary["by_stage"].items():
        assert counts["started"] == 0 and counts["failed"] == 0, (stage, counts)
        assert counts["done"] == len(filenames) * pipe.shard_count, (stage, counts)
    # 2. Each accepted event is in the right shard exactly once, with the right values.
    for shard, url in enumerate(pipe.shard_dbs):
        got, total, distinct = shard_rows(url)
        assert total == distinct, f"shard {shard}: a duplicated event key"
        want = truth.rows[shard]
        missing, extra = want - got, got - want
        assert not missing and not extra, (
            f"shard {shard}: {sum(missing.values())} expected rows missing, {sum(extra.values())} unexpected;"
            f" e.g. missing {list(missing)[:2]} extra {list(extra)[:2]}")
    # 3. Per file: counts reconcile and every rejection has its reason.
    for name in filenames:
        info = api.file(name)
        for entry in info["shards"]:
            shard = entry["shard"]
            split = entry["stats"]["shard-splitter"]
            assert split["lines_in"] == sum(split["lines_by_shard"].values()) + split["rejected_total"], split
            assert Counter(split["rejected"]) == truth.splitter_rejected[name], (name, split)
            assert split["lines_by_shard"][str(shard)] == len(truth.shard_lines[(name, shard)])
            work = entry["stats"]["shard-worker"]
            assert work["in"] == truth.worker_in[(name, shard)], (name, shard, work)
            assert work["accepted"] == truth.worker_accepted[(name, shard)], (name, shard, work)
            assert Counter(work["rejected"]) == truth.worker_rejected[(name, shard)], (name, shard, work)
            # in + released + expired = accepted + rejected + held (each line decided once)
            assert (work["in"] + work["released"] + work["expired"]
                    == work["accepted"] + sum(work["rejected"].values()) + work["held"]), work
            sent = entry["stats"]["mysql-sender"]
            assert sent["events"] == work["accepted"], (name, shard, sent, work)
    if check_rejected_files:
        _check_rejected_files(pipe, truth, filenames)
    # 4. No balance went negative, and each is what the accepted money movements make it.
    balances = dict(servers.query(pipe.pipeline_db, "SELECT user_id, balance FROM worker_balances"))
    assert balances and min(balances.values()) >= 0
    assert set(balances) <= set(truth.balances), "a balance for a user no event names"
    for user, want in truth.balances.items():
        # A user whose only purchase was refused may have no row: it still has the opening balance.
        got = balances.get(user, truth.opening_balance)
        assert got == want, (user, got, want)
    assert truth.pending_holds == 0


def _check_rejected_files(pipe: Pipeline, truth: ground_truth.Truth, filenames: list[str]) -> None:
    """The rejected-line records name each line's reason (read before the daemons stop)."""
    fates = ground_truth.resolved_fates(truth)
    for name in filenames:
        path = pipe.shared / "shard-splitter" / f"{name}.shard-splitter.rejected.txt"
        records = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        assert sum(truth.splitter_rejected[name].values()) == len(records), name
        for rec in records:
            assert fates[(name, rec["line_no"])] == rec["reason"], (name, rec)
        for shard in range(pipe.shard_count):
            path = pipe.shared / f"shard-worker-{shard}" / f"{name}.shard-worker.{shard}.rejected.txt"
            got = Counter(json.loads(x)["reason"] for x in path.read_text().splitlines()) if path.exists() \
                else Counter()
            assert got == truth.worker_rejected[(name, shard)], (name, shard, got)


def chaos_loop(pipe: Pipeline, seconds: float, every: float, rng: random.Random, on_tick=None) -> list[str]:
    """SIGKILL a random daemon every `every` seconds and start it again; returns who died."""
    killed = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(every)
        name = rng.choice(sorted(pipe.daemons))
        pipe.kill(name)
        killed.append(name)
        time.sleep(rng.uniform(0.1, 0.6))
        pipe.restart(name)
        if on_tick:
            on_tick(len(killed))
    return killed
