"""The only place a trial meets Ray: report through ``tune.report``, resume from
``tune.get_checkpoint()``, and take the thread count from the CPUs Ray assigned."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import ray
from ray import tune

from trainables.data import DataHandle
from trainables.train import CHECKPOINT_FILE, run_trial


def trainable(config: dict, data: DataHandle) -> None:
    resources = ray.get_runtime_context().get_assigned_resources()
    threads = max(1, int(resources.get("CPU", 1)))

    def report(metrics: dict, checkpoint_dir: Path | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(metrics, checkpoint=checkpoint)

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        run_trial(config, data, report, threads=threads)
        return
    # Copy the file out: the checkpoint may live on remote storage.
    with tempfile.TemporaryDirectory(prefix="resume-") as tmp, checkpoint.as_directory() as src:
        resume = Path(tmp) / CHECKPOINT_FILE
        shutil.copy(Path(src) / CHECKPOINT_FILE, resume)
        run_trial(config, data, report, resume_from=resume, threads=threads)
