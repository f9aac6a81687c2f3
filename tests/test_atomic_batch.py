"""app/atomic.py atomic_writes: several files of one folder, each whole or absent, published together."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from app.atomic import TMP_MARK, atomic_writes
from app.owned import ledger_name

ROOT = Path(__file__).resolve().parent.parent


def test_all_published_with_their_modes_and_noted_in_one_ledger(tmp_path):
    folder = tmp_path / "out"
    with atomic_writes([(folder / "a.txt", 0o644), (folder / "r.txt", 0o600)], root=tmp_path) as (a, r):
        a.write(b"aaa\n")
        r.write(b"rrr\n")
        assert not (folder / "a.txt").exists()
    assert (folder / "a.txt").read_bytes() == b"aaa\n" and (folder / "r.txt").read_bytes() == b"rrr\n"
    assert (folder / "r.txt").stat().st_mode & 0o777 == 0o600 & ~_umask()
    ledger = (folder / ledger_name()).read_text().split()
    assert ledger[1::2] == ["a.txt", "r.txt"]
    assert int(ledger[0]) == (folder / "a.txt").stat().st_ino
    assert not [p for p in folder.iterdir() if TMP_MARK in p.name]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_an_error_publishes_none_and_leaves_no_temporary_file(tmp_path):
    folder = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_writes([(folder / "a.txt", 0o644), (folder / "b.txt", 0o644)], root=tmp_path) as (a, b):
            a.write(b"x" * 100)
            raise RuntimeError("mid-file")
    assert [p.name for p in folder.iterdir() if not p.name.startswith(".owned.")] == []


def test_a_kill_after_the_writes_before_publishing_leaves_only_temporary_files(tmp_path):
    folder = tmp_path / "out"
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
from app.atomic import atomic_writes
folder = Path({str(folder)!r})
with atomic_writes([(folder / "a.txt", 0o644), (folder / "b.txt", 0o644)], root=folder.parent) as (a, b):
    a.write(b"a" * 10000)
    b.write(b"b" * 10000)
    a.flush(); b.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", script], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    names = [p.name for p in folder.iterdir() if not p.name.startswith(".owned.")]
    assert len(names) == 2 and all(TMP_MARK in n for n in names)


def test_nothing_to_write_is_nothing_done(tmp_path):
    with atomic_writes([], root=tmp_path) as files:
        assert files == []
    assert list(tmp_path.iterdir()) == []


def test_files_of_two_folders_are_refused(tmp_path):
    with pytest.raises(ValueError):
        with atomic_writes([(tmp_path / "a" / "x", 0o644), (tmp_path / "b" / "y", 0o644)], root=tmp_path):
            pass
