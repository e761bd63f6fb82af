"""The MLflow record format of a sweep, in one place: tag names, outcome names, the metric
that ranks trials, artifact paths, and the one rule that finds a sweep's parent run.

The writer (``tracking.py``) and every reader (resume, warm start, report, predict, export,
registry) use these names. Light on purpose: the checks that run before Ray starts, and
``dashboards/``, import it without MLflow's heavier parts, Ray or torch.
"""

from __future__ import annotations

import re

# Tags of a sweep's runs: one parent run per sweep, one child run per trial.
TAG_SWEEP, TAG_ROLE, TAG_TRIAL = "ftsweep.sweep", "ftsweep.role", "ftsweep.trial_id"
TAG_TRIAL_NUMBER = "ftsweep.trial_number"
TAG_OUTCOME, TAG_STOP_REASON = "outcome", "stop_reason"
# The epochs (rungs) at which a pausing scheduler paused the trial, comma-separated.
TAG_PAUSED_AT = "ftsweep.paused_at"
# What the sweep's results depend on (sweeps/plan/inputs.py), as JSON on the parent run.
TAG_INPUTS = "ftsweep.inputs"
# Tags of a registered model version (sweeps/records/registry.py).
TAG_PARENT, TAG_FINGERPRINT, TAG_VAL_ACC, TAG_VERSION_SWEEP = "parent_run_id", "dataset_fingerprint", "val_acc", "sweep"

# A checkpoint is scored by its own epoch's val_acc (METRIC). A trial is ranked everywhere
# (TPE, ASHA's rungs, the summary, the report, --warm-start) by OBJECTIVE, its best
# val_acc so far; ties go to the earlier trial.
METRIC, OBJECTIVE, MODE = "val_acc", "best_val_acc", "max"
# Metrics logged per epoch (step=epoch). sparsity and nonzero_params say how big the model
# of that epoch is (trainables/prune.py).
EPOCH_METRICS = ("val_acc", "val_loss", "train_loss", "lr", "img_per_s", "epoch_s", "best_val_acc",
                 "sparsity", "nonzero_params")

# A finished trial's outcome: it ran its own budget, ASHA, the promotion scheduler or
# patience stopped it, the sweep's --time-budget ran out while it trained, or it raised or
# diverged; or the sweep ended while it waited at a rung of a pausing scheduler.
OUTCOMES = ("completed", "stopped_early", "time_budget", "errored", "paused")
# Outcome tags of a trial whose run is still open: it trains, or waits at a rung to be resumed.
OPEN = ("running", "paused")

# Artifacts of the parent run: the best checkpoint as plain files, and as an MLflow Model.
BEST_DIR, BEST_FILES = "best", ("model.pt", "meta.json")
ARTIFACT_PATH = "model"  # runs:/<parent run id>/model

RUN_ID = re.compile(r"[0-9a-f]{32}")
SWEEP_NAME = re.compile(r"[\w.-]+")  # what --name accepts; MLflow's filters cannot escape a quote


def parent_filter(name: str) -> str:
    """The MLflow filter string that selects the parent runs of sweep ``name``."""
    return f"tags.`{TAG_SWEEP}` = '{name}' and tags.`{TAG_ROLE}` = 'parent'"


def find_parent_run(client, sweep: str, experiment_id: str | None = None):
    """The parent run of a sweep, or None. ``sweep`` is its parent run's id or its name.

    The one rule: by name, the newest parent run of that name, in ``experiment_id`` or, with
    None, in every experiment. (A driver refuses a second sweep of a name in an experiment,
    so only the same name in two experiments ever matches twice.)
    """
    from mlflow.exceptions import MlflowException

    if RUN_ID.fullmatch(sweep):
        try:
            run = client.get_run(sweep)
        except MlflowException:
            run = None  # not a run id after all: try it as a name
        if (run is not None and run.data.tags.get(TAG_ROLE) == "parent"
                and experiment_id in (None, run.info.experiment_id)):
            return run
    if not SWEEP_NAME.fullmatch(sweep):
        return None
    ids = [experiment_id] if experiment_id else experiment_ids(client)
    runs = client.search_runs(ids, parent_filter(sweep), max_results=1,
                              order_by=["attributes.start_time DESC"]) if ids else []
    return runs[0] if runs else None


def experiment_ids(client) -> list[str]:
    """Every active experiment's id, through all of MLflow's pages."""
    ids, token = [], None
    while True:
        page = client.search_experiments(page_token=token)
        ids += [e.experiment_id for e in page]
        token = page.token
        if not token:
            return ids
