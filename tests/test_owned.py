"""Host-safe folders (app/owned.py): a daemon emptying a stage folder shared with other hosts
removes what its own host wrote, leftovers nobody wrote, and dead local temporary files; a file
another host wrote for the next stage, or is still writing, stays. Another host is a process
in a UTS namespace of its own with its own host name (`unshare --uts`, as root)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from app import owned
from app.atomic import atomic_write
from app.daemon import empty_folder
from tests import servers

WRITE = """
import sys, time
from pathlib import Path
from app.atomic import atomic_write
folder, hold = Path(sys.argv[1]), sys.argv[2] == "hold"
with atomic_write(folder / "b-finished.txt", root=folder.parent) as out:
    out.write(b"written on another host\\n")
with atomic_write(folder / "b-writing.txt", root=folder.parent) as out:
    out.write(b"half")
    out.flush()
    print("writing", flush=True)
    if hold:
        time.sleep(60)
"""


def other_host(folder: Path, hold: bool, name: str = "host-b") -> subprocess.Popen:
    """A writer on "another host": its own UTS namespace and host name, the same shared folder."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        raise AssertionError("cannot make a UTS namespace here (needs root and unshare): no second host")
    script = f'hostname {name} && exec "$0" -c "$1" "$2" "$3"'
    proc = subprocess.Popen(["unshare", "--uts", "sh", "-c", script, sys.executable, WRITE, str(folder),
                             "hold" if hold else "go"], cwd=servers.ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    return proc


def test_a_stop_removes_this_hosts_files_and_leaves_another_hosts(tmp_path):
    folder = tmp_path / "shard-splitter"
    folder.mkdir()
    writer = other_host(folder, hold=True)
    try:
        with atomic_write(folder / "a-finished.txt", root=tmp_path) as out:
            out.write(b"written here\n")
        (folder / "leftover.txt").write_bytes(b"nobody's\n")
        (folder / "activity.log").write_bytes(b"log\n")
        names = set(os.listdir(folder))
        assert {"a-finished.txt", "b-finished.txt", "leftover.txt", owned.ledger_name()} <= names
        assert any(n.startswith("b-writing.txt.tmp-") for n in names)  # host-b is still writing it
        empty_folder(folder, tmp_path)
        left = set(os.listdir(folder))
        assert "b-finished.txt" in left and any(n.startswith("b-writing.txt.tmp-") for n in left)
        assert {"a-finished.txt", "leftover.txt", owned.ledger_name()}.isdisjoint(left)
        assert "activity.log" in left
        assert [n for n in left if owned.is_ledger(n)] == [n for n in left if ".host-b." in n]
    finally:
        writer.kill()
        writer.wait()


def test_the_other_host_empties_what_it_wrote_when_it_comes_back(tmp_path):
    folder = tmp_path / "shard-worker-0"
    folder.mkdir()
    writer = other_host(folder, hold=True)
    writer.kill()  # host-b dies mid-write: its finished file, its temporary file, its ledger stay
    writer.wait()
    empty_folder(folder, tmp_path)  # this host spares all of it
    assert len([n for n in os.listdir(folder) if "b-" in n or ".host-b." in n]) == 3
    # host-b restarts (same host name, a new process) and empties the folder: all of its own goes
    again = other_host(folder, hold=False)
    again.wait(30)
    script = "import sys; from pathlib import Path; from app.daemon import empty_folder; " \
             "empty_folder(Path(sys.argv[1]), Path(sys.argv[2]))"
    subprocess.run(["unshare", "--uts", "sh", "-c", 'hostname host-b && exec "$0" -c "$1" "$2" "$3"',
                    sys.executable, script, str(folder), str(tmp_path)], cwd=servers.ROOT, check=True)
    assert os.listdir(folder) == []


def test_a_single_host_still_empties_its_folder(tmp_path):
    folder = tmp_path / "mysql-sender"
    for n in range(3):
        with atomic_write(folder / f"f{n}.txt", root=tmp_path) as out:
            out.write(b"x")
    (folder / "junk").write_bytes(b"")
    empty_folder(folder, tmp_path)
    assert os.listdir(folder) == []
