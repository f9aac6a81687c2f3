"""supervisord event listener: a program that keeps crashing is reported loudly.

supervisord marks a program FATAL after `startretries` failed starts and then leaves it down,
which in a log full of other programs' lines is easy to miss. This listener prints a banner
naming the program and the way back; with PIPELINE_EXIT_ON_FATAL=1 (containers) it also leaves
a marker and stops supervisord, and `app.supervise` then exits 1 so the orchestrator restarts
the container. stdout is the event protocol's channel: everything human goes to stderr.
"""
from __future__ import annotations

import os
import signal
import sys

from supervisor import childutils

from .config import Supervision
from .supervise import FATAL_MARKER


def banner(process: str, group: str, from_state: str, sup: Supervision) -> str:
    name = process if process == group else f"{group}:{process}"
    lines = [
        f"FATAL: program {name} keeps crashing: supervisord gave up after "
        f"{sup.start_retries} failed start(s) (last state {from_state}) and will not restart it.",
        "  Its own output is just above in this log, and in $SHARED_DIR/<its folder>/activity.log.",
        f"  After fixing the cause: supervisorctl -c {sup.config_file} start {name}",
    ]
    if sup.exit_on_fatal:
        lines.append("  PIPELINE_EXIT_ON_FATAL is set: stopping supervisord (exit status 1).")
    rule = "=" * 78
    return "\n".join([rule, *lines, rule])


def main() -> None:
    sup = Supervision.from_env()
    stopping = False
    while True:
        headers, payload = childutils.listener.wait(sys.stdin, sys.stdout)
        if headers.get("eventname") == "PROCESS_STATE_FATAL":
            fields = childutils.get_headers(payload)
            process, group = fields.get("processname", "?"), fields.get("groupname", "?")
            print(banner(process, group, fields.get("from_state", "?"), sup), file=sys.stderr, flush=True)
            if sup.exit_on_fatal and not stopping:
                stopping = True
                (sup.run_dir / FATAL_MARKER).write_text(f"{process}\n")
                childutils.listener.ok(sys.stdout)
                os.kill(os.getppid(), signal.SIGTERM)
                continue
        childutils.listener.ok(sys.stdout)


if __name__ == "__main__":
    main()
