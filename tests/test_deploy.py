"""The deployment files without Docker: the Dockerfile copies what exists and runs the one
supervisord.conf, compose sets only settings the app reads and never publishes an open API,
and supervisord.conf is what supervisor itself parses into the expected programs."""
from __future__ import annotations

import filecmp
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from app import db
from app.config import ConfigError, Settings, Supervision, packaged_supervisord_conf, shard_arg
from app.supervision import supervise

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
CONFIG = ROOT / "supervisord.conf"
VOLUME = "/var/lib/pipeline"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [ln for ln in DOCKERFILE.read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line:
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def image_command() -> list[str]:
    """The image's ENTRYPOINT (exec form)."""
    [entry] = [args for word, args in dockerfile_instructions() if word == "ENTRYPOINT"]
    return json.loads(entry)


def image_env() -> dict[str, str]:
    env = {}
    for word, args in dockerfile_instructions():
        if word == "ENV":
            for key, value in re.findall(r"(\w+)=(\S+)", args):
                env[key] = value
    return env


def image_copies() -> list[tuple[list[str], str]]:
    """(sources in the build context, destination) of each COPY from the context."""
    out = []
    for word, args in dockerfile_instructions():
        if word in ("COPY", "ADD"):
            assert word == "COPY" and "--from" not in args, "the image copies only from the context"
            parts = [p for p in args.split() if not p.startswith("--")]
            out.append((parts[:-1], parts[-1]))
    return out


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


class RecordingEnv(dict):
    """An environment that remembers which variables were asked for."""

    def __init__(self, data):
        super().__init__(data)
        self.read: set[str] = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def settings_read(env: dict[str, str], tmp_path: Path | None = None) -> set[str]:
    """Every variable app/config.py reads when given `env` (as the services and
    pipeline-supervise do at start). A token file is given a real file to read."""
    env = dict(env)
    if "PIPELINE_API_TOKEN_FILE" in env:
        token = (tmp_path or Path(tempfile.mkdtemp())) / "token"
        token.write_text("t0ken\n")
        env["PIPELINE_API_TOKEN_FILE"] = str(token)
    recording = RecordingEnv(env)
    settings = Settings.from_env(recording)
    Supervision.from_env(recording)
    shard_arg(recording, None if "SHARD_ID" in env else 0, settings.shard_count)
    return recording.read


# -- Dockerfile -----------------------------------------------------------------------------------

def test_dockerfile_copies_only_files_that_exist_and_are_not_dockerignored():
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    copied = [source for sources, _ in image_copies() for source in sources]
    assert copied, "the Dockerfile copies nothing"
    for source in copied:
        assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"
        assert source.rstrip("/") not in ignored, f"Dockerfile copies {source}, but .dockerignore drops it"
    # What the package needs to build is in the image: the code, the SQL and the config its links
    # point to (app/sql -> ../db, app/supervision/supervisord.conf -> ../../supervisord.conf).
    assert {"app", "db", "monitor", "pyproject.toml", "README.md", "supervisord.conf"} <= set(copied)
    # The config the container runs is this one.
    assert (["supervisord.conf"], "/app/supervisord.conf") in image_copies()


def test_image_runs_pipeline_supervise_on_the_config_as_a_non_root_user_with_a_volume():
    command = image_command()
    assert command == ["pipeline-supervise", "-c", "/app/supervisord.conf"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert scripts["project"]["scripts"]["pipeline-supervise"] == "app.supervision.supervise:main"
    assert scripts["project"]["scripts"]["pipeline-monitor"] == "monitor.__main__:main"
    users = [args for word, args in dockerfile_instructions() if word == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
    assert [args for word, args in dockerfile_instructions() if word == "WORKDIR"][-1] == "/app"
    assert [json.loads(a) for w, a in dockerfile_instructions() if w == "VOLUME"] == [[VOLUME]]
    env = image_env()
    # Everything that must outlive the container is on the volume.
    for key in ("SHARED_DIR", "EMBEDDED_MARIADB_DIR", "PIPELINE_API_TOKEN_FILE"):
        assert env[key].startswith(VOLUME + "/"), key
    sup = Supervision.from_env(env, Path("/app/supervisord.conf"))
    assert sup.exit_on_fatal, "in a container a FATAL program must end supervisord"
    assert env["SUPERVISOR_SOCKET"] == str(sup.socket) == "/app/var/run/supervisor.sock"
    # Safe by default: no token given, so one is generated; never an insecure switch.
    assert "PIPELINE_API_TOKEN" not in env and "PIPELINE_API_INSECURE" not in env
    # Python's and pip's own variables aside, the image sets only settings the app reads.
    assert set(env) - {"PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "PIP_NO_CACHE_DIR",
                       "PIP_DISABLE_PIP_VERSION_CHECK"} <= settings_read(env)
    assert not any(key.startswith("MYSQL_") for key in env), "alone, the image runs its embedded MariaDB"


# -- docker-compose.yml ---------------------------------------------------------------------------

def test_every_variable_compose_gives_the_app_is_one_the_app_reads(tmp_path):
    app = compose()["services"]["app"]
    env = {**image_env(), **{k: str(v) for k, v in app["environment"].items()}}
    read = settings_read(env, tmp_path)
    unknown = sorted(set(app["environment"]) - read)
    assert not unknown, f"compose sets variables app/config.py never reads: {unknown}"
    settings = Settings.from_env({k: str(v) for k, v in app["environment"].items()})
    assert settings.shard_count == 2


def test_compose_publishes_the_api_on_loopback_only_behind_a_generated_token():
    app = compose()["services"]["app"]
    [port] = app["ports"]
    published = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", port)  # compose's ${VAR:-default}, unset
    assert published == "127.0.0.1:8082:8082", port
    env = {**image_env(), **{k: str(v) for k, v in app["environment"].items()}}
    assert "PIPELINE_API_INSECURE" not in env and "PIPELINE_API_TOKEN" not in env
    assert env["PIPELINE_API_TOKEN_FILE"].startswith(VOLUME + "/")
    assert f"pipeline-data:{VOLUME}" in app["volumes"]


def test_compose_app_waits_for_three_healthy_mysql_servers_whose_schema_the_services_own():
    doc = compose()
    services = doc["services"]
    app = services["app"]
    settings = Settings.from_env({k: str(v) for k, v in app["environment"].items()})
    urls = [settings.pipeline_db, *settings.shard_dbs]
    hosts = [u.host for u in urls]
    assert hosts == ["mysql-pipeline", "mysql-shard-0", "mysql-shard-1"]
    for url in urls:
        server = services[url.host]
        assert str(server["image"]).startswith("mysql:8.0")
        env = server["environment"]
        assert env["MYSQL_DATABASE"] == url.database
        assert (env["MYSQL_USER"], env["MYSQL_PASSWORD"]) == (url.user, url.password)
        assert "healthcheck" in server and server["healthcheck"]["test"]
        assert app["depends_on"][url.host]["condition"] == "service_healthy"
        # No DDL at init: tables made outside the migrations would have no schema_migrations
        # record. The services apply db/migrations/ at start (the app image holds db/).
        assert not [m for m in server["volumes"] if "docker-entrypoint-initdb.d" in m], url.host
    assert any("COPY db " in line for line in (ROOT / "Dockerfile").read_text().splitlines())
    assert f"pipeline-data:{VOLUME}" in app["volumes"] and "pipeline-data" in doc["volumes"]
    assert urlsplit(settings.pipeline_url).port == settings.api_port == 8082


# -- package data -----------------------------------------------------------------------------------

def test_package_data_is_the_top_level_db_folder_and_supervisord_conf():
    """The package finds its SQL and its config through importlib.resources; in a checkout those
    are the top-level files themselves (a wheel holds copies: tests/test_image.py)."""
    assert packaged_supervisord_conf() == CONFIG.resolve()
    assert Path(str(db.SQL_DIR)).resolve() == (ROOT / "db").resolve()
    tracking = ROOT / "db" / "migrations" / "tracking"
    assert db.sql_files("migrations/tracking") == {p.name: p.read_text() for p in sorted(tracking.glob("*.sql"))}


# -- supervisord.conf, parsed by supervisor itself ------------------------------------------------

def config_copy(tmp_path: Path) -> Path:
    """supervisord.conf, byte for byte, in a folder of the test's own (its state goes beside it)."""
    (tmp_path / "var" / "run").mkdir(parents=True)
    shutil.copy(CONFIG, tmp_path / "supervisord.conf")
    assert filecmp.cmp(CONFIG, tmp_path / "supervisord.conf", shallow=False)
    return tmp_path / "supervisord.conf"


def test_config_names_only_variables_pipeline_supervise_fills_in(tmp_path):
    """supervisor stops on a %(ENV_X)s that is not set (it has no defaults), so every variable
    the file names must be one pipeline-supervise supplies, and the file's header lists them."""
    text = CONFIG.read_text()
    settings_lines = "\n".join(ln for ln in text.splitlines() if not ln.startswith(";"))
    named = set(re.findall(r"%\(ENV_(\w+)\)s", settings_lines))
    assert named == {"APID_PROCESSES", "INGEST_PROCESSES", "SPLITTER_PROCESSES", "SPLITTER_FIRST",
                     "WORKER_PROCESSES", "WORKER_FIRST", "SENDER_PROCESSES", "SENDER_FIRST"}
    assert set(supervise.config_defaults({})) >= named
    header = "\n".join(ln for ln in text.splitlines() if ln.startswith(";"))
    for name in named:
        assert re.search(rf";\s+{name}\s", header), f"the header does not document {name}"
    config = config_copy(tmp_path)
    with pytest.raises(ValueError, match="ENV_SENDER_PROCESSES"):
        supervise.parse_config(config, {k: v for k, v in supervise.config_defaults({}).items()
                                        if k != "SENDER_PROCESSES"})
    assert supervise.program_names(config, {}) == [  # every default filled in
        "pipeline-apid", "mysql-sender:mysql-sender-0", "mysql-sender:mysql-sender-1",
        "shard-worker:shard-worker-0", "shard-worker:shard-worker-1", "shard-splitter:shard-splitter-0",
        "event-ingest"]


@pytest.mark.parametrize("shards, splitters, senders", [(1, 1, 1), (3, 2, 3)])
def test_config_has_every_program_once_with_bounded_graceful_stops(tmp_path, shards, splitters, senders):
    config = config_copy(tmp_path)
    env = supervise.supervisord_env({"SHARD_COUNT": str(shards), "SPLITTER_REPLICAS": str(splitters),
                                     "SENDER_REPLICAS": str(senders), "PATH": "/usr/bin"})
    assert env["SENDER_PROCESSES"] == str(shards * senders)
    options = supervise.parse_config(config, env)
    assert options.nodaemon
    from supervisor.options import ClientOptions
    client = ClientOptions()  # what supervisorctl -c supervisord.conf reads
    client.realize(["-c", str(config)])
    assert client.serverurl == f"unix://{tmp_path}/var/run/supervisor.sock"
    assert options.pidfile == f"{tmp_path}/var/run/supervisord.pid"
    [server] = options.configroot.supervisord.server_configs
    assert server["file"] == f"{tmp_path}/var/run/supervisor.sock" and server["chmod"] == 0o700
    programs, listeners = {}, {}
    for group in options.process_group_configs:
        for process in group.process_configs:
            name = process.name if process.name == group.name else f"{group.name}:{process.name}"
            (listeners if hasattr(group, "pool_events") else programs)[name] = (group, process)
    assert list(programs) == list(dict.fromkeys(programs))
    assert sorted(programs) == sorted(supervise.program_names(config, env))
    assert len(programs) == 2 + shards * (1 + senders) + splitters
    assert "pipeline-apid" in programs and "event-ingest" in programs
    assert f"shard-splitter:shard-splitter-{splitters - 1}" in programs
    served = {}
    for name, (group, p) in programs.items():
        assert p.stopsignal == signal.SIGTERM and p.stopasgroup and p.killasgroup, name
        assert p.stopwaitsecs == 30 and p.startsecs == 5 and p.startretries == 3, name
        assert p.stdout_logfile == "/dev/stdout" and p.stdout_logfile_maxbytes == 0 and p.redirect_stderr, name
        assert p.autorestart and p.directory == str(tmp_path)
        assert p.command.startswith("python -m app."), p.command
        if name != "pipeline-apid":  # each daemon owns its claims under its own name
            assert p.environment["WORKER_ID"].endswith(f"/{p.name}"), (name, p.environment)
        number = re.search(r"-(\d+)$", p.name)
        if group.name == "shard-worker":
            assert p.command.endswith(f"--shard {number.group(1)}"), p.command
        if group.name == "mysql-sender":
            slot = int(re.search(r"--slot (\d+)$", p.command).group(1))
            assert slot == int(number.group(1))
            served.setdefault(slot % shards, []).append(p.name)
    # Every shard has SENDER_REPLICAS senders.
    assert sorted(served) == list(range(shards)) and all(len(v) == senders for v in served.values())
    # The API starts first and stops last: daemons hand their tasks back through it.
    api_priority = programs["pipeline-apid"][1].priority
    assert all(p.priority > api_priority for n, (_, p) in programs.items() if n != "pipeline-apid")
    [(group, listener)] = listeners.values()
    assert listener.command == f'python -m app.supervision.fatal_listener --here "{tmp_path}"'
    from supervisor.events import EventTypes
    assert set(group.pool_events) == {EventTypes.PROCESS_STATE_FATAL, EventTypes.PROCESS_STATE_EXITED}


def test_a_sender_slot_serves_its_shard_modulo_shard_count():
    from app.daemon import shard_of

    settings = Settings.from_env({"SHARD_COUNT": "3"})
    assert [shard_of(["--slot", str(p)], settings, "app.sender") for p in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert shard_of(["--shard", "2"], settings, "app.worker") == 2
    for bad in (["--slot", "-1"], ["--shard", "3"], ["--slot", "1", "--shard", "1"]):
        with pytest.raises(SystemExit):
            shard_of(bad, settings, "app.sender")


# -- the run folder and the token file ------------------------------------------------------------

def test_run_folder_is_created_private_and_a_foreign_or_open_one_is_refused(tmp_path):
    here = tmp_path / "short"
    here.mkdir()
    shutil.copy(CONFIG, here / "supervisord.conf")
    sup = Supervision.from_env({}, here / "supervisord.conf")
    assert supervise.prepare_run_dir(sup) == here / "var" / "run"
    assert stat.S_IMODE(sup.run_dir.stat().st_mode) == 0o700
    sup.run_dir.chmod(0o755)  # as a checkout's var/run/ arrives from git: tightened
    supervise.prepare_run_dir(sup)
    assert stat.S_IMODE(sup.run_dir.stat().st_mode) == 0o700
    refusals = {
        "belongs to uid 4242, not to you": lambda: os.chown(sup.run_dir, 4242, -1),
        "is writable by everyone": lambda: sup.run_dir.chmod(0o777),
        "is not a folder": lambda: (sup.run_dir.rmdir(), sup.run_dir.symlink_to(tmp_path)),
    }
    for message, plant in refusals.items():
        plant()
        with pytest.raises(supervise.StartError, match=message) as refused:
            supervise.prepare_run_dir(sup)
        assert "\n" not in refused.value.code
        # pipeline-supervise says it in one line and starts nothing.
        done = subprocess.run([sys.executable, "-m", "app.supervision.supervise", "-c", str(sup.config_file)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode != 0 and done.stdout == "" and done.stderr.strip() == refused.value.code
        if sup.run_dir.is_symlink():
            sup.run_dir.unlink()
        else:
            os.chown(sup.run_dir, os.geteuid(), -1)
            sup.run_dir.chmod(0o700)
        supervise.prepare_run_dir(sup)
    long = tmp_path / ("x" * 100)
    long.mkdir()
    shutil.copy(CONFIG, long / "supervisord.conf")
    with pytest.raises(supervise.StartError, match="longer than a unix socket allows"):
        supervise.prepare_run_dir(Supervision.from_env({}, long / "supervisord.conf"))


def test_the_api_token_comes_from_the_token_file_when_not_given(tmp_path):
    path = tmp_path / "api-token"
    env = {"PIPELINE_API_TOKEN_FILE": str(path)}
    with pytest.raises(ConfigError, match="PIPELINE_API_TOKEN_FILE: cannot read"):
        Settings.from_env(env)
    assert supervise.ensure_token_file(env) == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text().strip()
    assert len(token) >= 32 and Settings.from_env(env).api_token == token
    assert supervise.ensure_token_file(env) is None and path.read_text().strip() == token  # kept
    assert Settings.from_env({**env, "PIPELINE_API_TOKEN": "given"}).api_token == "given"
    path.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        Settings.from_env(env)
    link = tmp_path / "planted"
    link.symlink_to(tmp_path / "elsewhere")
    assert supervise.ensure_token_file({"PIPELINE_API_TOKEN_FILE": str(link)}) is None  # never through a link
    assert not (tmp_path / "elsewhere").exists()
