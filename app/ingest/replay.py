"""Replaying rejected lines: `python -m app.ingest --export-rejected FILENAME` writes a file's
rejected lines (GET /rejected, in line order) as a new event file to fix by hand; `--import`
then brings it in as any other file. The new file is named `<FILENAME>-fix` (`-fix2`, ... when
taken): a name outside the ticks, so it can never collide with a file the generator writes
(docs/ingest.md, "File names")."""
from __future__ import annotations

import os
from pathlib import Path

from .. import layout
from ..client import ApiError, PipelineClient
from ..rejected import line_bytes_of

PAGE = 1000


def rejected_items(client: PipelineClient, filename: str, reason: str | None = None) -> list[dict]:
    items, after = [], None
    while True:
        params = {"file": filename, "limit": PAGE, **({"reason": reason} if reason else {}),
                  **({"after": after} if after is not None else {})}
        page = client.call("GET", "/rejected", params=params)
        items += page["items"]
        after = page["next_after"]
        if after is None:
            return items


def _known(client: PipelineClient, filename: str) -> bool:
    try:
        client.file(filename)
    except ApiError as exc:
        if exc.status == 404:
            return False
        raise
    return True


def new_name(client: PipelineClient, filename: str, out: Path, events: Path) -> str:
    """`<filename>-fix`, or `-fix2`, `-fix3`...: the first name free in `out`, in events/ and
    in the API."""
    n = 1
    while True:
        name = f"{filename}-fix{n if n > 1 else ''}"[-64:]
        final = f"{name}{layout.SOURCE_SUFFIX}"
        if not (out / final).exists() and not (events / final).exists() and not _known(client, name):
            return name
        n += 1


def export_rejected(client: PipelineClient, filename: str, out: Path, events: Path,
                    reason: str | None = None) -> tuple[Path, int, int]:
    """Write the file's rejected lines (whole ones; a line kept only in part cannot be replayed)
    to a new event file in `out`, created exclusively. Returns (path, lines written, lines
    left out)."""
    items = sorted(rejected_items(client, filename, reason), key=lambda i: i["line_no"])
    whole = [i for i in items if not i["line_truncated"]]
    name = new_name(client, filename, out, events)
    path = out / f"{name}{layout.SOURCE_SUFFIX}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        for item in whole:
            f.write(line_bytes_of(item) + b"\n")
    return path, len(whole), len(items) - len(whole)
