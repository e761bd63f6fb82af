"""Start Ray on this machine, or join a cluster: the driver's first heavy step, kept
apart from the Ray Tune wiring (``sweeps/tune/driver.py``) so that it can begin while the
sweep's other modules (torch, torchvision, MLflow, Ray Tune) are still being imported."""

from __future__ import annotations

import os

import ray

# What a trial's worker imports before it trains: Ray Tune, torch, torchvision
# (trainables.ray_trial imports trainables.train only when the trial starts).
TRIAL_MODULES = ("trainables.ray_trial", "trainables.train")


def init_ray(address: str | None, num_cpus: int | None = None, lanes: int | None = None) -> None:
    """Join ``address`` (inside a Ray job, $RAY_ADDRESS) or start Ray on this machine,
    declaring ``num_cpus`` CPUs (default: the machine's).

    With ``lanes`` (trials that will run at once), a local Ray prestarts that many workers,
    which import the trial's modules while the driver still checks the data and opens the
    sweep's MLflow run; the first trials' actors then start on workers ready to train.
    """
    if ray.is_initialized():
        return
    # The table of trials is the progress display; Tune's per-result boxes and snapshot
    # warnings drown it. Worker logs stay in Ray's session folder.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Snapshot the experiment state (a few kB) every second instead of every 10 s, so a
    # killed driver forgets as few started trials as possible.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 _system_config=prestart(lanes, num_cpus) if lanes else {})


def prestart(lanes: int, num_cpus: int | None) -> dict:
    """Ray's settings for ``lanes`` workers ready with the trial's modules imported.

    Ray prestarts workers when the driver connects, up to ``num_workers_soft_limit``. With
    ``enable_worker_prestart`` the raylet starts them as soon as it is up instead, a second
    or more earlier, but as many as it may start at once (one per CPU it declares, at most
    one per core): only when that many trials run at once does none of them import torch in
    vain.
    """
    from ray._private.utils import get_num_cpus

    settings = {"preload_python_modules": list(TRIAL_MODULES), "num_workers_soft_limit": lanes}
    at_start = max(1, min(os.cpu_count() or 1, int(num_cpus or get_num_cpus(override_docker_cpu_warning=True))))
    if at_start <= lanes:
        settings["enable_worker_prestart"] = True
    return settings
