"""supervisord for the whole process group, its config rendered from SHARD_COUNT.

`python -m app.supervision.supervise` renders `supervisord.conf.template` into $PIPELINE_RUN_DIR and runs
supervisord's own main loop in this process, in the foreground. It is the container's
entrypoint, what `bin/pipeline start` launches and what the tests start, so all three run the
same config. Running supervisord in-process (not exec) is what lets a FATAL program end it with
a non-zero exit: supervisord itself always exits 0 after a shutdown.
"""
from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path
from string import Template

from ..config import Settings, Supervision

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "supervisord.conf.template"
FATAL_MARKER = "fatal"
_SECTION = re.compile(r"^\[(?P<name>[^\]]+)\]", re.M)
_PROGRAM = re.compile(r"^\[program:(?P<name>[^\]]+)\]\n(?P<body>(?:(?!\[).*\n?)*)", re.M)
_PRIORITY = re.compile(r"^priority\s*=\s*(\d+)", re.M)


def _replica_suffixes(count: int) -> list[str]:
    return [""] + [f"-r{n}" for n in range(2, count + 1)]


def render(settings: Settings, sup: Supervision, python: str | None = None) -> str:
    """The config text: a section naming ${shard} or a replica placeholder once per value,
    every placeholder filled."""
    return _render(settings.shard_count, sup, python)


def _render(shard_count: int, sup: Supervision, python: str | None = None) -> str:
    text = TEMPLATE.read_text()
    values = {"python": python or sys.executable, "root": str(ROOT), "run_dir": str(sup.run_dir),
              "stop_wait": str(sup.stop_wait), "start_secs": str(sup.start_secs),
              "start_retries": str(sup.start_retries)}
    repeats = {"shard": list(range(shard_count)),
               "splitter_replica": _replica_suffixes(sup.splitter_replicas),
               "sender_replica": _replica_suffixes(sup.sender_replicas)}
    starts = [m.start() for m in _SECTION.finditer(text)]
    blocks = [text[:starts[0]]] + [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]
    out = []
    for block in blocks:
        header = _SECTION.match(block)
        keys = [k for k in repeats if header and "${%s}" % k in header.group("name")]
        for combo in itertools.product(*(repeats[k] for k in keys)):
            out.append(Template(block).substitute(values, **dict(zip(keys, combo))))
    return "".join(out)


def program_names(shard_count: int, sup: Supervision | None = None) -> list[str]:
    """Every program of the group, as supervisorctl names them, in start order: read from the
    rendered template, the one list of programs (a program added there is known everywhere)."""
    text = _render(shard_count, sup or Supervision.from_env({}), python="python")
    programs = []
    for n, block in enumerate(_PROGRAM.finditer(text)):
        priority = _PRIORITY.search(block.group("body"))
        programs.append((int(priority.group(1)) if priority else 999, n, block.group("name")))
    return [name for _, _, name in sorted(programs)]


def write_config(settings: Settings, sup: Supervision) -> Path:
    sup.run_dir.mkdir(parents=True, exist_ok=True)
    target = sup.config_file
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(render(settings, sup))
    tmp.replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    from supervisor import supervisord

    settings = Settings.from_env()  # a bad setting stops here, once, not in every program
    sup = Supervision.from_env()
    config = write_config(settings, sup)
    marker = sup.run_dir / FATAL_MARKER
    marker.unlink(missing_ok=True)
    supervisord.main(["-n", "-c", str(config), *(argv or [])])
    if marker.exists():
        print(f"supervisord stopped because a program is FATAL: {marker.read_text().strip()}",
              file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
