"""Where the CPU goes during a bench window: py-spy for the Python processes, the server's
performance_schema for SQL. Used by `bench/pipeline.py --profile` only (py-spy is a bench-time
tool, not a dependency: `pip install py-spy` into the venv first).
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
# Frames that only wrap the work (interpreter start, thread start-up): not worth naming as a cost.
WRAPPERS = ("<module>", "_run_module_as_main", "_run_code", "run", "_bootstrap", "_bootstrap_inner", "main")


class Spy:
    """py-spy recording one process (and its children) in raw collapsed-stack format."""

    def __init__(self, name: str, pid: int, out: Path, subprocesses: bool = False, rate: int = 100):
        self.name, self.out = name, out
        # --gil: only the thread holding the GIL is sampled, i.e. where the process spends CPU in
        # Python (its threads otherwise show mostly waiting for each other or for the server).
        args = [PY_SPY, "record", "--pid", str(pid), "--format", "raw", "--output", str(out), "--rate", str(rate),
                "--gil"]
        if subprocesses:
            args.append("--subprocesses")
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _module(frame: str) -> str:
    """The module of a frame `function (path/to/module.py:123)`: a dotted relative path
    (`app.worker`, `pymysql.connections`), or the file name for an absolute one."""
    path = frame.partition(" (")[2].rsplit(":", 1)[0]
    if path.startswith("/"):
        path = path.rsplit("/", 1)[-1]
    return path.removesuffix(".py").replace("/", ".")


def _frame_name(frame: str) -> str:
    """`function (path/to/module.py:123)` -> `module.function` (lines merged)."""
    module = _module(frame)
    name = frame.partition(" (")[0]
    return f"{module}.{name}" if module else name


def _package(module: str) -> str:
    """What a module belongs to, for shares by area: `app.worker` for ours, `pymysql` for a library."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "app" else parts[0]


def summarise(raw: Path, top: int = 8) -> dict:
    """Shares of the samples in a py-spy raw file: self and inclusive by function, and self by
    module (app.* modules one by one, each library as a whole)."""
    self_time: Counter = Counter()
    inclusive: Counter = Counter()
    packages: Counter = Counter()
    total = 0
    if raw.exists():
        for line in raw.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            # py-spy may put "process NNN:..." and "thread (0x..)" pseudo-frames first.
            frames = [f for f in stack.split(";") if f.strip() and not f.startswith(("process ", "thread "))]
            if not frames:
                continue
            total += n
            names = [_frame_name(f) for f in frames]
            self_time[names[-1]] += n
            for f in set(names):
                if f.rsplit(".", 1)[-1] not in WRAPPERS:
                    inclusive[f] += n
            packages[_package(_module(frames[-1]))] += n
    # Frames on (nearly) every stack are the process's main loop, not a cost worth naming.
    inclusive = Counter({f: n for f, n in inclusive.items() if n < 0.9 * total})
    share = (lambda c: [(name, round(100 * n / total, 1)) for name, n in c.most_common(top)]) if total else list
    return {"samples": total, "self": share(self_time), "inclusive": share(inclusive), "modules": share(packages)}


# -- performance_schema ------------------------------------------------------------------------

# A private server's options for --profile beside performance_schema=ON: digests and texts long
# enough for the worker's scripts, a history long enough to name each digest's sender and text.
HISTORY_OPTIONS = ["--performance-schema-max-digest-length=8192", "--max-digest-length=8192",
                   "--performance-schema-max-sql-text-length=8192",
                   "--performance-schema-events-statements-history-long-size=50000"]

RESET = [
    "TRUNCATE TABLE performance_schema.events_statements_summary_by_digest",
    "TRUNCATE TABLE performance_schema.events_statements_summary_by_thread_by_event_name",
    "TRUNCATE TABLE performance_schema.events_statements_summary_global_by_event_name",
    "TRUNCATE TABLE performance_schema.table_io_waits_summary_by_table",
    "TRUNCATE TABLE performance_schema.events_statements_history_long",
    "UPDATE performance_schema.setup_consumers SET ENABLED = 'YES'"
    " WHERE NAME IN ('events_statements_current', 'events_statements_history_long')",
]


def reset(cur) -> None:
    for sql in RESET:
        cur.execute(sql)


def top_statements(cur, top: int = 12) -> list[dict]:
    """Statements by the server time they took (latency, waits included), digests that differ
    only past their first 90 characters (a multi-row VALUES list of another length) merged."""
    cur.execute("SELECT SCHEMA_NAME, DIGEST_TEXT, COUNT_STAR, SUM_TIMER_WAIT / 1e12, SUM_ROWS_AFFECTED,"
                " SUM_ROWS_EXAMINED FROM performance_schema.events_statements_summary_by_digest")
    merged: dict[tuple, list] = {}
    for schema, text, count, seconds, affected, examined in cur.fetchall():
        key = (schema, (text or "")[:90])
        row = merged.setdefault(key, [0, 0.0, 0, 0])
        row[0] += int(count)
        row[1] += float(seconds)
        row[2] += int(affected)
        row[3] += int(examined)
    total = sum(r[1] for r in merged.values()) or 1.0
    ranked = sorted(merged.items(), key=lambda kv: -kv[1][1])[:top]
    return [{"schema": schema, "statement": text, "count": n, "seconds": round(sec, 3),
             "share": round(100 * sec / total, 1), "rows_affected": aff, "rows_examined": ex}
            for (schema, text), (n, sec, aff, ex) in ranked]


