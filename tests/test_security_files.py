"""Nothing outside the shared folder is read or written: links, FIFOs and devices planted in
$SHARED_DIR are refused with a reason, never opened; temporary files cannot be redirected;
the importer refuses what it must not follow; a shard server can read no file of a daemon.

Real processes against the real API and MariaDB; the secret is a file outside the shared
folder holding a marker, looked for afterwards in every file, log and database row."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import orjson
import pymysql
import pytest

from app import db, layout, safefiles
from app.atomic import atomic_write, writer_alive
from app.client import ApiError
from app.daemon import empty_folder
from app.ingest.generator import Generator, write_event_file
from tests import servers


@pytest.fixture
def secret(tmp_path) -> tuple[Path, bytes]:
    """A file outside the shared folder, as /proc/self/environ or ~/.ssh/id_rsa would be."""
    marker = f"s3cret-{uuid.uuid4().hex}".encode()
    path = tmp_path / "outside" / "secret.txt"
    path.parent.mkdir()
    path.write_bytes(b"PIPELINE_API_TOKEN=" + marker + b"\n" + b'{"event_type": 0, "payload": {"x": "'
                     + marker + b'"}}\n')
    return path, marker


def assert_nowhere(marker: bytes, shared: Path, logs: list[Path], databases=()) -> None:
    """The marker is in no regular file of the shared folder, no log, no row of any table."""
    for folder, _dirs, files in os.walk(shared):
        for name in files:
            path = Path(folder) / name
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                assert marker not in path.read_bytes(), f"the secret leaked into {path}"
    for log in logs:
        assert marker not in log.read_bytes(), f"the secret leaked into {log}"
    for url in databases:
        conn = servers.admin_connect(url.host, url.port, url.database)
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW TABLES")
                for (table,) in cur.fetchall():
                    cur.execute(f"SELECT * FROM `{table}`")
                    assert marker.decode() not in repr(cur.fetchall()), f"the secret leaked into {table}"
        finally:
            conn.close()


def daemon_env(api, **extra) -> dict:
    return {**api.process.env, "LEASE_SECONDS": "5", "POLL_MAX_SECONDS": "0.1", "WORKER_ID": "test-security",
            **{k: str(v) for k, v in extra.items()}}


def shard_status(client, name: str, stage: str) -> list[tuple[str, str | None]]:
    key = stage.replace("-", "_") + "_status"
    return [(s[key], s.get("last_error")) for s in client.file(name)["shards"]]


def wait_failed(client, name: str, stage: str, proc: servers.Process, timeout: float = 30.0):
    def failed():
        if proc.proc.poll() is not None:
            raise AssertionError(f"{proc.module} exited:\n{proc.output()[-3000:]}")
        got = shard_status(client, name, stage)
        return got if all(status == "failed" for status, _ in got) else None
    return servers.wait_until(failed, timeout, 0.05, what=f"{name} failed at {stage}")


def register_as_the_original_generator(client, name: str) -> None:
    """The original generator registers a file itself (before writing it), then marks it done."""
    client.register(name)
    client.ingest_done(name)


def ingest(env: dict, args: list[str], log: Path) -> servers.Process:
    return servers.Process("app.ingest", args, env, log).start()


# -- 1. a link to a secret, planted as a source file --------------------------------------------

def test_a_link_to_a_secret_in_events_is_never_read(api, shared_dir, pipeline_db, secret, tmp_path):
    path, marker = secret
    events = layout.events_dir(shared_dir)
    events.mkdir()
    planted = "20990101000010"
    layout.source_file(shared_dir, planted).symlink_to(path)
    good = "20990101000020"   # an ordinary file with a bad line: its rejected record is private
    layout.source_file(shared_dir, good).write_bytes(
        b'{"event_type":4,"payload":{"shop_id":3,"active":true},"saved_at":"2099-01-01 00:00:20.000",'
        b'"timestamp":"2099-01-01 00:00:20.000"}\nnot json\n')
    client = api.client()
    env = daemon_env(api)

    # event-ingest's recovery registers unknown files: not this one, and it says why
    run = subprocess.run([sys.executable, "-m", "app.ingest", "--files", "1", "--events", "3"], cwd=servers.ROOT,
                         env=env, capture_output=True, timeout=60)
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    out = run.stdout.decode()
    assert f"{planted}.event-ingest.txt is a symbolic link, not a regular file: refused" in out
    with pytest.raises(ApiError) as missing:
        client.file(planted)
    assert missing.value.status == 404
    assert [s for s, _ in shard_status(client, good, "event-ingest")] == ["done", "done"]

    # registered anyway (as the original generator would): the splitter fails the task, saying why
    register_as_the_original_generator(client, planted)
    splitter = servers.Process("app.splitter", [], env, tmp_path / "splitter.log").start()
    try:
        failed = wait_failed(client, planted, "shard-splitter", splitter)
        servers.wait_until(lambda: all(s == "done" for s, _ in shard_status(client, good, "shard-splitter")),
                           30, what="the ordinary file split")
        # files of the contract stay readable by other tools; rejected lines and logs are private
        split = layout.splitter_dir(shared_dir)
        assert stat.S_IMODE(layout.splitter_rejected(shared_dir, good).stat().st_mode) == 0o600
        assert stat.S_IMODE(layout.splitter_output(shared_dir, good, 1).stat().st_mode) == 0o644
        assert stat.S_IMODE((split / "activity.log").stat().st_mode) == 0o600
        assert_nowhere(marker, shared_dir, [splitter.log_path])
    finally:
        assert splitter.stop() == 0, splitter.output()[-3000:]
    for _, error in failed:
        assert error.startswith("source refused: ") and "is a symbolic link, not a regular file" in error
    assert str(path) not in splitter.output()   # where the link leads is not even named

    assert_nowhere(marker, shared_dir, [splitter.log_path, api.process.log_path], [pipeline_db])
    assert marker not in run.stdout + run.stderr
    assert stat.S_IMODE(layout.source_file(shared_dir, run.stdout.decode().split()[-1]).stat().st_mode) == 0o644


# -- 2. a FIFO and /dev/zero ------------------------------------------------------------------------

def test_a_fifo_and_dev_zero_in_events_neither_hang_nor_spin(api, shared_dir, tmp_path):
    events = layout.events_dir(shared_dir)
    events.mkdir()
    fifo, zero = "20990101000030", "20990101000031"
    os.mkfifo(layout.source_file(shared_dir, fifo))
    layout.source_file(shared_dir, zero).symlink_to("/dev/zero")
    client = api.client()
    env = daemon_env(api, INGEST_INTERVAL="0.3", EVENTS_PER_FILE="5", INGEST_SEED="7")

    # one-shot mode: its recovery (in the main thread) must not block on the FIFO
    run = subprocess.run([sys.executable, "-m", "app.ingest", "--files", "1", "--events", "2"], cwd=servers.ROOT,
                         env=env, capture_output=True, timeout=60)
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    assert "is a FIFO, not a regular file: refused" in run.stdout.decode()

    # the daemon keeps writing and registering files, and stops on SIGTERM within seconds
    proc = ingest(env, [], tmp_path / "ingest.log")
    try:
        def registered_more():
            if proc.proc.poll() is not None:
                raise AssertionError(proc.output()[-3000:])
            names = sorted(p.name.split(".")[0] for p in events.glob("*.event-ingest.txt")
                           if p.name.split(".")[0] not in (fifo, zero) and p.is_file())
            return len(names) >= 3 and all(s == "done" for n in names
                                           for s, _ in shard_status(client, n, "event-ingest"))
        servers.wait_until(registered_more, 30, 0.1, what="files written and registered beside the FIFO")
        proc.signal(signal.SIGTERM)
        started = time.monotonic()
        assert proc.proc.wait(10) == 0, proc.output()[-3000:]
        assert time.monotonic() - started < 10
    finally:
        proc.stop()
    log = proc.output()
    assert f"{fifo}.event-ingest.txt is a FIFO" in log and f"{zero}.event-ingest.txt is a symbolic link" in log

    # registered behind our back: the splitter fails both tasks and goes on
    for name in (fifo, zero):
        register_as_the_original_generator(client, name)
    splitter = servers.Process("app.splitter", [], env, tmp_path / "splitter.log").start()
    try:
        for name, what in ((fifo, "is a FIFO, not a regular file"), (zero, "is a symbolic link")):
            assert all(what in error for _, error in wait_failed(client, name, "shard-splitter", splitter))
    finally:
        started = time.monotonic()
        assert splitter.stop() == 0, splitter.output()[-3000:]
        assert time.monotonic() - started < 10


# -- 3. links at temporary names, final names and folder names ------------------------------------

def test_links_at_temporary_and_final_names_are_never_written_through(tmp_path):
    shared = tmp_path / "shared"
    folder = layout.splitter_dir(shared)
    folder.mkdir(parents=True)
    outside = tmp_path / "precious.txt"
    outside.write_bytes(b"precious")
    final = layout.splitter_output(shared, "20990101000040", 0)
    # the temporary name earlier releases used, `<final>.tmp-<pid>`, is predictable: plant there
    (folder / f"{final.name}.tmp-{os.getpid()}").symlink_to(outside)
    final.symlink_to(outside)
    with atomic_write(final) as f:
        f.write(b"the split\n")
    assert outside.read_bytes() == b"precious"
    assert not final.is_symlink() and final.read_bytes() == b"the split\n"

    events = layout.events_dir(shared)
    events.mkdir()
    (events / f"20990101000041.event-ingest.txt.tmp-{os.getpid()}").symlink_to(outside)
    path, _ = write_event_file(Generator(seed=1), events, "20990101000041", 3)
    assert outside.read_bytes() == b"precious" and path.is_file() and not path.is_symlink()


def test_temporary_names_are_unguessable_and_say_which_container_writes_them(tmp_path):
    shared = tmp_path / "shared"
    names = set()
    for _ in range(3):
        with safefiles.Folder(shared / "x", shared, create=True) as folder:
            fd, name = folder.create_temp("a.txt")
            os.close(fd)
            names.add(name)
    assert len(names) == 3
    assert {safefiles.temp_writer(n) for n in names} == {(safefiles.space_id(), os.getpid())}
    # pid 1 of another container (every Kubernetes program is pid 1): alive as long as it writes
    other = "0123456789" if safefiles.space_id() != "0123456789" else "9876543210"
    theirs = shared / "x" / f"b.txt.tmp-{other}-{os.getpid()}-00000000"
    theirs.write_bytes(b"another container's unfinished file")
    assert writer_alive(theirs, other_than_me=True)
    empty_folder(shared / "x", shared)
    assert [p.name for p in (shared / "x").iterdir()] == [theirs.name]
    old = time.time() - 3600
    os.utime(theirs, (old, old))
    assert not writer_alive(theirs, other_than_me=True)
    empty_folder(shared / "x", shared)
    assert not list((shared / "x").iterdir())


def test_a_link_at_a_daemons_folder_or_log_is_refused_and_nothing_outside_is_touched(api, shared_dir, tmp_path):
    outside = tmp_path / "home"
    outside.mkdir()
    (outside / "notes.txt").write_bytes(b"not the pipeline's")
    layout.worker_dir(shared_dir, 0).symlink_to(outside)
    run = subprocess.run([sys.executable, "-m", "app.worker", "--shard", "0"], cwd=servers.ROOT,
                         env=daemon_env(api), capture_output=True, timeout=60)
    assert run.returncode != 0
    assert "shard-worker-0 is a symbolic link, not a folder: refused" in run.stderr.decode()
    assert sorted(p.name for p in outside.iterdir()) == ["notes.txt"]     # not emptied, no log in it

    sender = layout.sender_dir(shared_dir, 1)
    sender.mkdir(parents=True)
    (sender / "activity.log").symlink_to(outside / "notes.txt")
    run = subprocess.run([sys.executable, "-m", "app.sender", "--shard", "1"], cwd=servers.ROOT,
                         env=daemon_env(api), capture_output=True, timeout=60)
    assert run.returncode != 0
    assert "activity.log is a symbolic link, not a regular file: refused" in run.stderr.decode()
    assert (outside / "notes.txt").read_bytes() == b"not the pipeline's"

    with pytest.raises(safefiles.Refused):
        empty_folder(layout.worker_dir(shared_dir, 0), shared_dir)
    assert (outside / "notes.txt").exists()


# -- 4. --import ----------------------------------------------------------------------------------

def test_import_refuses_a_link_or_fifo_inside_a_folder_and_names_it(api, shared_dir, secret, tmp_path):
    path, marker = secret
    folder = tmp_path / "to-import"
    folder.mkdir()
    (folder / "20990101000050.event-ingest.txt").write_bytes(
        b'{"event_type":4,"payload":{"shop_id":3,"active":true},"saved_at":"2099-01-01 00:00:50.000",'
        b'"timestamp":"2099-01-01 00:00:50.000"}\n')
    (folder / "20990101000051.event-ingest.txt").symlink_to(path)
    env = daemon_env(api)
    run = subprocess.run([sys.executable, "-m", "app.ingest", "--import", str(folder)], cwd=servers.ROOT,
                         env=env, capture_output=True, timeout=60)
    assert run.returncode == 2
    assert (f"{folder / '20990101000051.event-ingest.txt'} is a symbolic link: --import copies only regular "
            f"files from a folder (nothing was imported" in run.stdout.decode())
    assert not list(layout.events_dir(shared_dir).glob("*.event-ingest.txt"))
    assert_nowhere(marker, shared_dir, [])
    with pytest.raises(ApiError):
        api.client().file("20990101000050")

    fifo = tmp_path / "20990101000052.event-ingest.txt"
    os.mkfifo(fifo)
    run = subprocess.run([sys.executable, "-m", "app.ingest", "--import", str(fifo)], cwd=servers.ROOT,
                         env=env, capture_output=True, timeout=60)
    assert run.returncode == 2 and f"{fifo} is a FIFO: only regular files are imported" in run.stdout.decode()

    # a link the operator names is the operator's choice: imported (a copy, not the link)
    (folder / "20990101000051.event-ingest.txt").unlink()
    named = tmp_path / "20990101000053.event-ingest.txt"
    named.symlink_to(folder / "20990101000050.event-ingest.txt")
    run = subprocess.run([sys.executable, "-m", "app.ingest", "--import", str(named)], cwd=servers.ROOT,
                         env=env, capture_output=True, timeout=60)
    assert run.returncode == 0, run.stdout.decode()[-2000:]
    copy = layout.source_file(shared_dir, "20990101000053")
    assert not copy.is_symlink() and copy.read_bytes() == (folder / "20990101000050.event-ingest.txt").read_bytes()


# -- 5. the worker's and the sender's inputs --------------------------------------------------------

def test_links_at_a_shard_file_or_a_prepared_file_fail_their_task(api, shared_dir, pipeline_db, shard_dbs, secret,
                                                                 tmp_path):
    path, marker = secret
    client = api.client()
    name = "20990101000060"
    client.register(name, [0])
    client.ingest_done(name)
    client.start("shard-splitter", name, 0, "test")
    client.done("shard-splitter", name, 0, "test", events=2)
    layout.splitter_dir(shared_dir).mkdir()
    layout.splitter_output(shared_dir, name, 0).symlink_to(path)
    worker = servers.Process("app.worker", ["--shard", "0"], daemon_env(api), tmp_path / "worker.log").start()
    try:
        [(_, error)] = wait_failed(client, name, "shard-worker", worker)
    finally:
        assert worker.stop() == 0, worker.output()[-3000:]
    assert error.startswith("shard file refused: ") and "is a symbolic link, not a regular file" in error

    other = "20990101000061"
    client.register(other, [1])
    client.ingest_done(other)
    for stage in ("shard-splitter", "shard-worker"):
        client.start(stage, other, 1, "test")
        client.done(stage, other, 1, "test", events=2)
    layout.worker_dir(shared_dir, 1).mkdir()
    layout.worker_output(shared_dir, other, 1).symlink_to(path)
    sender = servers.Process("app.sender", ["--shard", "1"], daemon_env(api), tmp_path / "sender.log").start()
    try:
        [(_, error)] = wait_failed(client, other, "mysql-sender", sender)
    finally:
        assert sender.stop() == 0, sender.output()[-3000:]
    assert error.startswith("prepared file refused: ") and "is a symbolic link, not a regular file" in error
    assert_nowhere(marker, shared_dir, [worker.log_path, sender.log_path], [pipeline_db, *shard_dbs])


# -- 6. LOAD DATA LOCAL -------------------------------------------------------------------------------

def test_a_shard_server_can_read_no_file_of_the_daemon(shard_dbs, secret):
    """A server answers LOAD DATA LOCAL by naming the file it wants. What a rogue server would
    ask for is what a statement names here: only the bytes the statement offers are sent."""
    path, marker = secret
    conn = db.connect(shard_dbs[0], local_infile=True)
    try:
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE got (line TEXT)")
            with pytest.raises(pymysql.err.OperationalError, match="which this statement does not send: refused"):
                cur.execute("LOAD DATA LOCAL INFILE %s INTO TABLE got", (str(path),))
            with pytest.raises(db.LocalFileRefused):
                db.load_local(cur, "LOAD DATA LOCAL INFILE %s INTO TABLE got", (str(path),), "chunk-1.tsv", b"x\n")
            assert db.load_local(cur, "LOAD DATA LOCAL INFILE %s INTO TABLE got", ("chunk-1.tsv",),
                                 "chunk-1.tsv", b"offered\n") == 1
            cur.execute("SELECT line FROM got")
            assert cur.fetchall() == (("offered",),)
        plain = db.connect(shard_dbs[0])
        try:
            with plain.cursor() as cur, pytest.raises((pymysql.err.MySQLError, RuntimeError)):
                cur.execute("LOAD DATA LOCAL INFILE %s INTO TABLE got", (str(path),))
        finally:
            plain.close()
    finally:
        conn.close()
    assert marker.decode() not in repr(servers.query(shard_dbs[0], "SELECT line FROM got"))


def test_rejected_records_of_the_worker_are_private(api, shared_dir, tmp_path):
    client = api.client()
    name = "20990101000070"
    client.register(name, [0])
    client.ingest_done(name)
    client.start("shard-splitter", name, 0, "test")
    client.done("shard-splitter", name, 0, "test", events=1)
    layout.splitter_dir(shared_dir).mkdir()
    layout.splitter_output(shared_dir, name, 0).write_bytes(b"not json\n")
    worker = servers.Process("app.worker", ["--shard", "0"], daemon_env(api), tmp_path / "worker.log").start()
    try:
        servers.wait_until(lambda: shard_status(client, name, "shard-worker")[0][0] == "done", 30,
                           what="the worker's task")
        rejected = layout.worker_rejected(shared_dir, name, 0)
        assert orjson.loads(rejected.read_bytes())["reason"] == "malformed"
        assert stat.S_IMODE(rejected.stat().st_mode) == 0o600
        assert stat.S_IMODE(layout.worker_output(shared_dir, name, 0).stat().st_mode) == 0o644
    finally:
        assert worker.stop() == 0, worker.output()[-3000:]
