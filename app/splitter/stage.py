"""shard-splitter: each source file's lines, byte for byte and in order, into one file per shard.

`python -m app.splitter` runs the stage under the shared daemon loop (app/daemon.py). A source
file is read once for all of its claimed shards; only the shard files of the tasks held are
written (atomically). Every line ends in exactly one shard file or in the file's rejected
file, with its reason. See docs/splitter.md.
"""
from __future__ import annotations

import base64
import logging
import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import msgspec
import orjson

from .. import layout, rejected, safefiles
from ..atomic import atomic_write
from ..client import ApiError, ApiUnavailable, PipelineClient, Task
from ..config import Settings
from ..daemon import Context, Done, Failed, Outcome, Retryable, StageWork, run_stage
from ..db import UNAVAILABLE
from ..lines import READ_BUFFER, LineReader, TooLarge
from ..rejected import RejectedWriter
from ..stages import Stage
from . import reasons
from .order_index import SCHEMA, FileRouting, OrderIndex

SOURCE_MISSING = "source missing"
CHECK_EVERY = 1 << 15     # lines between stop checks
BUFFER_LINES = 8192       # lines held back while shop-less returns wait for one lookup
BUFFER_BYTES = 1 << 20    # ... and at most this many bytes of them
# Rejected lines are any bytes that were in a source file, not part of the contract: private.
REJECTED_MODE = 0o600

log = logging.getLogger(Stage.SPLITTER)


class _Payload(msgspec.Struct):
    shop_id: Any = None
    order_id: Any = None


class _Event(msgspec.Struct):
    """The only fields routing reads; the rest of the line is validated, not built."""
    event_type: Any = None
    payload: _Payload | None = None


_DECODER = msgspec.json.Decoder(_Event)
MAX_LINE_BYTES = Settings.max_line_bytes


@dataclass
class SplitResult:
    lines_in: int = 0
    per_shard: list[int] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)
    routed_by_order: int = 0
    purchases: int = 0
    bom_skipped: int = 0

    def stats(self) -> dict:
        return {"lines_in": self.lines_in,
                "lines_by_shard": {str(s): n for s, n in enumerate(self.per_shard)},
                "rejected": dict(sorted(self.rejected.items())),
                "rejected_total": sum(self.rejected.values()),
                "returns_routed_by_order": self.routed_by_order,
                "bom_skipped": self.bom_skipped}


def _rejected_record(line_no: int, line: bytes, reason: str, detail: str | None = None) -> bytes:
    """One rejected line: where, why, and the line itself (exactly: base64 when it is not
    UTF-8); for a line over MAX_LINE_BYTES only its first bytes, marked `line_truncated`."""
    raw = line[:-1] if line.endswith(b"\n") else line
    record: dict = {"line_no": line_no, "reason": reason}
    if type(line) is TooLarge:
        detail = line.detail
        record["line_truncated"] = True
    if detail:
        record["detail"] = detail
    try:
        record["line"] = raw.decode("utf-8")
    except UnicodeDecodeError:
        record["line"] = raw.decode("utf-8", "replace")
        record["line_base64"] = base64.b64encode(raw).decode("ascii")
    return orjson.dumps(record) + b"\n"


