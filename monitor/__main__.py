"""`python -m monitor` / `pipeline-monitor`: the live dashboard of the pipeline.

Reads PIPELINE_URL, PIPELINE_API_TOKEN and SUPERVISOR_SOCKET through app.config; flags win.
`--screenshot FILE` renders one populated screen headless and writes it as SVG (for docs and
for looking at a system without a terminal).
"""
from __future__ import annotations

import argparse
import asyncio
import sys

from app.config import Settings

from .api import ApiSource
from .app import MonitorApp
from .stuck import Thresholds
from .supervisor import SupervisorClient


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text!r}")
    return value


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 120x40, got {text!r}") from None
    if w < 20 or h < 10:
        raise argparse.ArgumentTypeError(f"too small: {text!r}")
    return w, h


def parse_args(argv: list[str] | None, settings: Settings) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pipeline-monitor", description=__doc__.splitlines()[0])
    p.add_argument("--api-url", default=settings.pipeline_url,
                   help="pipeline-apid base URL (default: PIPELINE_URL, %(default)s)")
    p.add_argument("--supervisor-socket", default=settings.supervisor_socket,
                   help="supervisord's unix socket (default: SUPERVISOR_SOCKET, %(default)s); "
                        "'' to hide the process panel")
    p.add_argument("--interval", type=_positive, default=1.0, help="seconds between refreshes (default 1)")
    p.add_argument("--timeout", type=_positive, default=3.0, help="seconds a poll may take (default 3)")
    p.add_argument("--stuck-after", type=_positive, default=60.0,
                   help="a ready task waiting this long marks its stage (default 60 s)")
    p.add_argument("--stuck-factor", type=_positive, default=5.0,
                   help="a task running this many times its stage's median run is stuck (default 5)")
    p.add_argument("--screenshot", metavar="FILE.svg", help="render one screen headless to FILE and exit")
    p.add_argument("--size", type=_size, default=(120, 36), help="screen size for --screenshot (default 120x36)")
    return p.parse_args(argv)


def build_app(args: argparse.Namespace, settings: Settings) -> MonitorApp:
    source = ApiSource(args.api_url, settings.api_token, timeout=args.timeout)
    supervisor = SupervisorClient(args.supervisor_socket, timeout=args.timeout) if args.supervisor_socket else None
    return MonitorApp(source, supervisor, interval=args.interval,
                      thresholds=Thresholds(stuck_after=args.stuck_after, factor=args.stuck_factor))


def screenshot(app: MonitorApp, path: str, size: tuple[int, int]) -> None:
    async def pilot(p) -> None:
        for _ in range(200):  # up to ~10 s for the first answers
            if app.polls and (app.supervisor is None or app.supervisor_polls):
                break
            await asyncio.sleep(0.05)
        await p.pause(0.5)
        await p.wait_for_scheduled_animations()
        app.save_screenshot(path)
        app.exit()

    app.run(headless=True, size=size, auto_pilot=pilot)
    print(path)


def main(argv: list[str] | None = None) -> None:
    settings = Settings.from_env()
    args = parse_args(sys.argv[1:] if argv is None else argv, settings)
    app = build_app(args, settings)
    if args.screenshot:
        screenshot(app, args.screenshot, args.size)
    else:
        app.run()


if __name__ == "__main__":
    main()
