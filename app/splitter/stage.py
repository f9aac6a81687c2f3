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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import msgspec
import orjson

from .. import layout, rejected, safefiles
from ..atomic import atomic_writes
from ..client import ApiError, ApiUnavailable, PipelineClient, Task
from ..config import Settings
from ..daemon import Context, Done, Failed, Outcome, Retryable, StageWork, run_stage
from ..db import UNAVAILABLE
from ..lines import READ_BUFFER, LineReader, TooLarge
from ..rejected import RejectedWriter
from ..stages import Stage
from . import reasons
from .order_index import SCHEMA, FileRouting, OrderIndex, WindowPruned

SOURCE_MISSING = "source missing"
CHECK_EVERY = 1 << 15     # lines between stop checks (a power of 2)
BUFFER_LINES = 8192       # lines gathered before they are written (or looked up, then written)
BUFFER_BYTES = 1 << 20    # ... and at most about this many bytes of input
CHECKPOINT = 8            # lines between two looks at the segment's size (a power of 2)
# Rejected lines are any bytes that were in a source file, not part of the contract: private.
REJECTED_MODE = 0o600

log = logging.getLogger(Stage.SPLITTER)


class _Payload(msgspec.Struct, gc=False):
    shop_id: Any = None
    order_id: Any = None


class _Event(msgspec.Struct, gc=False):
    """The only fields routing reads; the rest of the line is validated, not built."""
    event_type: Any = None
    payload: _Payload | None = None


class _FastPayload(msgspec.Struct, gc=False):
    shop_id: Annotated[int, msgspec.Meta(ge=0, le=reasons.MAX_ID)] | None = None
    order_id: Annotated[int, msgspec.Meta(ge=-reasons.MAX_ID - 1, le=reasons.MAX_ID)] | None = None


class _FastEvent(msgspec.Struct, gc=False):
    """The same fields with the types an ordinary line has, checked by the decoder itself: a
    line it refuses goes to `_classify` (the loose decoder and the checks in Python), so the
    two give every line the same fate."""
    event_type: Literal[tuple(sorted(reasons.EVENT_TYPES))]  # type: ignore[valid-type]
    payload: _FastPayload


_FAST_DECODER = msgspec.json.Decoder(_FastEvent)
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


_RETURN = "return"   # _classify: a return without shop_id, routed by its order


def _classify(line: bytes, shard_count: int) -> tuple[int | str, int | None, int | None]:
    """A line the strict decoder refused, judged field by field: (its shard, the reason it is
    rejected or _RETURN; the order_id of a purchase to index or of a return to route; the
    purchase's shop_id)."""
    try:
        event = _DECODER.decode(line)
        if not line.isascii():
            line.decode("utf-8")
    except (msgspec.DecodeError, UnicodeDecodeError):
        return (reasons.EMPTY_LINE if not line.strip() else reasons.MALFORMED_JSON), None, None
    except RecursionError:
        return reasons.TOO_DEEP, None, None
    payload, etype, max_id = event.payload, event.event_type, reasons.MAX_ID
    if payload is None:
        return reasons.MALFORMED_JSON, None, None
    if type(etype) is not int or etype not in reasons.EVENT_TYPES:
        return reasons.UNKNOWN_EVENT_TYPE, None, None
    shop, order = payload.shop_id, payload.order_id
    order_ok = type(order) is int and -max_id - 1 <= order <= max_id
    if type(shop) is int:
        if 0 <= shop <= max_id:
            return shop % shard_count, (order if etype == 1 and order_ok else None), shop
        return reasons.SHOP_ID_OUT_OF_RANGE, None, None
    if shop is None and etype == 3:
        return (_RETURN, order, None) if order_ok else (reasons.UNROUTABLE, None, None)
    if shop is None:
        return reasons.MISSING_SHOP_ID, None, None
    return reasons.NON_INTEGER_SHOP_ID, None, None