def split_stream(source: LineReader, shard_count: int, outputs: list[Callable[[bytes], object] | None],
                 registered: list[bool], file_routing: FileRouting,
                 rejected_out: Callable[[bytes], object] | None = None,
                 check: Callable[[], None] = lambda: None) -> SplitResult:
    """Route every line of `source`; write those of the shards in `outputs` (None: count only)
    and, with `rejected_out`, one record per rejected line. Memory stays flat: no line longer
    than the reader's limit is held, and lines are held back only while shop-less returns wait
    for a lookup (BUFFER_LINES, BUFFER_BYTES). Nothing a line holds raises out of here."""
    event_types, max_id, details = reasons.EVENT_TYPES, reasons.MAX_ID, reasons.DETAILS
    add_purchase, local = file_routing.add_purchase, file_routing.local
    counts = [0] * shard_count
    rejected: dict[str, int] = {}
    result = SplitResult(per_shard=counts, rejected=rejected)
    pending: list[tuple[int, int]] = []   # (order_id, line) of the buffer being filled
    held: list[bytes] | None = None       # lines held back, from line number held_from on
    held_dest: list[int | str] = []
    held_from = 0
    held_bytes = 0
    in_flight = None                      # a sealed buffer whose lookup is running

    def reject(n: int, line: bytes, reason: str) -> None:
        reason, detail = details.get(reason, (reason, None))
        rejected[reason] = rejected.get(reason, 0) + 1
        if rejected_out is not None:
            rejected_out(_rejected_record(n, line, reason, detail))

    def emit(n: int, line: bytes, dest: int | str) -> None:
        if type(dest) is int:
            if registered[dest]:
                counts[dest] += 1
                out = outputs[dest]
                if out is not None:
                    out(line)
            else:
                reject(n, line, reasons.UNREGISTERED_SHARD)
        else:
            reject(n, line, dest)

    def emit_batch(lines: list[bytes], dests: list[int | str], first: int, shops: list[int | None]) -> None:
        for i, line in enumerate(lines):
            dest = dests[i]
            if type(dest) is int and dest < 0:
                shop = shops[-1 - dest]
                if shop is None:
                    dest = reasons.UNROUTABLE
                else:
                    dest = shop % shard_count
                    result.routed_by_order += 1
            emit(first + i, line, dest)

    def finish_in_flight() -> None:
        nonlocal in_flight
        lines, dests, first, lookup = in_flight
        in_flight = None
        emit_batch(lines, dests, first, lookup.result())

    def seal() -> None:
        """The buffer is full (or the file ended): look its returns up while the next fills;
        at most one lookup runs, so at most two buffers are held."""
        nonlocal held, held_dest, held_bytes, in_flight
        if in_flight is not None:
            finish_in_flight()
        if pending:
            in_flight = (held, held_dest, held_from, file_routing.lookup_async(list(pending)))
            pending.clear()
        else:
            emit_batch(held, held_dest, held_from, [])
        held, held_dest, held_bytes = None, [], 0

    def hold_or_reject(n: int, line: bytes, reason: str) -> None:
        """A line rejected on the rare path, in its place among the held-back lines."""
        nonlocal held, held_from, held_bytes
        if held is not None:
            held.append(line)
            held_dest.append(reason)
            held_bytes += len(line)
            if len(held) >= BUFFER_LINES or held_bytes >= BUFFER_BYTES:
                seal()
        elif in_flight is not None:
            held, held_from, held_bytes = [line], n, len(line)
            held_dest.append(reason)
        else:
            reject(n, line, reason)

    decode, decode_error = _DECODER.decode, msgspec.DecodeError
    finish = source.finish
    n = 0
    for line in source.pieces:
        n += 1
        if not n % CHECK_EVERY:
            check()
        if line[-1] != 10:
            line = finish(line)
            if type(line) is TooLarge:
                hold_or_reject(n, line, reasons.TOO_LARGE)
                continue
            line += b"\n"
        try:
            event = decode(line)
            if not line.isascii():
                line.decode("utf-8")
        except (decode_error, UnicodeDecodeError):
            dest = reasons.EMPTY_LINE if not line.strip() else reasons.MALFORMED_JSON
        except RecursionError:
            dest = reasons.TOO_DEEP
        else:
            payload = event.payload
            etype = event.event_type
            if payload is None:
                dest = reasons.MALFORMED_JSON
            elif type(etype) is not int or etype not in event_types:
                dest = reasons.UNKNOWN_EVENT_TYPE
            else:
                shop = payload.shop_id
                if type(shop) is int:
                    if 0 <= shop <= max_id:
                        dest = shop % shard_count
                        if etype == 1:
                            order = payload.order_id
                            if type(order) is int and -max_id - 1 <= order <= max_id:
                                add_purchase(order, shop, n)
                    else:
                        dest = reasons.SHOP_ID_OUT_OF_RANGE
                elif shop is None and etype == 3:
                    order = payload.order_id
                    if type(order) is not int or not -max_id - 1 <= order <= max_id:
                        dest = reasons.UNROUTABLE
                    else:
                        shop = local(order)
                        if shop is not None:
                            dest = shop % shard_count
                            result.routed_by_order += 1
                        else:
                            dest = -1 - len(pending)
                            pending.append((order, n))
                elif shop is None:
                    dest = reasons.MISSING_SHOP_ID
                else:
                    dest = reasons.NON_INTEGER_SHOP_ID
        if held is not None:
            held.append(line)
            held_dest.append(dest)
            held_bytes += len(line)
            if len(held) >= BUFFER_LINES or held_bytes >= BUFFER_BYTES:
                seal()
        elif type(dest) is int and dest >= 0 and in_flight is None:
            if registered[dest]:
                counts[dest] += 1
                out = outputs[dest]
                if out is not None:
                    out(line)
            else:
                reject(n, line, reasons.UNREGISTERED_SHARD)
        elif type(dest) is int or in_flight is not None:
            held, held_from, held_bytes = [line], n, len(line)
            held_dest.append(dest)
        else:
            reject(n, line, dest)
    if held is not None:
        seal()
    if in_flight is not None:
        finish_in_flight()
    result.lines_in = n
    result.purchases = file_routing.purchases
    result.bom_skipped = int(source.bom)
    return result


