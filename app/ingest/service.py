"""event-ingest: writes event files into $SHARED_DIR/events and registers them with the API.

    python -m app.ingest                          a file every INGEST_INTERVAL seconds (daemon)
    python -m app.ingest --files N --events M     N files of M lines, then exit
    python -m app.ingest --import PATH...         copy existing files in and register them

A file appears whole (temporary name, fsync, hard link: never over an existing file), THEN is
registered and marked `event-ingest/done`; both calls are retried while the API is down, and
on every start the files in events/ the API does not know are registered, so no written file
stays unregistered. See docs/ingest.md.
"""
from __future__ import annotations

import argparse
import logging
import os
import queue
import random
import re
import stat
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import orjson

from .. import layout, safefiles
from ..atomic import TMP_MARK, writer_alive
from ..client import ApiError, ApiUnavailable, PipelineClient
from ..config import ConfigError, Settings
from ..daemon import empty_folder, owner_id
from ..logs import setup_logging
from ..shutdown import StopFlag, stop_on_signals
from ..stages import Stage, Status
from . import replay
from .generator import SOURCE_MODE, Generator, Rates, World, existing_ticks, parse_tick, publish, write_event_file

SERVICE = Stage.INGEST.program()
FILENAME = re.compile(r"^[0-9A-Za-z_-]{1,64}$")   # what the API accepts, without dots
# A registered file not marked done for this long is done (our crash, or the original
# generator's lost best-effort call); younger ones may still be written by the original.
STALE_SECONDS = 30.0
RESCAN_SECONDS = 60.0

log = logging.getLogger(SERVICE)