def split_stream(source: LineReader, shard_count: int, outputs: list[Callable[[bytes], object] | None],
                 registered: list[bool], file_routing: FileRouting,
                 rejected_out: Callable[[bytes], object] | None = None,
                 check: Callable[[], None] = lambda: None, rows_of_rejected: bool = False) -> SplitResult:
    """Route every line of `source`; write those of the shards in `outputs` (None: count only)
    and, with `rejected_out`, one record per rejected line.

    Lines are gathered per shard in segments of BUFFER_LINES lines / about BUFFER_BYTES of
    input and written one join per shard and segment. A return without shop_id whose
    purchase is not in memory holds its place in every shard's list of its segment; the
    segment's lookups run on a second thread while the next segment fills, so at most two
    segments are held. Nothing a line holds raises out of here.

    The last segment's lookup carries the order index's completion (one round trip for both)
    unless rejected lines were met and `rows_of_rejected` (they are written to the database
    after the lookups, in the completion's transaction: that round trip is sent anyway)."""
    counts = [0] * shard_count
    rejected: dict[str, int] = {}
    result = SplitResult(per_shard=counts, rejected=rejected)
    details = reasons.DETAILS
    routing = file_routing
    local = routing.local

    def reject(n: int, line: bytes, reason: str) -> None:
        """The one place a line is rejected: counted, and its record written."""
        reason, detail = details.get(reason, (reason, None))
        rejected[reason] = rejected.get(reason, 0) + 1
        if rejected_out is not None:
            rejected_out(_rejected_record(n, line, reason, detail))

    def write(lists: list[list[bytes]], rejects: list, waiting: list, shops: list[int | None]) -> None:
        """A segment, its returns resolved: each shard's lines in order, then its rejected lines."""
        dests: list[int | str] = []
        for (n, line, order, places), shop in zip(waiting, shops):
            if shop is None:
                dest: int | str = reasons.UNROUTABLE
            else:
                dest = shop % shard_count
                result.routed_by_order += 1
                if not registered[dest]:
                    dest = reasons.UNREGISTERED_SHARD
            dests.append(dest)
        for s in range(shard_count):
            lines = lists[s]
            mine = [(item[3][s], item[1]) for item, dest in zip(waiting, dests) if dest == s]
            counts[s] += len(lines) + len(mine)
            out = outputs[s]
            if out is None:
                continue
            if mine:
                pieces, start = [], 0
                for place, line in mine:
                    pieces += lines[start:place]
                    pieces.append(line)
                    start = place
                pieces += lines[start:]
                lines = pieces
            if lines:
                out(b"".join(lines))
        late = [(item[0], item[1], dest) for item, dest in zip(waiting, dests) if type(dest) is str]
        if late:
            rejects = sorted(rejects + late, key=lambda r: r[0]) if rejects else late
        for n, line, reason in rejects:
            reject(n, line, reason)

    in_flight = None   # (lists, rejects, waiting, lookup) of the segment whose lookup runs

    def flush(lists: list[list[bytes]], rejects: list, waiting: list, last: bool = False) -> None:
        """A segment is complete: the one before it is written (its lookup awaited); this one
        too, unless it waits for a lookup of its own, which starts now. The file's last
        segment looks up here, on this thread: nothing is left to read while the database
        answers, and a hand-over to the lookup thread and back costs CPU (a small file has
        only this segment)."""
        nonlocal in_flight
        if in_flight is not None:
            segment, in_flight = in_flight, None
            write(*segment[:3], segment[3].result())
        if waiting and last:
            finish = not (rows_of_rejected and (rejected or rejects))
            write(lists, rejects, waiting, routing.lookup([(w[2], w[0]) for w in waiting], finish))
        elif waiting:
            in_flight = (lists, rejects, waiting, routing.lookup_async([(w[2], w[0]) for w in waiting]))
        else:
            write(lists, rejects, waiting, [])

    decode, fast_error, finish = _FAST_DECODER.decode, Exception, source.finish
    current, purchase_rows = routing.current, routing.rows
    mark, stop_mark, rotate_at, max_bytes = CHECKPOINT - 1, CHECK_EVERY - 1, routing.rotate_rows, BUFFER_BYTES
    n = first = size = 0
    lists: list[list[bytes]] = [[] for _ in range(shard_count)]
    append = [lst.append if registered[s] else None for s, lst in enumerate(lists)]
    rejects: list[tuple[int, bytes, str]] = []
    waiting: list[tuple[int, bytes, int, tuple[int, ...]]] = []
    for line in source.pieces:
        n += 1
        if not n & mark:
            if len(purchase_rows) >= rotate_at:
                routing.rotate()
                current, purchase_rows = routing.current, routing.rows
            if not n & stop_mark:
                check()
            if n - first > BUFFER_LINES or size >= max_bytes:
                flush(lists, rejects, waiting)     # this line starts the next segment
                lists = [[] for _ in range(shard_count)]
                append = [lst.append if registered[s] else None for s, lst in enumerate(lists)]
                rejects, waiting = [], []
                first, size = n - 1, 0
        size += len(line)
        if line[-1] != 10:
            line = finish(line)
            if type(line) is TooLarge:
                rejects.append((n, line, reasons.TOO_LARGE))
                continue
            line += b"\n"
        try:
            event = decode(line)
        except fast_error:
            dest, order, shop = _classify(line, shard_count)
        else:
            if not line.isascii():
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError:
                    rejects.append((n, line, reasons.MALFORMED_JSON))
                    continue
            payload = event.payload
            shop = payload.shop_id
            if shop is not None:
                if event.event_type == 1:
                    order = payload.order_id
                    if order is not None:
                        current[order] = shop
                        purchase_rows += (order, n, shop)
                add = append[shop % shard_count]
                if add is not None:
                    add(line)
                else:
                    rejects.append((n, line, reasons.UNREGISTERED_SHARD))
                continue
            order = payload.order_id
            if event.event_type != 3:
                dest = reasons.MISSING_SHOP_ID
            elif order is None:
                dest = reasons.UNROUTABLE
            else:
                dest = _RETURN
        # the rare path: a line the strict decoder refused, or a return without shop_id
        if dest is _RETURN:
            shop = local(order)
            if shop is None:
                waiting.append((n, line, order, tuple(map(len, lists))))
                continue
            dest = shop % shard_count
            result.routed_by_order += 1
        elif type(dest) is int and order is not None:
            current[order] = shop
            purchase_rows += (order, n, shop)
        if type(dest) is int:
            add = append[dest]
            if add is not None:
                add(line)
            else:
                rejects.append((n, line, reasons.UNREGISTERED_SHARD))
        else:
            rejects.append((n, line, dest))
    flush(lists, rejects, waiting, last=True)
    result.lines_in = n
    result.purchases = routing.purchases
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
        file_routing = index.open_file(filename, defer=True)
        try:
            paths = [(layout.splitter_output(shared, filename, s), 0o644) for s in shards]
            if write_rejected:
                paths.append((layout.splitter_rejected(shared, filename), REJECTED_MODE))
            with atomic_writes(paths, root=shared) as files:
                outputs: list = [None] * shard_count
                for s, out in zip(shards, files):
                    outputs[s] = out.write
                rejected_out = None
                if write_rejected:
                    rejected_out = files[-1].write
                    if rejected_rows is not None:
                        rejected_out = rejected_rows.tee(rejected_out, filename, Stage.SPLITTER, None)
                reg = [s in registered for s in range(shard_count)]
                tee = rejected_out if rejected_rows is not None else None
                together = tee is not None and rejected_rows.url == index.url
                result = split_stream(src, shard_count, outputs, reg, file_routing, rejected_out, check,
                                      rows_of_rejected=together)
                also: list[str] = []
                if together and tee.rows and file_routing.carries:
                    # The rejected rows ride in the index's transaction (its completion, or its
                    # opening's commit): one round trip, not two.
                    rejected_rows.ensure_schema()
                    also = rejected.insert_sql(index.conn(), tee.take())
                file_routing.finish(also)
                if tee is not None:
                    tee.flush()
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
        self.index = index or OrderIndex(settings.pipeline_db, window=settings.order_index_window)
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

    def idle(self, ctx: Context) -> None:
        self._prune(ctx)

    def _prune(self, ctx: Context) -> None:
        """The order index's pruning, and the rejected lines' (REJECTED_WINDOW: the splitter
        is the one stage every deployment runs), each at most every few minutes, between files."""
        if self.index.prune_due(time.monotonic()):
            try:
                self.index.prune()
            except UNAVAILABLE as exc:
                ctx.log.warning("order index pruning postponed: pipeline database unavailable (%s)", exc)
                self.index.reset()
        rows = rejected.writer(self.settings.pipeline_db)
        if rows.prune_due():
            try:
                deleted = rows.prune(self.settings.rejected_window)
            except UNAVAILABLE as exc:
                ctx.log.warning("rejected lines pruning postponed: pipeline database unavailable (%s)", exc)
                return
            if deleted:
                ctx.log.info("pruned %d rejected lines older than REJECTED_WINDOW", deleted)

    def process(self, tasks: list[Task], ctx: Context) -> list[Outcome]:
        filename = tasks[0].filename
        source = layout.source_file(self.shared, filename)
        if not os.path.lexists(source):
            return [Failed(SOURCE_MISSING)] * len(tasks)
        shards = sorted(t.shard for t in tasks)
        if shards == list(range(self.settings.shard_count)):
            registered = shards     # a task per shard, so each is registered: no need to ask
        else:
            try:
                registered = sorted(s["shard"] for s in self.client.file(filename)["shards"])
            except ApiUnavailable as exc:
                raise Retryable(f"pipeline-apid unavailable: {exc}") from None
            except ApiError as exc:
                return [Failed(f"cannot read the file's registration: {exc}")] * len(tasks)
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
        except WindowPruned as exc:
            return [Failed(str(exc))] * len(tasks)
        except (IsADirectoryError, PermissionError) as exc:
            return [Failed(f"source unreadable: {exc}")] * len(tasks)
        except OSError as exc:
            raise Retryable(f"file system error: {exc}") from None
        stats = result.stats()
        self._prune(ctx)
        return [Done(events=result.per_shard[t.shard],
                     stats={**stats, "rejected_file_written": writes_rejected and t.shard == registered[0]})
                for t in tasks]


def main() -> None:
    settings = Settings.from_env()
    run_stage(Splitter(settings), settings)