def split_file(source: Path, filename: str, shared: Path, shard_count: int, shards: list[int],
               registered: list[int], index: OrderIndex, write_rejected: bool,
               check: Callable[[], None] = lambda: None, max_line_bytes: int = MAX_LINE_BYTES,
               rejected_rows: RejectedWriter | None = None) -> SplitResult:
    """Split one source file, writing the shard files of `shards` (and the rejected file when
    asked, teed into `rejected_rows`); nothing is published unless the whole file went through."""
    with safefiles.open_read(source, safefiles.under(source, shared), READ_BUFFER) as f:
        src = LineReader(f, max_line_bytes)
        file_routing = index.open_file(filename)
        try:
            with ExitStack() as stack:
                outputs: list = [None] * shard_count
                for s in shards:
                    outputs[s] = stack.enter_context(
                        atomic_write(layout.splitter_output(shared, filename, s), root=shared)).write
                rejected_out = None
                if write_rejected:
                    rejected_out = stack.enter_context(atomic_write(
                        layout.splitter_rejected(shared, filename), root=shared, mode=REJECTED_MODE)).write
                    if rejected_rows is not None:
                        rejected_out = rejected_rows.tee(rejected_out, filename, Stage.SPLITTER, None)
                reg = [s in registered for s in range(shard_count)]
                result = split_stream(src, shard_count, outputs, reg, file_routing, rejected_out, check)
                file_routing.finish()
                if rejected_rows is not None and rejected_out is not None:
                    rejected_out.flush()
        except BaseException:
            file_routing.abort()
            raise
    return result


class Splitter(StageWork):
    name = Stage.SPLITTER
    service = Stage.SPLITTER.program()
    shard = None
    schemas = (SCHEMA, rejected.SCHEMA)

    def __init__(self, settings: Settings, index: OrderIndex | None = None, client: PipelineClient | None = None):
        self.settings = settings
        self.shared = settings.shared_dir
        self.folder = layout.splitter_dir(settings.shared_dir)
        # Claim whole files where possible: a file's shard rows are registered together.
        self.claim_limit = max(settings.claim_limit, settings.shard_count)
        self.index = index or OrderIndex(settings.pipeline_db)
        self.client = client or PipelineClient(settings.pipeline_url, settings.api_token, max_wait=30.0)

    def group(self, tasks: list[Task]) -> list[list[Task]]:
        groups: dict[str, list[Task]] = {}
        for task in tasks:
            groups.setdefault(task.filename, []).append(task)
        return list(groups.values())

    def setup(self, ctx: Context) -> None:
        try:
            self.index.ensure_schema()
        except UNAVAILABLE as exc:
            ctx.log.warning("pipeline database unavailable at start (%s); will retry with the first task", exc)
            self.index.reset()

    def teardown(self) -> None:
        self.index.close()

    def process(self, tasks: list[Task], ctx: Context) -> list[Outcome]:
        filename = tasks[0].filename
        source = layout.source_file(self.shared, filename)
        if not os.path.lexists(source):
            return [Failed(SOURCE_MISSING)] * len(tasks)
        try:
            registered = sorted(s["shard"] for s in self.client.file(filename)["shards"])
        except ApiUnavailable as exc:
            raise Retryable(f"pipeline-apid unavailable: {exc}") from None
        except ApiError as exc:
            return [Failed(f"cannot read the file's registration: {exc}")] * len(tasks)
        shards = sorted(t.shard for t in tasks)
        # One task per file writes the rejected file: the one of the lowest registered shard.
        writes_rejected = bool(registered) and registered[0] in shards
        try:
            result = split_file(source, filename, self.shared, self.settings.shard_count, shards, registered,
                                self.index, writes_rejected, ctx.check, self.settings.max_line_bytes,
                                rejected.writer(self.settings.pipeline_db))
        except FileNotFoundError:
            return [Failed(SOURCE_MISSING)] * len(tasks)
        except safefiles.Refused as exc:
            return [Failed(f"source refused: {exc}")] * len(tasks)
        except UNAVAILABLE as exc:
            self.index.reset()
            raise Retryable(f"pipeline database unavailable: {exc}") from None
        except (IsADirectoryError, PermissionError) as exc:
            return [Failed(f"source unreadable: {exc}")] * len(tasks)
        except OSError as exc:
            raise Retryable(f"file system error: {exc}") from None
        stats = result.stats()
        ctx.log.info("split %s: %s", filename, stats)
        return [Done(events=result.per_shard[t.shard],
                     stats={**stats, "rejected_file_written": writes_rejected and t.shard == registered[0]})
                for t in tasks]


def main() -> None:
    settings = Settings.from_env()
    run_stage(Splitter(settings), settings)
