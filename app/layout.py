"""Where every file of the pipeline lives under SHARED_DIR (the contract's names)."""
from __future__ import annotations

from pathlib import Path

SOURCE_SUFFIX = ".event-ingest.txt"


def events_dir(shared: Path) -> Path:
    return shared / "events"


def source_file(shared: Path, filename: str) -> Path:
    return events_dir(shared) / f"{filename}{SOURCE_SUFFIX}"


def splitter_dir(shared: Path) -> Path:
    return shared / "shard-splitter"


def splitter_output(shared: Path, filename: str, shard: int) -> Path:
    return splitter_dir(shared) / f"{filename}.shard-splitter.{shard}.txt"


def splitter_rejected(shared: Path, filename: str) -> Path:
    return splitter_dir(shared) / f"{filename}.shard-splitter.rejected.txt"


def worker_dir(shared: Path, shard: int) -> Path:
    return shared / f"shard-worker-{shard}"


def worker_output(shared: Path, filename: str, shard: int) -> Path:
    return worker_dir(shared, shard) / f"{filename}.shard-worker.{shard}.prepared.txt"


def worker_rejected(shared: Path, filename: str, shard: int) -> Path:
    return worker_dir(shared, shard) / f"{filename}.shard-worker.{shard}.rejected.txt"


def sender_dir(shared: Path, shard: int) -> Path:
    return shared / "mysql-sender" / f"shard-{shard}"


def ingest_dir(shared: Path) -> Path:
    """event-ingest's own folder (its activity log); its output goes to events/."""
    return shared / "event-ingest"
