"""After a sweep: keep the checkpoints that can still matter, free the disk of the rest.

While a sweep runs, every trial keeps its best checkpoint and its latest (Ray Tune's
``CheckpointConfig``): the latest to resume from, the best to export. Once the fit has
returned, most of them can never be used again: a finished trial is not run again by
``--resume``, and the sweep's best model is exported to ``best/`` and to MLflow. What is
kept:

- the best checkpoint of the ``keep_top`` trials with the highest best val_acc
  (``--keep-checkpoints``, default 1: the best trial's);
- the latest checkpoint of every trial a ``--resume`` would run again: one that had not
  ended when the sweep stopped (it was running or waiting), and one that errored
  (``--resume`` retries errored trials from their latest checkpoint).

Every other ``checkpoint_*`` folder of the sweep's trials is deleted, through the same
pyarrow filesystem Ray Tune wrote it with (a local folder, ``s3://``, ``gs://``).
"""

from __future__ import annotations

from pathlib import PurePosixPath

import pyarrow.fs as pafs

from sweeps.records.format import METRIC


def retain(results, outcomes: dict[str, str], keep_top: int, trial_id_of) -> dict:
    """Delete the checkpoints no one can use any more; returns what was kept and freed:
    ``{"kept": n, "freed": n, "bytes_kept": b, "bytes_freed": b}``.

    ``outcomes`` maps the trials that ended to their outcome (``SweepTracker.outcomes``);
    ``trial_id_of`` gives a result's trial id.
    """
    scored = [(best_val_acc(r), r) for r in results]
    ranked = sorted((s for s in scored if s[0] is not None), key=lambda s: -s[0])
    keep: set[str] = set()
    for _, r in ranked[:max(keep_top, 0)]:
        keep.add(_path(max(r.best_checkpoints, key=lambda c: c[1][METRIC])[0]))
    for r in results:
        outcome = outcomes.get(trial_id_of(r))
        if r.checkpoint is not None and (outcome is None or outcome == "errored"):
            keep.add(_path(r.checkpoint))  # --resume continues or retries it from here
    out = {"kept": 0, "freed": 0, "bytes_kept": 0, "bytes_freed": 0}
    for r in results:
        fs = r.filesystem
        for folder in _checkpoint_folders(fs, r.path):
            size = _bytes(fs, folder)
            if _norm(folder) in keep:
                out["kept"] += 1
                out["bytes_kept"] += size
            else:
                fs.delete_dir(folder)
                out["freed"] += 1
                out["bytes_freed"] += size
    return out


def best_val_acc(result) -> float | None:
    scores = [m[METRIC] for _, m in result.best_checkpoints or [] if METRIC in m]
    return max(scores) if scores else None


def _path(checkpoint) -> str:
    return _norm(checkpoint.path)


def _norm(path: str) -> str:
    return str(PurePosixPath(path))


def _checkpoint_folders(fs: pafs.FileSystem, trial_dir: str) -> list[str]:
    try:
        infos = fs.get_file_info(pafs.FileSelector(trial_dir, allow_not_found=True))
    except OSError:
        return []
    return sorted(i.path for i in infos
                  if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))


def _bytes(fs: pafs.FileSystem, folder: str) -> int:
    infos = fs.get_file_info(pafs.FileSelector(folder, recursive=True))
    return sum(i.size or 0 for i in infos if i.type == pafs.FileType.File)
