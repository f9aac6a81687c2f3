"""What the dashboard calls stuck: the rules behind its red and yellow marks.

A stage is *stuck* when its oldest ready task has waited longer than `stuck_after` and the stage
finished nothing in the last minute; it is *lagging* when the wait is that long but work still
moves. A started task is stuck when its lease expired (its owner is gone) or when it has run far
longer than the stage's median run.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import formatting as fmt


@dataclass(frozen=True)
class Thresholds:
    stuck_after: float = 60.0
    """Seconds a ready task may wait, or a task may run when no median is known yet."""
    factor: float = 5.0
    """A run longer than `factor` x the stage's median run is "far longer than usual"..."""
    floor: float = 10.0
    """...but never shorter than this many seconds (short medians make noisy multiples)."""

    def stage_state(self, metrics: dict | None) -> str:
        """`ok`, `lagging` or `stuck` for one entry of /metrics/summary's `stages`."""
        if not metrics or not metrics.get("ready"):
            return "ok"
        age = metrics.get("oldest_ready_age_seconds")
        if age is None or age < self.stuck_after:
            return "ok"
        return "stuck" if not metrics.get("done_last_minute") else "lagging"

    def run_limit_ms(self, median_ms: float | None) -> float:
        if median_ms is None:
            return self.stuck_after * 1000
        return max(self.factor * median_ms, self.floor * 1000)

    def task_reason(self, task: dict, median_ms: float | None) -> str | None:
        """Why a started task (an item of /tasks/{stage}?status=started) is stuck, or None."""
        if task.get("lease_expired"):
            return "lease expired"
        running = task.get("running_ms")
        if running is not None and running > self.run_limit_ms(median_ms):
            if median_ms is None:
                return f"running over {self.stuck_after:g}s"
            return f"far past median {fmt.millis(median_ms)}"
        return None
