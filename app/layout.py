"""Where every file of the pipeline lives under SHARED_DIR (the contract's names, which are
the stages' names: app/stages.py)."""
from __future__ import annotations

from pathlib import Path

from .stages import Stage

INGEST, SPLITTER, WORKER, SENDER = (s.value for s in (Stage.INGEST, Stage.SPLITTER, Stage.WORKER, Stage.SENDER))
SOURCE_SUFFIX = f".{INGEST}.txt"


def events_dir(shared: Path) -> Path:
    return shared / "events"


def source_file(shared: Path, filename: str) -> Path:
    return events_dir(shared) / f"{filename}{SOURCE_SUFFIX}"


def splitter_dir(shared: Path) -> Path:
    return shared / SPLITTER


def splitter_output(shared: Path, filename: str, shard: int) -> Path:
    return splitter_dir(shared) / f"{filename}.{SPLITTER}.{shard}.txt"


def splitter_rejected(shared: Path, filename: str) -> Path:
    return splitter_dir(shared) / f"{filename}.{SPLITTER}.rejected.txt"


def worker_dir(shared: Path, shard: int) -> Path:
    return shared / f"{WORKER}-{shard}"


def worker_output(shared: Path, filename: str, shard: int) -> Path:
    return worker_dir(shared, shard) / f"{filename}.{WORKER}.{shard}.prepared.txt"


def worker_rejected(shared: Path, filename: str, shard: int) -> Path:
    return worker_dir(shared, shard) / f"{filename}.{WORKER}.{shard}.rejected.txt"


def sender_dir(shared: Path, shard: int) -> Path:
    return shared / SENDER / f"shard-{shard}"


def ingest_dir(shared: Path) -> Path:
    """event-ingest's own folder (its activity log); its output goes to events/."""
    return shared / INGEST
