"""How numbers become short text: ages, durations, sparklines and progress bars.

Cells are narrow at 80 columns, so every value is cut to a few characters here, in one place.
"""
from __future__ import annotations

from typing import Sequence

BARS = "▁▂▃▄▅▆▇█"


def seconds(value: float | None) -> str:
    """A duration as the two largest units: `850ms`, `42s`, `3m05s`, `2h10m`, `3d04h`."""
    if value is None:
        return "—"
    if value < 0:
        value = 0.0
    if value < 1:
        return f"{int(value * 1000)}ms"
    s = int(value)
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def millis(value: float | None) -> str:
    return "—" if value is None else seconds(value / 1000)


def count(value: int | None) -> str:
    """Counts above 99 999 as `123k` / `4.5M` so a column stays six characters wide."""
    if value is None:
        return "—"
    if value < 100_000:
        return str(value)
    if value < 10_000_000:
        return f"{value // 1000}k"
    return f"{value / 1_000_000:.1f}M"


def sparkline(values: Sequence[int | float], width: int | None = None) -> str:
    """One block per value, the newest `width` values, scaled to the largest one shown.

    Zero is a space-like lowest bar only when something else is non-zero, so an idle stage
    reads as a flat line rather than as noise.
    """
    if width is not None:
        values = list(values)[-width:] if width > 0 else []
    if not values:
        return ""
    top = max(values)
    if top <= 0:
        return "·" * len(values)
    out = []
    for v in values:
        if v <= 0:
            out.append("·")
        else:
            out.append(BARS[min(len(BARS) - 1, int((v / top) * (len(BARS) - 1) + 0.5))])
    return "".join(out)


def bar(done: int, failed: int, total: int, width: int) -> tuple[str, str, str]:
    """A progress bar split into (done, failed, remaining) segments of `width` cells."""
    if total <= 0 or width <= 0:
        return "", "", "░" * max(width, 0)
    d = round(width * done / total)
    f = round(width * failed / total)
    if failed and not f:
        f = 1
    if d + f > width:
        d = width - f
    return "█" * d, "█" * f, "░" * (width - d - f)


def clip(text: str | None, width: int) -> str:
    if not text:
        return ""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def stamp(iso: str | None) -> str:
    """`2025-01-01T10:00:05.123Z` -> `2025-01-01 10:00:05.123` (the API's times are UTC)."""
    if not iso:
        return "—"
    return iso.replace("T", " ").rstrip("Z")
