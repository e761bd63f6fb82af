"""Scratch folders for the checkpoints a trial hands to Ray Tune.

Each epoch's checkpoint is written to a temporary folder, handed to Tune and removed. A
trial killed in between (its driver killed, its node lost) cannot remove it, and a
checkpoint is as big as the model and its optimizer state. So a worker writes them in a
folder of its own under the node's cache, ``$FTSWEEP_CACHE/scratch/w*``, and holds an
exclusive lock on the folder's ``.lock`` file for as long as it lives. The lock goes with
the process however it ends: a folder whose lock can be taken belongs to no one, and the
next worker that starts removes it. Unlike process ids, locks also hold in a cache that
several nodes share (``flock`` over NFS).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from trainables import node_cache

LOCK = ".lock"
UNLOCKED_GRACE_S = 3600  # a folder not locked yet: its worker is starting (or died starting)
_held: dict[Path, tuple[Path, int]] = {}  # per scratch root: this process's folder, its locked fd


def scratch_dir() -> Path | None:
    """This process's scratch folder under the node's cache, made and locked on the first
    call, when the folders of workers that are gone are removed too; None when the cache
    cannot be written (the system's temporary folder serves instead)."""
    root = node_cache.cache_root() / "scratch"
    if root in _held and _held[root][0].is_dir():
        return _held[root][0]
    try:
        mine, fd = _make_locked(root)
    except OSError as e:
        print(f"ftsweep: checkpoints pass through the system's temporary folder: cannot use {root} ({e})",
              file=sys.stderr)
        return None
    _held[root] = (mine, fd)  # the fd stays open, and the lock held, until the process ends
    remove_abandoned(root)
    return mine


def _make_locked(root: Path) -> tuple[Path, int]:
    root.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        mine = Path(tempfile.mkdtemp(dir=root, prefix="w"))
        fd = os.open(mine / LOCK, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:  # another worker may have taken the lock first and removed the folder as abandoned
            if os.stat(mine / LOCK).st_ino == os.fstat(fd).st_ino:
                return mine, fd
        except FileNotFoundError:
            pass
        os.close(fd)
    raise OSError(f"could not lock a folder in {root}")


def remove_abandoned(root: Path) -> list[Path]:
    """Remove the folders under ``root`` whose worker is gone; returns them."""
    mine = {folder for folder, _ in _held.values()}
    removed = []
    for folder in sorted(root.iterdir()) if root.is_dir() else ():
        if folder in mine or not folder.is_dir():
            continue
        try:
            fd = os.open(folder / LOCK, os.O_RDWR)
        except FileNotFoundError:
            if _age(folder) > UNLOCKED_GRACE_S:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its worker lives
            os.close(fd)
            continue
        shutil.rmtree(folder, ignore_errors=True)  # under the lock: no one else takes it meanwhile
        os.close(fd)
        removed.append(folder)
    return removed


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0
