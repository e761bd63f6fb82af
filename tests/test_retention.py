"""What a finished sweep keeps of its checkpoints: the best trials' best, and what --resume needs."""

from types import SimpleNamespace

import pyarrow.fs as pafs

from sweeps.retention import retain


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


def test_a_trials_scratch_folder_outlives_only_its_worker(tmp_path, monkeypatch):
    """Checkpoints pass through a folder of the worker's own under the node's cache; the
    folders of workers that no longer exist (killed mid-checkpoint) go, live ones stay."""
    import os
    import subprocess

    from trainables.ray_trial import scratch_dir

    monkeypatch.setenv("FTSWEEP_CACHE", str(tmp_path))
    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / "scratch" / str(gone.pid) / "ckpt-a").mkdir(parents=True)
    (tmp_path / "scratch" / str(os.getppid()) / "ckpt-b").mkdir(parents=True)  # a live worker's
    (tmp_path / "scratch" / "notes").mkdir()  # not a worker's: left alone
    mine = scratch_dir()
    assert mine == tmp_path / "scratch" / str(os.getpid()) and mine.is_dir()
    assert sorted(p.name for p in (tmp_path / "scratch").iterdir()) == sorted(
        [str(os.getppid()), str(os.getpid()), "notes"])
