"""The only place a trial meets Ray: report through ``tune.report``, resume from
``tune.get_checkpoint()``, take the thread count from the CPUs Ray assigned, and keep
the decoded images in the cache folder of the node the trial runs on."""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import ray
from ray import tune

from trainables import node_cache
from trainables.data import DataHandle
from trainables.scratch import scratch_dir


def trainable(config: dict, data: DataHandle) -> None:
    # Here, not at the top: the driver hands ``trainable`` to Ray Tune without importing
    # torch; Ray's prestarted workers have imported it already (sweeps.tune.ray_session).
    from trainables.train import CHECKPOINT_FILE, run_trial

    started_at = time.time()
    resources = ray.get_runtime_context().get_assigned_resources()
    threads = max(1, int(resources.get("CPU", 1)))
    # The driver's cache folder is a path on the driver's node. A trial uses its own
    # node's ($FTSWEEP_CACHE as this node's Ray or the job's environment sets it), where
    # the first trial on the node decodes the images once for every later one.
    data = replace(data, cache_dir=str(node_cache.cache_root() / "decoded"))
    scratch = scratch_dir()

    def report(metrics: dict, checkpoint_dir: Path | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        # Wall clock of the trial's start and of this report: when each trial ran, to the
        # sub-second (Ray's own ``timestamp`` is whole seconds).
        tune.report({**metrics, "started_at": started_at, "reported_at": time.time()}, checkpoint=checkpoint)

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        run_trial(config, data, report, threads=threads, scratch=scratch)
        return
    # Copy the file out: the checkpoint may live on remote storage.
    with tempfile.TemporaryDirectory(prefix="resume-", dir=scratch) as tmp, checkpoint.as_directory() as src:
        resume = Path(tmp) / CHECKPOINT_FILE
        shutil.copy(Path(src) / CHECKPOINT_FILE, resume)
        run_trial(config, data, report, resume_from=resume, threads=threads, scratch=scratch)
