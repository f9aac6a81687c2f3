"""What the machine was doing during a measured window besides our processes (used by bench/pipeline.py).

Two runs of the same code on this 2-core VM differ in CPU per event by several percent, in
every process group at once (the server's included), because the CPU a process is charged for a
piece of work depends on what runs beside it: other users' processes share the caches and the
memory bandwidth, and this kernel (no IRQ_TIME_ACCOUNTING) charges the hard and soft interrupts
it serves (disk completions, loopback TCP) to whichever task they interrupt. Neither shows in
our own counters. So each window records:

- a probe: one fixed piece of Python work (dicts and strings, like the daemons' own), timed by
  its thread's CPU clock every `period` seconds in a thread of the bench; its median CPU per
  piece is the machine's speed for Python work during the window (higher = slower machine);
- the machine's CPU from /proc/stat over the window, and what of it was not ours (`others_s`:
  busy time minus our processes' and the bench's own), steal and interrupt time;
- the load average at the end.

A pair whose sides' probes differ by more than a few percent was not measured on the same machine.
"""
from __future__ import annotations

import os
import resource
import statistics
import threading
import time
from pathlib import Path

USER_HZ = os.sysconf("SC_CLK_TCK")
STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
BUSY = ("user", "nice", "system", "irq", "softirq")


def probe_piece(n: int = 20_000) -> int:
    """The fixed work: a dict of `n` small strings built and summed (~5 ms on an idle core)."""
    d = {}
    for i in range(n):
        d[i] = str(i)
    return sum(len(v) for v in d.values())


class Probe:
    """Times `probe_piece` every `period` seconds in a daemon thread until stopped; ~1% of a core."""

    def __init__(self, period: float = 0.5):
        self.period = period
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="machine-probe", daemon=True)

    def start(self) -> "Probe":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.thread_time()
            probe_piece()
            self.samples.append(1e3 * (time.thread_time() - started))
            self._stop.wait(self.period)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        s = self.samples
        return {"probe_ms": round(statistics.median(s), 3) if s else None, "probe_n": len(s),
                "probe_min_ms": round(min(s), 3) if s else None}


def system_cpu(text: str | None = None) -> dict[str, float]:
    """Seconds of every CPU by kind since boot, from /proc/stat's first line."""
    line = (text if text is not None else Path("/proc/stat").read_text()).splitlines()[0].split()
    assert line[0] == "cpu", line[0]
    return {k: int(v) / USER_HZ for k, v in zip(STAT_FIELDS, line[1:])}


def others(before: dict[str, float], after: dict[str, float], ours_s: float) -> dict[str, float]:
    """The machine's CPU over a window from two `system_cpu` samples, and what of its busy time
    was not `ours_s` (CPU seconds of our processes in that window)."""
    delta = {k: after[k] - before[k] for k in STAT_FIELDS}
    busy = sum(delta[k] for k in BUSY)
    return {"busy_s": round(busy, 2), "others_s": round(busy - ours_s, 2), "steal_s": round(delta["steal"], 2),
            "irq_s": round(delta["irq"] + delta["softirq"], 2), "iowait_s": round(delta["iowait"], 2)}


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Window:
    """The probe and /proc/stat around one measured window."""

    def __init__(self, period: float = 0.5):
        self.probe = Probe(period)

    def start(self) -> "Window":
        self.started = time.monotonic()
        self.cpu, self.own = system_cpu(), self_cpu()
        self.probe.start()
        return self

    def stop(self, ours_s: float) -> dict:
        """`ours_s`: the CPU seconds the window charged to the measured processes."""
        result = self.probe.stop()
        own = self_cpu() - self.own            # the bench itself: its polls and the probe
        result.update(others(self.cpu, system_cpu(), ours_s + own))
        seconds = time.monotonic() - self.started
        result["others_cores"] = round(result["others_s"] / seconds, 3) if seconds > 0 else 0.0
        result["bench_s"] = round(own, 2)
        result["load_average"] = round(os.getloadavg()[0], 2)
        return result


_windows = 0


def barrier(folder: Path, parties: int, timeout: float = 900.0) -> bool:
    """Wait until `parties` processes reached their window of the same number (a file each in
    `folder`); whether all did within `timeout` (a side that died must not hang the other)."""
    global _windows
    _windows += 1
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{_windows}.{os.getpid()}").touch()
    deadline = time.monotonic() + timeout
    while len(list(folder.glob(f"{_windows}.*"))) < parties:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
