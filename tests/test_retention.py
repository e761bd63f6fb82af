"""What a finished sweep keeps of its checkpoints: the best trials' best, and what --resume needs."""

from types import SimpleNamespace

import pyarrow.fs as pafs

from sweeps.results.retention import retain


def trial(root, name, best_epoch, latest_epoch, accs):
    """A trial folder with a checkpoint per epoch in ``accs`` (of 100 bytes each) and the
    Result fields retention reads."""
    folder = root / f"trial_{name}"
    for epoch in range(1, len(accs) + 1):
        (folder / f"checkpoint_{epoch:06d}").mkdir(parents=True)
        (folder / f"checkpoint_{epoch:06d}" / "checkpoint.pt").write_bytes(b"x" * 100)
    ckpt = lambda e: SimpleNamespace(path=str(folder / f"checkpoint_{e:06d}"))  # noqa: E731
    return SimpleNamespace(
        trial_id=name, path=str(folder), filesystem=pafs.LocalFileSystem(), checkpoint=ckpt(latest_epoch),
        best_checkpoints=[(ckpt(e), {"val_acc": accs[e - 1]}) for e in sorted({best_epoch, latest_epoch})])


def left(root):
    return sorted(f"{p.parent.name}/{p.name}" for p in root.glob("trial_*/checkpoint_*"))


def test_finished_trials_keep_only_the_best_trials_best(tmp_path):
    results = [trial(tmp_path, "a", 2, 3, [0.5, 0.9, 0.8]), trial(tmp_path, "b", 1, 2, [0.7, 0.6]),
               trial(tmp_path, "c", 1, 1, [0.4])]
    outcomes = {"a": "completed", "b": "stopped_early", "c": "stopped_early"}
    out = retain(results, outcomes, 1, lambda r: r.trial_id)
    assert left(tmp_path) == ["trial_a/checkpoint_000002"]
    assert out == {"kept": 1, "freed": 5, "bytes_kept": 100, "bytes_freed": 500}


def test_keep_top_k_and_what_resume_still_needs(tmp_path):
    results = [trial(tmp_path, "a", 2, 3, [0.5, 0.9, 0.8]), trial(tmp_path, "b", 1, 2, [0.7, 0.6]),
               trial(tmp_path, "c", 1, 2, [0.4, 0.3]), trial(tmp_path, "d", 1, 1, [0.2])]
    # b: the second best; c: still running when the sweep stopped; d: errored, retried by --resume
    outcomes = {"a": "completed", "b": "stopped_early", "d": "errored"}
    retain(results, outcomes, 2, lambda r: r.trial_id)
    assert left(tmp_path) == ["trial_a/checkpoint_000002", "trial_b/checkpoint_000001",
                              "trial_c/checkpoint_000002", "trial_d/checkpoint_000001"]


def test_keep_none_frees_every_finished_trials_checkpoints(tmp_path):
    results = [trial(tmp_path, "a", 1, 2, [0.9, 0.1])]
    out = retain(results, {"a": "completed"}, 0, lambda r: r.trial_id)
    assert left(tmp_path) == [] and out["bytes_freed"] == 200


def test_a_scratch_folder_is_removed_once_no_worker_holds_its_lock(tmp_path, monkeypatch, capsys):
    """Checkpoints pass through a folder of the worker's own under the node's cache, locked
    for the worker's life; the next worker removes the folders whose lock is free (their
    worker was killed mid-checkpoint), on this node or another sharing the cache."""
    import os
    import subprocess
    import sys
    import time

    from trainables import scratch

    monkeypatch.setenv("FTSWEEP_CACHE", str(tmp_path))
    root = tmp_path / "scratch"
    held, abandoned, starting, stale = (root / n for n in ("wheld", "wgone", "wstarting", "wstale"))
    for folder in (held, abandoned, starting, stale):
        (folder / "ckpt-x").mkdir(parents=True)
    (abandoned / scratch.LOCK).touch()
    (held / scratch.LOCK).touch()
    old = time.time() - 2 * scratch.UNLOCKED_GRACE_S
    os.utime(stale, (old, old))
    lock_it = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
               "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", lock_it, str(held / scratch.LOCK)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        mine = scratch.scratch_dir()
        assert sorted(p.name for p in root.iterdir()) == sorted(["wheld", "wstarting", mine.name])
        assert scratch.scratch_dir() == mine  # one folder per process
        probe = subprocess.run([sys.executable, "-c", lock_it.replace("LOCK_EX)", "LOCK_EX | fcntl.LOCK_NB)"),
                                str(mine / scratch.LOCK)], capture_output=True, text=True, timeout=60)
        assert probe.returncode != 0 and "BlockingIOError" in probe.stderr  # ours is held
    finally:
        holder.kill()
        holder.wait()
    assert scratch.remove_abandoned(root) == [held]  # its worker is gone now


def test_an_unwritable_cache_sends_checkpoints_through_the_system_temp_folder(tmp_path, monkeypatch, capsys):
    from trainables import scratch

    (tmp_path / "file").write_text("")
    monkeypatch.setenv("FTSWEEP_CACHE", str(tmp_path / "file"))
    assert scratch.scratch_dir() is None
    assert f"cannot use {tmp_path / 'file' / 'scratch'}" in capsys.readouterr().err
