"""Names that say what things are: no two classes (or type aliases) share a name across app/ and
monitor/; "worker" means the shard-worker process only (a daemon's identity is its `owner`;
the API's JSON field `worker` and the WORKER_ID variable keep their names as interfaces, and
PipelineClient's arguments mirror that field); app/events.py, the shared line format, holds
nothing that no other module uses."""
from __future__ import annotations

import ast
import collections
import dataclasses

from app.config import Settings
from tests import servers

ROOT = servers.ROOT
SOURCES = sorted([*(ROOT / "app").rglob("*.py"), *(ROOT / "monitor").rglob("*.py")])


def _tree(path):
    return ast.parse(path.read_text())


def test_no_two_classes_or_type_aliases_share_a_name():
    defined = collections.defaultdict(list)
    for path in SOURCES:
        for node in _tree(path).body:
            names = []
            if isinstance(node, ast.ClassDef):
                names = [node.name]
            elif isinstance(node, ast.Assign) and isinstance(node.value, ast.BinOp):  # X = A | B
                names = [t.id for t in node.targets if isinstance(t, ast.Name) and t.id[:1].isupper()]
            for name in names:
                defined[name].append(str(path.relative_to(ROOT)))
    assert {name: where for name, where in defined.items() if len(where) > 1} == {}


# What "worker" meant besides the shard worker: a daemon's id (`worker`, `worker_id`) and
# gunicorn's processes (`api_workers`). Names such as `worker_dir` or `worker_batch_lines` are
# the shard worker's.
OTHER_WORKERS = {"worker", "workers", "worker_id", "api_workers"}


def test_worker_names_the_shard_worker_only():
    allowed = {ROOT / "app" / "client.py"}  # its `worker` arguments are the API's JSON field
    found = []
    for path in SOURCES:
        if path in allowed or (ROOT / "app" / "worker") in path.parents:
            continue
        for node in ast.walk(_tree(path)):
            name = (node.arg if isinstance(node, ast.arg) else node.id if isinstance(node, ast.Name)
                    else node.attr if isinstance(node, ast.Attribute) else node.name
                    if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else None)
            if name in OTHER_WORKERS:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}")
    assert found == []
    settings = [f.name for f in dataclasses.fields(Settings) if "worker" in f.name]
    assert settings == ["worker_batch_lines", "worker_claim_limit"]  # the shard worker's own settings


def test_the_event_format_module_holds_only_what_others_use():
    events = ROOT / "app" / "events.py"
    public = {t.id for n in _tree(events).body if isinstance(n, ast.Assign) for t in n.targets
              if isinstance(t, ast.Name)} | {n.name for n in _tree(events).body if isinstance(n, ast.FunctionDef)}
    public = {name for name in public if not name.startswith("_")}
    used = set()
    for path in [*SOURCES, *(ROOT / "bench").glob("*.py")]:
        if path == events:
            continue
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[-1] == "events":
                used |= {alias.name for alias in node.names}
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "events":
                used.add(node.attr)
    assert public and sorted(public - used) == []
