"""pipeline-apid with a request counter around its WSGI app, for `bench/pipeline.py --profile`.

    BENCH_API_COUNTS=<folder> python -m bench.apicount

The same program, options and gunicorn workers as `python -m app.api`; each worker process
also counts the requests it serves by method and route, and writes the counts to
`<folder>/<pid>.json` every half second. Only the profiling run uses it.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import orjson

from app.api import service

OUT = Path(os.environ.get("BENCH_API_COUNTS", "."))


def route(path: str) -> str:
    """The route of a path: a file's name becomes `{name}` (stages and actions are a fixed set)."""
    path = path.removeprefix(service.BASE)
    parts = path.split("/")
    if len(parts) == 3 and parts[1] == "files" and parts[2] != "register":
        parts[2] = "{name}"
    return "/".join(parts)


def counting(app):
    counts: dict[str, int] = {}
    lock = threading.Lock()

    def dump() -> None:
        target = OUT / f"{os.getpid()}.json"
        while True:
            time.sleep(0.5)
            with lock:
                data = orjson.dumps(counts)
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(target)

    threading.Thread(target=dump, name="bench-counts", daemon=True).start()

    def wsgi(environ, start_response):
        key = f"{environ.get('REQUEST_METHOD')} {route(environ.get('PATH_INFO', ''))}"
        with lock:
            counts[key] = counts.get(key, 0) + 1
        return app(environ, start_response)
    return wsgi


def main() -> None:
    create = service.create_app
    service.create_app = lambda settings=None, reaper=True: counting(create(settings, reaper))
    service.main([])


def read_counts(folder: Path) -> dict[str, int]:
    total: dict[str, int] = {}
    for path in folder.glob("*.json"):
        for key, n in orjson.loads(path.read_bytes()).items():
            total[key] = total.get(key, 0) + n
    return total


if __name__ == "__main__":
    main()