def digests(cur) -> list[dict]:
    """Every statement digest with its server time, lock time and rows, the client pids that sent
    it and a sample of its text, from the recent statements' history (a sample, enough to name
    them). MariaDB gives every statement of a multi-statement packet after the first the first
    one's DIGEST_TEXT (its own digest, though) and the rest of the packet as SQL_TEXT: the sample
    is that text, the statement first."""
    cur.execute("SELECT h.DIGEST, a.ATTR_VALUE, COUNT(*), MIN(h.EVENT_NAME), MIN(LEFT(h.SQL_TEXT, 400))"
                " FROM performance_schema.events_statements_history_long h"
                " JOIN performance_schema.threads t ON t.THREAD_ID = h.THREAD_ID"
                " JOIN performance_schema.session_connect_attrs a ON a.PROCESSLIST_ID = t.PROCESSLIST_ID"
                "  AND a.ATTR_NAME = '_pid' WHERE h.DIGEST IS NOT NULL GROUP BY h.DIGEST, a.ATTR_VALUE")
    senders: dict[str, Counter] = {}
    samples: dict[str, tuple] = {}
    for digest, pid, n, event, text in cur.fetchall():
        senders.setdefault(digest, Counter())[int(pid)] += int(n)
        samples.setdefault(digest, (event, text))
    cur.execute("SELECT DIGEST, SCHEMA_NAME, DIGEST_TEXT, COUNT_STAR, SUM_TIMER_WAIT / 1e6, SUM_LOCK_TIME / 1e6,"
                " SUM_ROWS_EXAMINED, SUM_ROWS_SENT, SUM_ROWS_AFFECTED, SUM_NO_INDEX_USED, SUM_SORT_ROWS,"
                " SUM_CREATED_TMP_TABLES FROM performance_schema.events_statements_summary_by_digest"
                " ORDER BY SUM_TIMER_WAIT DESC")
    return [{"digest": d, "schema": schema, "statement": text or "", "count": int(n), "us": float(us),
             "lock_us": float(lock), "examined": int(ex), "sent": int(sent), "affected": int(aff),
             "no_index": int(noidx), "sort_rows": int(sort), "tmp_tables": int(tmp),
             "event": samples.get(d, ("", ""))[0], "sample": samples.get(d, ("", ""))[1] or "",
             "pids": dict(senders.get(d, Counter()))}
            for d, schema, text, n, us, lock, ex, sent, aff, noidx, sort, tmp in cur.fetchall()]


def table_io(cur, top: int = 12) -> list[dict]:
    cur.execute("SELECT OBJECT_SCHEMA, OBJECT_NAME, COUNT_STAR, SUM_TIMER_WAIT / 1e12, COUNT_FETCH, COUNT_INSERT,"
                " COUNT_UPDATE, COUNT_DELETE FROM performance_schema.table_io_waits_summary_by_table"
                " WHERE COUNT_STAR > 0 ORDER BY SUM_TIMER_WAIT DESC LIMIT %s", (top,))
    return [{"schema": s, "table": t, "ops": int(n), "seconds": float(sec), "fetch": int(f), "insert": int(i),
             "update": int(u), "delete": int(d)} for s, t, n, sec, f, i, u, d in cur.fetchall()]


def statements_by_pid(cur) -> dict[int, Counter]:
    """Statements executed per client process (PyMySQL sends its pid as a connection attribute),
    by statement kind, for the connections still open."""
    cur.execute("SELECT a.ATTR_VALUE, e.EVENT_NAME, e.COUNT_STAR"
                " FROM performance_schema.events_statements_summary_by_thread_by_event_name e"
                " JOIN performance_schema.threads t ON t.THREAD_ID = e.THREAD_ID"
                " JOIN performance_schema.session_connect_attrs a ON a.PROCESSLIST_ID = t.PROCESSLIST_ID"
                "  AND a.ATTR_NAME = '_pid'"
                " WHERE e.COUNT_STAR > 0 AND e.EVENT_NAME LIKE 'statement/sql/%%'")
    out: dict[int, Counter] = {}
    for pid, event, count in cur.fetchall():
        out.setdefault(int(pid), Counter())[event.rsplit("/", 1)[-1]] += int(count)
    return out


def statements_total(cur) -> Counter:
    cur.execute("SELECT EVENT_NAME, COUNT_STAR FROM performance_schema.events_statements_summary_global_by_event_name"
                " WHERE COUNT_STAR > 0 AND EVENT_NAME LIKE 'statement/sql/%%'")
    return Counter({event.rsplit("/", 1)[-1]: int(count) for event, count in cur.fetchall()})


def _one(cur, sql: str):
    cur.execute(sql)
    row = cur.fetchone()
    return row[0] if row else None
