"""What can be checked of the deployment files without Docker: the Dockerfile copies what
exists and runs the config the tests run, compose sets only settings the app reads, and the
rendered supervisord.conf is what supervisor itself parses into the expected programs."""
from __future__ import annotations

import json
import re
import signal
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from supervisor.options import ServerOptions

from app.supervision import supervise
from app.config import Settings, Supervision, shard_arg

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def image_command() -> list[str]:
    """The image's ENTRYPOINT (exec form): what the supervisor tests start as well."""
    [entry] = [args for word, args in dockerfile_instructions() if word == "ENTRYPOINT"]
    return json.loads(entry)


def image_env() -> dict[str, str]:
    env = {}
    for word, args in dockerfile_instructions():
        if word == "ENV":
            for key, value in re.findall(r"(\w+)=(\S+)", args):
                env[key] = value
    return env


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


def settings_read(env: dict[str, str]) -> set[str]:
    """Every variable app/config.py reads when given `env` (as the services do at start)."""
    recording = RecordingEnv(env)
    settings = Settings.from_env(recording)
    Supervision.from_env(recording)
    shard_arg(recording, None if "SHARD_ID" in env else 0, settings.shard_count)
    return recording.read


# -- Dockerfile -----------------------------------------------------------------------------------

def test_dockerfile_copies_only_files_that_exist_and_are_not_dockerignored():
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    copied = []
    for word, args in dockerfile_instructions():
        if word in ("COPY", "ADD"):
            parts = [p for p in args.split() if not p.startswith("--")]
            copied.extend(parts[:-1])
    assert copied, "the Dockerfile copies nothing"
    for source in copied:
        assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"
        assert source.rstrip("/") not in ignored, f"Dockerfile copies {source}, but .dockerignore drops it"
    # Everything the services load at run time is in the image.
    needed = {"app", "db", "monitor", "pyproject.toml", "README.md", supervise.TEMPLATE.name}
    assert needed <= {c.rstrip("/") for c in copied}


def test_image_runs_supervise_in_the_foreground_as_a_non_root_user_with_shared_volume():
    assert image_command() == ["python", "-m", "app.supervision.supervise"]
    users = [args for word, args in dockerfile_instructions() if word == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
    volumes = [args for word, args in dockerfile_instructions() if word == "VOLUME"]
    assert any("/shared" in v for v in volumes)
    env = image_env()
    assert env["SHARED_DIR"] == "/shared"
    assert Supervision.from_env(env).exit_on_fatal, "in a container a FATAL program must end supervisord"
    # Python's, pip's and bin/pipeline's own variables aside, the image sets only settings the app reads.
    assert set(env) - {"PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "PIP_NO_CACHE_DIR",
                       "PIP_DISABLE_PIP_VERSION_CHECK", "VENV"} <= settings_read(env)
    assert (Path(env["VENV"]) / "bin").as_posix() == "/usr/local/bin"  # python:*-slim's python
    # supervisord's nodaemon comes from the template the tests render, not from a flag only the
    # image passes.
    assert re.search(r"^nodaemon=true$", supervise.TEMPLATE.read_text(), re.M)


# -- docker-compose.yml ---------------------------------------------------------------------------

def test_every_variable_compose_gives_the_app_is_one_the_app_reads():
    app = compose()["services"]["app"]
    env = {k: str(v) for k, v in app["environment"].items()}
    read = settings_read(env)
    unknown = sorted(set(env) - read)
    assert not unknown, f"compose sets variables app/config.py never reads: {unknown}"
    settings = Settings.from_env(env)  # and every value is valid
    assert settings.shard_count == 2
    assert str(settings.shared_dir) == "/shared"


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
    # /shared is a named volume; the API answers on the contract's port.
    shared = [m for m in app["volumes"] if m.split(":")[1] == "/shared"]
    assert shared and shared[0].split(":")[0] in doc["volumes"]
    assert urlsplit(settings.pipeline_url).port == settings.api_port == 8082
    assert any(str(p).endswith(":8082") for p in app["ports"])


# -- the rendered supervisord.conf, parsed by supervisor itself -----------------------------------

@pytest.mark.parametrize("shards, splitters, senders", [(1, 1, 1), (3, 2, 3)])
def test_rendered_config_has_every_program_once_with_bounded_graceful_stops(tmp_path, shards, splitters,
                                                                             senders):
    env = {"SHARD_COUNT": str(shards), "PIPELINE_RUN_DIR": str(tmp_path), "STOP_WAIT_SECONDS": "17",
           "SPLITTER_REPLICAS": str(splitters), "SENDER_REPLICAS": str(senders)}
    settings, sup = Settings.from_env(env), Supervision.from_env(env)
    path = supervise.write_config(settings, sup)
    options = ServerOptions()
    options.realize(["-c", str(path)])
    assert options.nodaemon
    assert options.serverurl == f"unix://{tmp_path}/supervisor.sock"
    programs = {}
    listeners = {}
    for group in options.process_group_configs:
        [process] = group.process_configs
        assert process.name == group.name, "programs are top-level: supervisorctl takes the bare name"
        (listeners if hasattr(group, "pool_events") else programs)[process.name] = (group, process)
    assert sorted(programs) == sorted(supervise.program_names(shards, sup))
    assert len(programs) == 2 + shards * (1 + senders) + splitters
    assert "shard-splitter" in programs and "mysql-sender-0" in programs
    assert (f"shard-splitter-r{splitters}" in programs) == (splitters > 1)
    for name, (_, p) in programs.items():
        assert p.stopsignal == signal.SIGTERM and p.stopasgroup and p.killasgroup, name
        assert p.stopwaitsecs == 17, name
        assert p.stdout_logfile == "/dev/stdout" and p.stdout_logfile_maxbytes == 0 and p.redirect_stderr, name
        assert p.autorestart and p.directory == str(ROOT)
        shard = re.search(r"-(\d+)(-r\d+)?$", name)
        if shard:
            assert p.command.endswith(f"--shard {shard.group(1)}"), p.command
        if name != "pipeline-apid":  # each daemon owns its claims under its own name
            assert p.environment["WORKER_ID"].endswith(f"/{name}"), (name, p.environment)
    # The API starts first and stops last: daemons hand their tasks back through it.
    api_priority = programs["pipeline-apid"][1].priority
    assert all(p.priority > api_priority for n, (_, p) in programs.items() if n != "pipeline-apid")
    [(group, listener)] = listeners.values()
    assert listener.command.endswith("-m app.supervision.fatal_listener")
    from supervisor.events import EventTypes
    assert set(group.pool_events) == {EventTypes.PROCESS_STATE_FATAL, EventTypes.PROCESS_STATE_EXITED}
