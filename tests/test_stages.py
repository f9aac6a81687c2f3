"""One vocabulary of stages and statuses (app/stages.py): it matches the schema, every other
module builds from it, and the supervisord program list is derived, not kept twice.

What counts as spelling a stage or a status (the scan below): a string constant in code or SQL
of app/ or monitor/ that contains a stage name in either spelling (`shard-worker`,
`shard_worker`), that equals a status or is an SQL literal of one (`'done'`). Docstrings are
allowed (prose that names a stage); comments are not code. Migration files are exempt: an
applied migration is history that never changes (db/README.md), and the first test checks that
its ENUM and columns agree with the enums."""
from __future__ import annotations

import ast
import re
import shutil

import pytest

from app import config, db, stages
from app.api import queries, schema
from app.config import Settings
from app.stages import STAGES, STATUSES, WORK_STAGES, Stage, Status
from app.supervision import supervise
from tests import servers

ROOT = servers.ROOT
CONFIG = ROOT / "supervisord.conf"
SPELLINGS = sorted({s.value for s in Stage} | {s.column for s in Stage}, key=len, reverse=True)
STAGE_WORD = re.compile("|".join(re.escape(s) for s in SPELLINGS))
STATUS_SQL = re.compile("'(" + "|".join(s.value for s in Status) + ")'")


def test_the_enums_are_the_contracts_names():
    assert [s.value for s in Stage] == ["event-ingest", "shard-splitter", "shard-worker", "mysql-sender"]
    assert [s.value for s in Status] == ["new", "started", "done", "failed"]
    assert [s.previous for s in Stage] == [None, *STAGES[:-1]]
    assert [s for s in Stage if s.ordered] == [Stage.WORKER]


def test_the_tracking_schema_has_a_status_column_per_stage_with_exactly_the_statuses(make_database):
    url = make_database("vocab")
    conn = db.connect(url)
    db.migrate(conn, schema.SCHEMA)
    conn.close()
    columns = dict(servers.query(url, "SELECT column_name, column_type FROM information_schema.columns "
                                      "WHERE table_schema=DATABASE() AND table_name='pipeline_tracking'"))
    enum = "enum(" + ",".join(f"'{s.value}'" for s in STATUSES) + ")"
    for stage in STAGES:
        assert columns[stage.status_column] == enum, stage
        assert (stage.attempts_column in columns) if stage.attempts_column else stage is stages.FIRST
    indexes = {}
    for name, column in servers.query(url, "SELECT index_name, column_name FROM information_schema.statistics "
                                           "WHERE table_schema=DATABASE() AND table_name='pipeline_tracking' "
                                           "ORDER BY index_name, seq_in_index"):
        indexes.setdefault(name, []).append(column)
    for stage in WORK_STAGES:
        ready = [stage.previous.status_column, stage.status_column]
        assert indexes[queries.ready_index(stage, False)] == ready
        assert indexes[queries.ready_index(stage, True)] == [*ready, "shard"]


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def spellings(source: str) -> list[tuple[int, str]]:
    """(line, text) of every string constant of `source`, docstrings aside, that spells a stage
    or a status."""
    tree = ast.parse(source)
    docs = _docstrings(tree)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            text = node.value
            if text in set(Status) or STAGE_WORD.search(text) or STATUS_SQL.search(text):
                out.append((node.lineno, text))
    return out


def test_the_scan_finds_what_it_looks_for():
    found = spellings('"""shard-worker in a docstring is prose."""\n'
                      'a = "shard-worker"\nb = f"x {y}_status=\'done\'"\nc = "failed"\n'
                      'd = "SELECT shard_splitter_status FROM t"\ne = "doneness"\n')
    assert sorted(line for line, _ in found) == [2, 3, 4, 5]


def test_no_module_but_the_vocabulary_spells_a_stage_or_a_status():
    sources = sorted([*(ROOT / "app").rglob("*.py"), *(ROOT / "monitor").rglob("*.py")])
    assert len(sources) > 30
    offenders = [f"{path.relative_to(ROOT)}:{line}: {text[:80]!r}"
                 for path in sources if path != ROOT / "app" / "stages.py"
                 for line, text in spellings(path.read_text())]
    assert offenders == []


def test_every_stage_daemon_is_named_by_the_vocabulary_and_runs_as_its_program(tmp_path):
    from app.sender.stage import Sender
    from app.splitter.order_index import OrderIndex
    from app.splitter.stage import Splitter
    from app.worker.stage import WorkerStage
    settings = Settings.from_env({"SHARED_DIR": str(tmp_path), "SHARD_COUNT": "3"})
    daemons = [Splitter(settings, index=OrderIndex(settings.pipeline_db, tmp_path))]
    daemons += [cls(settings, shard) for cls in (WorkerStage, Sender) for shard in range(3)]
    names = supervise.program_names(CONFIG, {"SHARD_COUNT": "3"})
    groups = {name.partition(":")[0] for name in names}
    processes = {name.rpartition(":")[2] for name in names}
    for daemon in daemons:
        assert isinstance(daemon.name, Stage) and daemon.name in WORK_STAGES
        assert daemon.name in groups  # supervisord.conf's program group is the stage
        if daemon.shard is not None:  # process N of a per-shard group serves shard N
            assert daemon.service == daemon.name.program(daemon.shard) and daemon.service in processes
    assert {d.name for d in daemons} == set(WORK_STAGES)
    assert stages.FIRST.program() in names


@pytest.mark.parametrize("replicas", [1, 2])
def test_the_program_list_is_read_from_supervisord_conf_not_kept_twice(tmp_path, replicas):
    """program_names is supervisor's own reading of the file: a program added there is known
    everywhere, in its start order."""
    env = {"SHARD_COUNT": "2", "SPLITTER_REPLICAS": str(replicas)}
    in_config = re.findall(r"^\[program:([^\]]+)\]", CONFIG.read_text(), re.M)
    names = supervise.program_names(CONFIG, env)
    assert {n.partition(":")[0] for n in names} == set(in_config)
    assert len([n for n in names if n.startswith(f"{Stage.SPLITTER}:")]) == replicas
    config = tmp_path / "supervisord.conf"
    shutil.copy(CONFIG, config)
    with open(config, "a") as f:
        f.write("\n[program:auditor]\ncommand=python -m app.auditor --shard %(process_num)d\n"
                "process_name=auditor-%(process_num)d\nnumprocs=%(ENV_SHARD_COUNT)s\npriority=350\n")
    names = supervise.program_names(config, env)
    assert names.index("auditor:auditor-0") == names.index(f"{Stage.WORKER}:{Stage.WORKER.program(1)}") + 1
    assert "auditor:auditor-1" in names


def test_the_local_run_and_the_dashboard_take_their_lists_from_elsewhere():
    run = (ROOT / "app" / "supervision" / "local_run.py").read_text()
    assert "program_names(" in run
    dashboard = (ROOT / "monitor" / "api.py").read_text()
    assert "from app.stages import" in dashboard and not re.search(r"^STAGES\s*=", dashboard, re.M)
    assert not hasattr(config, "STAGES")