class Ingest:
    def __init__(self, settings: Settings, stop: StopFlag | None = None,
                 client: PipelineClient | None = None, register: bool = True):
        self.settings = settings
        self.stop = stop or StopFlag()
        self.client = client or PipelineClient(settings.pipeline_url, settings.api_token, stop=self.stop)
        self.register = register
        self.root = settings.shared_dir
        self.events = layout.events_dir(settings.shared_dir)
        self._events_folder().close()  # a link at events/ is refused here, at start
        self._refused: set[str] = set()

    def _events_folder(self) -> safefiles.Folder:
        """events/, opened without following links below SHARED_DIR (created if missing)."""
        return safefiles.Folder(self.events, self.root, create=True)

    # -- the API ----------------------------------------------------------------------------

    def announce(self, filename: str, events: int | None, imported: Path | None = None) -> bool:
        """Register the file and mark event-ingest done, retrying while the API is down.
        False only when asked to stop first (the next start registers it). `imported`: the file
        it was copied from, named in the same log line."""
        if not self.register:
            return True
        try:
            self.client.register(filename, done=True, events=events, worker=owner_id(SERVICE))
        except ApiUnavailable as exc:
            log.warning("%s left unregistered for now (%s); registered at the next start", filename, exc)
            return False
        except ApiError as exc:
            log.error("pipeline-apid refused %s: %s", filename, exc)
            return False
        if imported is not None:
            log.info("imported %s, registered %s (%s events)", imported, filename, events)
        else:
            log.info("registered %s (%s events)", filename, events)
        return True

    def recover(self) -> int:
        """Remove dead temporary files; register every complete file in events/ the API does
        not know, and mark done the stale ones it knows but never saw finished. An entry that
        is not a regular file (a link, FIFO, device) is never opened nor registered: it is
        named in the log, once per process."""
        with self._events_folder() as events:
            names = events.names()
            for name in names:
                if layout.SOURCE_SUFFIX + TMP_MARK not in name:
                    continue
                try:
                    mtime = events.lstat(name).st_mtime
                except FileNotFoundError:
                    continue
                if not writer_alive(self.events / name, mtime=mtime):
                    log.info("removing unfinished %s", name)
                    events.unlink(name)
            if not self.register:
                return 0
            fixed = 0
            for name in sorted(n for n in names if n.endswith(layout.SOURCE_SUFFIX)):
                if self.stop.is_set():
                    break
                filename = name[: -len(layout.SOURCE_SUFFIX)]
                if not FILENAME.fullmatch(filename):
                    log.warning("skipping %s: its name is not a valid filename for the API", name)
                    continue
                try:
                    st = events.lstat(name)
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    self._refuse(safefiles.Refused(self.events / name, safefiles.describe(st.st_mode)))
                    continue
                try:
                    shards = self.client.file(filename)["shards"]
                except ApiError as exc:
                    if exc.status != 404:
                        log.error("cannot check %s: %s", filename, exc)
                        continue
                    shards = None
                except ApiUnavailable:
                    break
                if shards is not None:   # known: only a stale unfinished one is announced again
                    unfinished = any(s[Stage.INGEST.status_column] in (Status.NEW, Status.STARTED) for s in shards)
                    if not unfinished or time.time() - st.st_mtime <= STALE_SECONDS:
                        continue
                try:
                    with events.open_read(name) as f:
                        lines = _count_lines(f)
                except safefiles.Refused as exc:
                    self._refuse(exc)
                    continue
                except FileNotFoundError:
                    continue
                fixed += self.announce(filename, lines)
        if fixed:
            log.info("registered %d file(s) found unregistered or unfinished in %s", fixed, self.events)
        return fixed

    def _refuse(self, exc: safefiles.Refused) -> None:
        if exc.path.name not in self._refused:
            self._refused.add(exc.path.name)
            log.error("not registered: %s; remove it", exc)

    # -- modes ------------------------------------------------------------------------------

    def run_forever(self, generator: Generator) -> None:
        """A file every INGEST_INTERVAL seconds, aligned to the interval, 1..EVENTS_PER_FILE lines.
        Files are registered by a second thread, in order, so writing goes on while the API is
        down; what is still unregistered at exit is registered by the next start."""
        s = self.settings
        interval = max(s.ingest_interval, 0.001)
        counts = _count_rng(generator.seed)
        last = (existing_ticks(self.events) or [None])[-1]
        written_files: queue.Queue[tuple[str, int] | None] = queue.Queue()
        registrar = threading.Thread(target=self._registrar, args=(written_files,), name="registrar", daemon=True)
        registrar.start()
        try:
            while not self.stop.is_set():
                now = time.time()
                due = (now // interval + 1) * interval
                if self.stop.wait(due - now):
                    break
                lines = counts.randint(1, s.events_per_file)
                tick = generator.next_tick(last, datetime.fromtimestamp(due, timezone.utc))
                path, written = write_event_file(generator, self.events, tick, lines, root=self.root, move_on=True)
                tick = last = path.name[: -len(layout.SOURCE_SUFFIX)]
                log.info("wrote %s (%d lines)", path.name, written)
                written_files.put((tick, written))
        finally:
            written_files.put(None)
            registrar.join(60)

    def _registrar(self, written_files: "queue.Queue[tuple[str, int] | None]") -> None:
        self.recover()
        next_scan = time.monotonic() + RESCAN_SECONDS
        while (item := written_files.get()) is not None:
            self.announce(*item)
            if time.monotonic() > next_scan and not self.stop.is_set():
                self.recover()
                next_scan = time.monotonic() + RESCAN_SECONDS

    def write_files(self, generator: Generator, files: int, events: int, start: datetime | None) -> list[str]:
        last = (existing_ticks(self.events) or [None])[-1]
        names = []
        for i in range(files):
            if self.stop.is_set():
                break
            tick = generator.next_tick(last, start or datetime.now(timezone.utc))
            path, written = write_event_file(generator, self.events, tick, events, last_file=i == files - 1,
                                             root=self.root, move_on=True)
            tick = last = path.name[: -len(layout.SOURCE_SUFFIX)]
            log.info("wrote %s (%d lines)", path.name, written)
            self.announce(tick, written)
            names.append(tick)
        return names

    def import_files(self, paths: list[Path]) -> list[str]:
        """Copy each file into events/ (whole or not at all) and register it, oldest name first.

        A path the operator names is read where it leads (a link included), if it is a regular
        file. The entries of a named folder are not followed: a link, FIFO or device among them
        refuses the whole import before anything is copied, as does a bad name."""
        sources: list[tuple[Path, Path | None]] = []    # (file, the named folder it is in)
        for p in paths:
            try:
                st = os.stat(p)
            except FileNotFoundError:
                raise ImportProblem(f"{p}: no such file or directory") from None
            if stat.S_ISDIR(st.st_mode):
                with safefiles.Folder(p, p) as folder:
                    for name in sorted(n for n in folder.names() if n.endswith(layout.SOURCE_SUFFIX)):
                        entry = folder.lstat(name)
                        if not stat.S_ISREG(entry.st_mode):
                            raise ImportProblem(
                                f"{p / name} is {safefiles.describe(entry.st_mode)}: --import copies only regular "
                                f"files from a folder (nothing was imported; remove it, or name its target itself)")
                        sources.append((p / name, p))
            elif stat.S_ISREG(st.st_mode):
                sources.append((p, None))
            else:
                raise ImportProblem(f"{p} is {safefiles.describe(st.st_mode)}: only regular files are imported "
                                    f"(nothing was imported)")
        for src, _ in sources:
            stem = src.name[: -len(layout.SOURCE_SUFFIX)]
            if not src.name.endswith(layout.SOURCE_SUFFIX) or not FILENAME.fullmatch(stem):
                raise ImportProblem(f"{src}: an event file must be named <filename>{layout.SOURCE_SUFFIX} "
                                    f"with <filename> of letters, digits, _ or - (a UTC tick YYYYMMDDHHMMSS)")
        names = []
        with self._events_folder() as events:   # opened once for the whole import
            for src, folder in sorted(sources, key=lambda item: item[0].name):
                if self.stop.is_set():
                    break
                try:
                    lines = self._import_one(src, folder, events)
                except safefiles.Refused as exc:
                    raise ImportProblem(str(exc)) from None
                filename = src.name[: -len(layout.SOURCE_SUFFIX)]
                if not self.announce(filename, lines, imported=src) or not self.register:
                    log.info("imported %s", src)   # else the registration's line names it
                names.append(filename)
        return names

    def _import_one(self, src: Path, folder: Path | None, events: safefiles.Folder) -> int:
        """Copy `src` to events/ unless the same content is there; its line count."""
        final = src.name
        opened = safefiles.open_read(src, folder) if folder is not None else safefiles.open_named(src)
        with opened as fin:
            try:
                existing = events.open_read(final)
            except FileNotFoundError:
                existing = None
            except safefiles.Refused as exc:
                raise ImportProblem(f"{exc}; not overwritten") from None
            if existing is not None:
                with existing:
                    a, b = os.fstat(fin.fileno()), os.fstat(existing.fileno())
                    if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino) and not _same_content(fin, existing):
                        raise ImportProblem(f"{self.events / final} exists with different content; not overwritten")
                    existing.seek(0)
                    return _count_lines(existing)
            fd, tmp = events.create_temp(final, SOURCE_MODE)
            count, last = 0, b"\n"   # counted as copied: the copy is not read back
            try:
                with os.fdopen(fd, "wb") as fout:
                    while chunk := fin.read(1 << 20):
                        fout.write(chunk)
                        count += chunk.count(b"\n")
                        last = chunk[-1:]
                    fout.flush()
                    _datasync(fout.fileno())   # data and size; publish syncs the folder for the name
                publish(events, tmp, final)
            except BaseException:
                events.unlink(tmp)
                raise
            return count + (last != b"\n")


_datasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


class ImportProblem(Exception):
    pass


def _count_lines(f) -> int:
    count, last = 0, b"\n"
    while chunk := f.read(1 << 20):
        count += chunk.count(b"\n")
        last = chunk[-1:]
    return count + (last != b"\n")


def _same_content(fa, fb) -> bool:
    if os.fstat(fa.fileno()).st_size != os.fstat(fb.fileno()).st_size:
        return False
    while True:
        x, y = fa.read(1 << 20), fb.read(1 << 20)
        if x != y:
            return False
        if not x:
            return True


def _count_rng(seed: int) -> random.Random:
    return random.Random(seed ^ 0x5EED)


def _rate(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    try:
        return name.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rate wants NAME=PROBABILITY, got {text!r}") from None


def build_generator(settings: Settings, seed: int | None, rate_args: list[tuple[str, float]]) -> Generator:
    try:
        rates = Rates().replace(dict(settings.ingest_rates))
    except ValueError as exc:
        raise ConfigError("INGEST_RATE_*", f"{exc}") from None
    try:
        rates = rates.replace(dict(rate_args))
    except ValueError as exc:
        raise SystemExit(f"--rate: {exc}") from None
    world = World(settings.ingest_shops, settings.ingest_goods, settings.ingest_users)
    return Generator(seed if seed is not None else settings.ingest_seed, rates, settings.opening_balance, world)


def _export(settings: Settings, args) -> int:
    client = PipelineClient(settings.pipeline_url, settings.api_token, max_wait=10.0)
    try:
        path, written, partial = replay.export_rejected(client, args.export_rejected, args.out,
                                                        layout.events_dir(settings.shared_dir), args.reason)
    except (ApiError, ApiUnavailable, OSError) as exc:
        print(f"{SERVICE}: cannot export the rejected lines of {args.export_rejected}: {exc}", file=sys.stderr)
        return 1
    print(path)
    print(f"{written} rejected line(s) of {args.export_rejected} written"
          + (f"; {partial} left out (only a prefix of each was kept: see GET /rejected)" if partial else "")
          + f". Fix them, remove what must not be replayed, then: python -m app.ingest --import {path}",
          file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.ingest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, help="write this many files and exit")
    parser.add_argument("--events", type=int, help="lines per file with --files (default EVENTS_PER_FILE)")
    parser.add_argument("--import", dest="imports", nargs="+", type=Path, metavar="PATH",
                        help=f"copy these files (or the *{layout.SOURCE_SUFFIX} of these folders) in and register them")
    parser.add_argument("--seed", type=int, help="random seed (default INGEST_SEED, else random)")
    parser.add_argument("--rate", type=_rate, action="append", default=[], metavar="NAME=P",
                        help=f"injection rate; names: {', '.join(Rates.names())}")
    parser.add_argument("--start", help="first tick YYYYMMDDHHMMSS with --files (default now)")
    parser.add_argument("--truth", type=Path, help="with --files: write the injected cases here (JSON lines)")
    parser.add_argument("--no-register", action="store_true", help="write files only; do not call the API")
    parser.add_argument("--export-rejected", metavar="FILENAME",
                        help="write FILENAME's rejected lines as a new event file to fix and --import")
    parser.add_argument("--out", type=Path, default=Path("."), help="with --export-rejected: the folder (default .)")
    parser.add_argument("--reason", help="with --export-rejected: only the lines rejected for this reason")
    args = parser.parse_args(argv)
    if args.export_rejected:
        return _export(Settings.from_env(), args)

    settings = Settings.from_env()
    folder = layout.ingest_dir(settings.shared_dir)
    try:
        setup_logging(SERVICE, folder, root_dir=settings.shared_dir)
    except safefiles.Refused as exc:
        raise SystemExit(f"{SERVICE}: {exc}") from None
    stop = StopFlag()
    stop_on_signals(stop)

    try:
        ingest = Ingest(settings, stop, register=not args.no_register)
    except safefiles.Refused as exc:
        log.error("%s", exc)
        return 2
    try:
        if args.imports or args.files is not None:
            ingest.recover()
        if args.imports:
            names = ingest.import_files(args.imports)
            log.info("imported %d file(s)", len(names))
            return 0
        generator = build_generator(settings, args.seed, args.rate)
        if args.files is not None:
            if args.files < 1 or (args.events is not None and args.events < 1):
                parser.error("--files and --events must be at least 1")
            start = parse_tick(args.start) if args.start else None
            names = ingest.write_files(generator, args.files, args.events or settings.events_per_file, start)
            if args.truth:
                args.truth.write_bytes(b"".join(orjson.dumps(i.as_dict()) + b"\n" for i in generator.truth))
            print("\n".join(names))
            return 0
        if generator.seed == (args.seed if args.seed is not None else settings.ingest_seed):
            # A restarted daemon must not repeat its order ids (they would all be duplicates).
            generator = build_generator(settings, generator.seed ^ int(time.time()), args.rate)
        log.info("%s writing a file every %ss (1..%d events, seed %d)", SERVICE, settings.ingest_interval,
                 settings.events_per_file, generator.seed)
        ingest.run_forever(generator)
        return 0
    except ImportProblem as exc:
        log.error("%s", exc)
        return 2
    finally:
        if stop.is_set():
            log.info("%s received: stopped after the current file", stop.signal_name)
        empty_folder(folder, settings.shared_dir)
