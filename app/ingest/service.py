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
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import orjson

from .. import layout
from ..atomic import TMP_MARK, writer_alive
from ..client import ApiError, ApiUnavailable, PipelineClient
from ..config import ConfigError, Settings
from ..daemon import empty_folder
from ..logs import setup_logging
from ..shutdown import StopFlag, stop_on_signals
from ..stages import Stage, Status
from .generator import (Generator, Rates, World, existing_ticks, parse_tick, publish, temp_path,
                        write_event_file)

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
        self.events = layout.events_dir(settings.shared_dir)
        self.events.mkdir(parents=True, exist_ok=True)

    # -- the API ----------------------------------------------------------------------------

    def announce(self, filename: str, events: int | None) -> bool:
        """Register the file and mark event-ingest done, retrying while the API is down.
        False only when asked to stop first (the next start registers it)."""
        if not self.register:
            return True
        try:
            self.client.register(filename)
            self.client.ingest_done(filename, events=events, worker=SERVICE)
        except ApiUnavailable as exc:
            log.warning("%s left unregistered for now (%s); registered at the next start", filename, exc)
            return False
        except ApiError as exc:
            log.error("pipeline-apid refused %s: %s", filename, exc)
            return False
        log.info("registered %s (%s events)", filename, events)
        return True

    def recover(self) -> int:
        """Remove our own dead temporary files; register every complete file in events/ the API
        does not know, and mark done the stale ones it knows but never saw finished."""
        for tmp in self.events.glob(f"*{layout.SOURCE_SUFFIX}{TMP_MARK}*"):
            if not writer_alive(tmp):
                log.info("removing unfinished %s", tmp.name)
                tmp.unlink(missing_ok=True)
        if not self.register:
            return 0
        fixed = 0
        for path in sorted(self.events.glob(f"*{layout.SOURCE_SUFFIX}")):
            if self.stop.is_set():
                break
            filename = path.name[: -len(layout.SOURCE_SUFFIX)]
            if not FILENAME.fullmatch(filename):
                log.warning("skipping %s: its name is not a valid filename for the API", path.name)
                continue
            try:
                shards = self.client.file(filename)["shards"]
            except ApiError as exc:
                if exc.status != 404:
                    log.error("cannot check %s: %s", filename, exc)
                    continue
                fixed += self.announce(filename, _count_lines(path))
                continue
            except ApiUnavailable:
                break
            pending = any(s[Stage.INGEST.status_column] in (Status.NEW, Status.STARTED) for s in shards)
            if pending and time.time() - path.stat().st_mtime > STALE_SECONDS:
                fixed += self.announce(filename, _count_lines(path))
        if fixed:
            log.info("registered %d file(s) found unregistered or unfinished in %s", fixed, self.events)
        return fixed

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
                path, written = write_event_file(generator, self.events, tick, lines)
                last = tick
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
            path, written = write_event_file(generator, self.events, tick, events, last_file=i == files - 1)
            last = tick
            log.info("wrote %s (%d lines)", path.name, written)
            self.announce(tick, written)
            names.append(tick)
        return names

    def import_files(self, paths: list[Path]) -> list[str]:
        """Copy each file into events/ (whole or not at all) and register it, oldest name first."""
        sources: list[Path] = []
        for p in paths:
            if p.is_dir():
                sources.extend(sorted(p.glob(f"*{layout.SOURCE_SUFFIX}")))
            elif p.is_file():
                sources.append(p)
            else:
                raise ImportProblem(f"{p}: no such file or directory")
        names = []
        for src in sorted(sources, key=lambda q: q.name):
            if self.stop.is_set():
                break
            if not src.name.endswith(layout.SOURCE_SUFFIX) or not FILENAME.fullmatch(src.name[: -len(layout.SOURCE_SUFFIX)]):
                raise ImportProblem(f"{src}: an event file must be named <filename>{layout.SOURCE_SUFFIX} "
                                    f"with <filename> of letters, digits, _ or - (a UTC tick YYYYMMDDHHMMSS)")
            filename = src.name[: -len(layout.SOURCE_SUFFIX)]
            final = self.events / src.name
            if final.exists() and final.resolve() != src.resolve() and not _same_content(src, final):
                raise ImportProblem(f"{final} exists with different content; not overwritten")
            if not final.exists():
                tmp = temp_path(final)
                try:
                    with open(src, "rb") as fin, open(tmp, "wb") as fout:
                        while chunk := fin.read(1 << 20):
                            fout.write(chunk)
                        fout.flush()
                        os.fsync(fout.fileno())
                    publish(tmp, final)
                except BaseException:
                    tmp.unlink(missing_ok=True)
                    raise
                log.info("imported %s", src)
            self.announce(filename, _count_lines(final))
            names.append(filename)
        return names


class ImportProblem(Exception):
    pass


def _count_lines(path: Path) -> int:
    count, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


def _same_content(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
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
    args = parser.parse_args(argv)

    settings = Settings.from_env()
    folder = layout.ingest_dir(settings.shared_dir)
    setup_logging(SERVICE, folder)
    stop = StopFlag()
    stop_on_signals(stop)

    ingest = Ingest(settings, stop, register=not args.no_register)
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
        empty_folder(folder)
