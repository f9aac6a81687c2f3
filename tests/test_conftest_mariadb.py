"""`make test` with no MariaDB: one line up front saying so, and no test run."""
from __future__ import annotations

import subprocess
import sys

from tests import servers


def test_without_mariadb_the_run_stops_with_one_line_up_front():
    port = servers.free_port()     # nothing listens there
    env = {"PATH": "/usr/bin:/bin", "TEST_MYSQL_PORT": str(port), "HOME": "/tmp"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_rejected.py",
                          "tests/test_names.py"], cwd=servers.ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    lines = [ln for ln in text.splitlines() if "no MariaDB at" in ln]
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "start-stop-daemon" in lines[0], text
    assert "passed" not in text and "failed" not in text and "OperationalError" not in text, text
