"""The whole pipeline as real processes: API, splitter, workers and senders (any replicas),
plus the checks every end-to-end run makes against the ground truth.

Used by the end-to-end and chaos tests and by bench/pipeline.py.
"""
from __future__ import annotations

import json
import random
import shutil
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
from app.worker.ledger import ALL_BALANCES
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
        return self.start_api().start_daemons()

    def start_api(self) -> "Pipeline":
        self.api = servers.start_api(self.env, self.root / "logs", self.api_module)
        return self

    def start_daemons(self) -> "Pipeline":
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
    balances = dict(servers.query(pipe.pipeline_db, ALL_BALANCES))
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


# -- one enormous line at the door of each stage -------------------------------------------------

BIG_LINE_NAMES = {"source": "20260601000003", "worker": "20260601000001", "sender": "20260601000002"}


def _write_lines_around(path: Path, before: list[bytes], head: bytes, size: int, tail: bytes,
                        after: list[bytes]) -> None:
    """`before`, then one line of exactly `size` bytes (`head`, filler, `tail`), then `after`;
    written a MiB at a time, so the writer never holds the line either."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"".join(before))
        f.write(head)
        left = size - len(head) - len(tail)
        piece = b"x" * (1 << 20)
        while left > 0:
            f.write(piece[:left])
            left -= len(piece)
        f.write(tail + b"\n")
        f.write(b"".join(after))


def _event_line(n: int, shop: int, minute: int = 0) -> bytes:
    return json.dumps({"event_type": 0, "payload": {"shop_id": shop, "good_id": 1, "delta_count": n + 1},
                       "timestamp": f"2026-06-01 00:{minute:02d}:00.{n:03d}"}).encode() + b"\n"


def _prepared_line(n: int, name: str, pad: str = "") -> bytes:
    payload = {"shop_id": 4, "good_id": 1, "delta_count": n + 1}
    # compact, as the worker writes prepared lines (the sender takes no other form)
    return json.dumps({"event_key": f"0:hbig{n:028d}", "event_type": 0, "shop_id": 4, "user_id": None,
                       "timestamp": "2026-06-01 00:00:00.000", "shard": 0, "order_id": None, "good_id": 1,
                       "qty": n + 1, "amount": None, "source_file": name, "payload": payload},
                      separators=(",", ":")).encode() + b"\n"


def big_line_run(pipe: Pipeline, size: int, work: Path) -> tuple[dict, dict, dict]:
    """Put a line of `size` bytes (a valid event but for its size) in front of each stage in
    turn, with the real processes: in a source file (imported by event-ingest, read by the
    splitter), in a shard file the worker reads (the test plays the splitter, which is stopped
    by then) and in a prepared file the sender reads (the test plays the splitter and the worker,
    both stopped). Each daemon's peak RSS is read just before it stops. Returns the peaks, the
    exit codes (None: the daemon had died before) and every file's shards from the API."""
    rss: dict[str, float] = {}
    codes: dict[str, int | None] = {}

    def stop(prefix: str) -> None:
        for name, proc in pipe.daemons.items():
            if name.startswith(prefix) and name not in codes:
                alive = proc.proc.poll() is None
                rss[name] = peak_rss_mib(proc.proc.pid) if alive else float("nan")
                code = proc.stop(20)
                codes[name] = code if alive else None

    def head(minute: int) -> bytes:
        return b'{"event_type":2,"timestamp":"2026-06-01 00:%02d:00.500","payload":{"shop_id":4,"good_id":1,' \
               b'"new_price":9.5,"pad":"' % minute
    pipe.start()
    source = work / "big-source"
    lines = [_event_line(n, n % 4) for n in range(50)]
    _write_lines_around(source / f"{BIG_LINE_NAMES['source']}{ground_truth.SUFFIX}", lines[:25], head(0), size,
                        b'"}}', lines[25:])
    pipe.import_files(source)
    shutil.rmtree(source, ignore_errors=True)
    wait_settled(pipe, [BIG_LINE_NAMES["source"]], timeout=300)
    stop("shard-splitter")

    client = pipe.api.client()
    shared = pipe.shared
    for stage in ("worker", "sender"):
        name = BIG_LINE_NAMES[stage]
        for shard in (0, 1):
            lines = [_event_line(n, 2 * n + shard, 1) for n in range(50)]
            path = shared / "shard-splitter" / f"{name}.shard-splitter.{shard}.txt"
            if stage == "worker" and shard == 0:
                _write_lines_around(path, lines[:25], head(1), size, b'"}}', lines[25:])
            else:
                path.write_bytes(b"".join(lines))
            if stage == "sender":
                prepared = shared / f"shard-worker-{shard}" / f"{name}.shard-worker.{shard}.prepared.txt"
                rows = [_prepared_line(n, name) for n in range(50)] if shard == 0 else []
                if shard == 0:
                    big = _prepared_line(99, name).replace(b'"payload":{', b'"payload":{"pad":"', 1)
                    cut = big.index(b'"pad":"') + len(b'"pad":"')
                    _write_lines_around(prepared, rows[:25], big[:cut], size, b'",' + big[cut:-1], rows[25:])
                else:
                    prepared.parent.mkdir(parents=True, exist_ok=True)
                    prepared.write_bytes(b"")
        client.register(name, [0, 1])
        client.ingest_done(name)
        for shard in (0, 1):
            for stage_name in ["shard-splitter"] + (["shard-worker"] if stage == "sender" else []):
                client.start(stage_name, name, shard, f"test/{stage_name}")
                client.done(stage_name, name, shard, f"test/{stage_name}", events=50)
        wait_settled(pipe, [name], timeout=300)
        stop("shard-worker")
    stop("mysql-sender")
    files = {name: client.file(name)["shards"] for name in BIG_LINE_NAMES.values()}
    return rss, codes, files


def wait_settled(pipe: Pipeline, names: list[str], timeout: float) -> dict[str, list[dict]]:
    """Until every task of `names` is done at mysql-sender or failed somewhere: each file's shards."""
    client = pipe.api.client()
    stages = ("shard_splitter_status", "shard_worker_status", "mysql_sender_status")

    def settled():
        files = {n: client.file(n)["shards"] for n in names}
        for shards in files.values():
            for s in shards:
                if s["mysql_sender_status"] != "done" and "failed" not in (s[k] for k in stages):
                    return None
        return files
    try:
        return servers.wait_until(settled, timeout, 0.5, what="every task settled")
    except TimeoutError:
        raise AssertionError(f"not settled: {[client.file(n)['shards'] for n in names]}\n{pipe.logs()}") from None


def peak_rss_mib(pid: int) -> float:
    """VmHWM of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for {pid}")
