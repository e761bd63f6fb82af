"""``--warm-start SWEEP``: an earlier sweep's finished trials become TPE's starting history.

The earlier sweep is read back from MLflow (``dashboards/frame.py``): each finished child
run gives a point (its values of the keys this sweep searches) and a reward (its best
val_acc, the max of its val_acc history). ``OptunaSearch`` adds them to its study as
completed trials, through ``points_to_evaluate`` + ``evaluated_rewards``, before the first
new trial is sampled; they are not run again, and their runs stay where they are, in the
earlier sweep. TPE's ``n_startup_trials`` counts them, so with enough of them the new
sweep samples from TPE's model straight away.

A point must lie inside this sweep's search space (Optuna rejects any other); trials
outside it are skipped, and so are trials that errored or never reported a val_acc. Each
skip is reported, and so are the fixed settings the earlier trials ran with that differ
from this sweep's: their val_acc measured something else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

# ASHA's early stop, or the time budget's, is a result, as it is for TPE inside a sweep
# (Tune tells the searcher the trial's last result either way); an errored trial is not.
FINISHED = ("completed", "stopped_early", "time_budget")
SHOWN = 5  # skipped trials listed by name; the rest are counted


@dataclass(frozen=True)
class WarmStart:
    parent_run_id: str  # the earlier sweep's parent run
    sweep: str  # its name
    points: list[dict] = field(default_factory=list)  # searched key -> value, one per trial
    rewards: list[float] = field(default_factory=list)  # best val_acc, same order


def earlier_trials(tracking_uri: str, ref: str, space, fingerprint: str | None = None,
                   log=print) -> WarmStart:
    """The finished trials of sweep ``ref`` (a name or parent run id) that fit ``space``.

    Raises ``dashboards.frame.SweepNotFound`` (naming the sweeps there are) when there is
    no such sweep.
    """
    from mlflow.tracking import MlflowClient

    from dashboards.frame import load_sweep

    earlier = load_sweep(MlflowClient(tracking_uri), ref, with_seed_recipe=False)
    points, rewards, skipped = [], [], []
    for _, trial in earlier.trials.iterrows():
        why = _unusable(trial, space)
        if why:
            skipped.append(f"trial {trial['trial']}: {why}")
            continue
        points.append({k: _native(trial[k]) for k in space.search})
        rewards.append(float(trial["best_val_acc"]))
    start = WarmStart(earlier.parent.info.run_id, earlier.name, points, rewards)
    log(f"Warm start from sweep {start.sweep} (MLflow run {start.parent_run_id}): {len(points)} of its "
        f"{len(earlier.trials)} trials go into TPE's history")
    if skipped:
        more = f"; and {len(skipped) - SHOWN} more" if len(skipped) > SHOWN else ""
        log(f"  skipped {len(skipped)}: {'; '.join(skipped[:SHOWN])}{more}")
    for note in _differences(earlier, space, fingerprint):
        log(f"  note: {note}")
    return start


def _unusable(trial: pd.Series, space) -> str:
    """Why a trial cannot join this sweep's history, or '' when it can."""
    if trial["outcome"] not in FINISHED:
        return f"outcome {trial['outcome']}"
    if pd.isna(trial["best_val_acc"]):
        return "no val_acc"
    for key, param in space.search.items():
        if key not in trial or pd.isna(trial[key]):
            return f"no {key} param"
        value = _native(trial[key])
        if param.type == "choice":
            inside = value in param.values
        else:
            inside = param.low <= value <= param.high
        if not inside:
            return f"{key}={value!r} is outside this sweep's {param.type} {param.bounds()}"
    return ""


def _native(value):
    """A plain Python value (pandas hands out numpy scalars), as Optuna's checks expect."""
    return value.item() if hasattr(value, "item") else value


def _differences(earlier, space, fingerprint: str | None) -> list[str]:
    """The earlier trials' fixed settings that differ from this sweep's."""
    notes = []
    if fingerprint and earlier.tag("dataset_fingerprint") not in ("", fingerprint):
        notes.append("the earlier sweep ran on other data (another dataset fingerprint)")
    current = space.config().to_dict()
    trials = earlier.trials
    for key, value in current.items():
        if key in space.search or key not in trials:
            continue
        seen = sorted({str(_native(v)) for v in trials[key].dropna()})
        if seen and seen != [str(value)]:
            notes.append(f"its trials ran with {key}={' / '.join(seen)}, this sweep fixes {key}={value}")
    return notes
