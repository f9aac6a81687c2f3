"""supervisord event listener: a program that keeps crashing is reported loudly.

supervisord marks a program FATAL after `startretries` starts that die within `startsecs`, and
then leaves it down; in a log full of other programs' lines that is easy to miss. A program
that dies *after* `startsecs` is restarted forever and never becomes FATAL, so this listener
also counts unexpected exits: CRASH_LOOP_EXITS of them within CRASH_LOOP_WINDOW seconds is a
crash loop too, and the program is stopped. Either way it prints a banner naming the program
and the way back; with PIPELINE_EXIT_ON_FATAL=1 (containers) it also leaves a marker in the run
folder and stops supervisord, and `pipeline-supervise` then exits 1 so the orchestrator restarts
the container. stdout is the event protocol's channel: everything human goes to stderr.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import xmlrpc.client
from collections import defaultdict, deque
from pathlib import Path

from supervisor import childutils

from ..config import Supervision
from .supervise import FATAL_MARKER

CRASH_LOOP_EXITS = 5
CRASH_LOOP_WINDOW = 120.0


def banner(name: str, why: str, sup: Supervision) -> str:
    lines = [
        f"FATAL: program {name} keeps crashing: {why}.",
        "  Its own output is just above in this log, and in $SHARED_DIR/<its folder>/activity.log.",
        f"  After fixing the cause: supervisorctl -c {sup.config_file} start {name}",
    ]
    if sup.exit_on_fatal:
        lines.append("  PIPELINE_EXIT_ON_FATAL is set: stopping supervisord (exit status 1).")
    rule = "=" * 78
    return "\n".join([rule, *lines, rule])


class Listener:
    def __init__(self, sup: Supervision):
        self.sup = sup
        self.exits: dict[str, deque] = defaultdict(deque)
        self.stopping = False
        self.signalled = False

    def handle(self, event: str, fields: dict[str, str]) -> None:
        process, group = fields.get("processname", "?"), fields.get("groupname", "?")
        name = process if process == group else f"{group}:{process}"
        if event == "PROCESS_STATE_FATAL":
            self.crash_loop(name, f"it died within startsecs of every start until supervisord gave up "
                                  f"(last state {fields.get('from_state', '?')}); it is not restarted")
        elif event == "PROCESS_STATE_EXITED" and fields.get("expected") == "0":
            now = time.monotonic()
            exits = self.exits[name]
            exits.append(now)
            while exits and now - exits[0] > CRASH_LOOP_WINDOW:
                exits.popleft()
            if len(exits) >= CRASH_LOOP_EXITS:
                exits.clear()
                self.stop_program(name)
                self.crash_loop(name, f"it exited unexpectedly {CRASH_LOOP_EXITS} times within "
                                      f"{CRASH_LOOP_WINDOW:.0f}s after starting fine; it is stopped now")

    def stop_program(self, name: str, within: float = 10.0) -> None:
        """Stop `name`, which has just exited. supervisord restarts it at once, and may not have
        yet (EXITED: stopProcess refuses it as NOT_RUNNING), so wait until it has; and until the
        new process runs its own program: a signal sent between supervisord's fork and exec is
        caught by the forked copy of supervisord and lost with it, and the program would then
        ignore the stop until stopwaitsecs ends in a SIGKILL."""
        rpc = childutils.getRPCInterface(os.environ).supervisor
        deadline = time.monotonic() + within
        problem = f"still not stoppable after {within:.0f}s"
        while time.monotonic() < deadline:
            try:
                info = rpc.getProcessInfo(name)
                state = info["statename"]
                if state in ("STOPPED", "STOPPING", "FATAL"):
                    return
                if state == "BACKOFF" or (state in ("STARTING", "RUNNING") and self.exec_done(info["pid"])):
                    rpc.stopProcess(name, False)
                    return
            except xmlrpc.client.Fault as fault:
                if "NOT_RUNNING" not in fault.faultString:
                    problem = fault.faultString
                    break
            except OSError as exc:
                problem = str(exc)
                break
            time.sleep(0.05)
        print(f"fatal-listener: could not stop {name}: {problem}", file=sys.stderr, flush=True)

    @staticmethod
    def exec_done(pid: int) -> bool:
        """Whether supervisord's child `pid` runs its own program yet (until its exec it is a
        copy of supervisord, our parent, with the same command line)."""
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes() != Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
        except OSError:
            return True  # gone already, or no /proc here: nothing to wait for

    def crash_loop(self, name: str, why: str) -> None:
        print(banner(name, why, self.sup), file=sys.stderr, flush=True)
        if self.sup.exit_on_fatal and not self.stopping:
            self.stopping = True
            (self.sup.run_dir / FATAL_MARKER).write_text(f"{name}\n")

    def run(self) -> None:
        while True:
            headers, payload = childutils.listener.wait(sys.stdin, sys.stdout)
            self.handle(headers.get("eventname", ""), childutils.get_headers(payload))
            childutils.listener.ok(sys.stdout)
            if self.stopping and not self.signalled:
                self.signalled = True
                os.kill(os.getppid(), signal.SIGTERM)  # our parent is supervisord


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app.supervision.fatal_listener")
    parser.add_argument("--here", type=Path, required=True, help="the folder of supervisord.conf (%%(here)s)")
    args = parser.parse_args(argv)
    Listener(Supervision.from_env(config_file=args.here / "supervisord.conf")).run()


if __name__ == "__main__":
    main()
