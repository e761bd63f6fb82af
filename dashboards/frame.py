"""Read a sweep back from MLflow: one pandas row per trial, plus every trial's val_acc curve.

Everything comes from what ``sweeps/records/tracking.py`` wrote (the parent run's tags and
``search.<key>`` params, the child runs' params, tags, times and per-epoch metrics), so a
report can be made anywhere the tracking server can be reached, long after the sweep.
"""

from __future__ import annotations

import ast
import time
from dataclasses import dataclass

import pandas as pd
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NOTE

from sweeps.records import format
from sweeps.records.format import OUTCOMES as FINISHED_OUTCOMES
from sweeps.records.format import TAG_ROLE, TAG_SWEEP, TAG_TRIAL
from trainables.config import TrialConfig, coerce

OUTCOMES = (*FINISHED_OUTCOMES, "running")
SEED_RECIPE = "seed_recipe"


class SweepNotFound(LookupError):
    """No sweep parent run matches --sweep; the message lists the sweeps that exist."""


@dataclass(frozen=True)
class Searched:
    """One searched hyperparameter, as the parent run's ``search.<key>`` param states it."""

    name: str
    type: str  # uniform | loguniform | int | choice
    bounds: list  # [low, high], or the choices

    @classmethod
    def parse(cls, name: str, text: str) -> Searched:
        kind, _, rest = text.partition("[")
        return cls(name, kind, list(ast.literal_eval("[" + rest)))


@dataclass
class Sweep:
    parent: Run
    trials: pd.DataFrame  # one row per trial, sorted by trial number
    curves: pd.DataFrame  # long form: trial, epoch, val_acc, time (s since the sweep started)
    searched: dict[str, Searched]
    seed_recipe: Sweep | None = None

    @property
    def name(self) -> str:
        return self.parent.data.tags.get(TAG_SWEEP, self.parent.info.run_name)

    def tag(self, key: str, default: str = "") -> str:
        return self.parent.data.tags.get(key, default)

    @property
    def description(self) -> str:
        return self.tag(MLFLOW_RUN_NOTE)

    @property
    def started(self) -> pd.Timestamp:
        return _ts(self.parent.info.start_time)

    @property
    def wall_s(self) -> float:
        """The sweep's wall time; up to now while its parent run is still open."""
        end = self.parent.info.end_time or time.time() * 1000
        return (end - self.parent.info.start_time) / 1000

    def anytime(self) -> pd.DataFrame:
        """The sweep's best val_acc so far against seconds since its parent run started: one
        row (time_s, best) each time the best improved."""
        curves = self.curves.sort_values("time_s", kind="stable")
        best = curves["val_acc"].cummax()
        improved = best > best.shift(fill_value=float("-inf"))
        return pd.DataFrame({"time_s": curves["time_s"][improved].to_numpy(),
                             "best": best[improved].to_numpy()})

    def counts(self) -> dict[str, int]:
        found = self.trials["outcome"].value_counts() if len(self.trials) else {}
        # running, time_budget and paused are shown only where a trial has them
        return {o: int(found.get(o, 0)) for o in OUTCOMES
                if o not in ("running", "time_budget", "paused") or found.get(o, 0)}

    def best(self) -> pd.Series | None:
        """The trial with the highest val_acc of any epoch (ties: the earlier trial)."""
        scored = self.trials.dropna(subset=["best_val_acc"])
        return None if scored.empty else scored.loc[scored["best_val_acc"].idxmax()]


def load_sweep(client: MlflowClient, sweep: str, with_seed_recipe: bool = True) -> Sweep:
    """The sweep named ``sweep`` (or whose parent run id it is), read into DataFrames."""
    parent = find_parent(client, sweep)
    children = _search(client, parent.info.experiment_id,
                       f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.info.run_id}' "
                       f"and tags.`{TAG_ROLE}` = 'trial'")
    origin = parent.info.start_time
    histories = {r.info.run_id: val_acc_history(client, r.info.run_id, origin) for r in children}
    trials = trial_frame(children, histories, origin)
    curves = [histories[r].assign(trial=n) for n, r in zip(trials["trial"], trials["run_id"], strict=True)]
    curves = pd.concat([_empty_curves(), *[c for c in curves if len(c)]], ignore_index=True)
    searched = {k.removeprefix("search."): Searched.parse(k.removeprefix("search."), v)
                for k, v in parent.data.params.items() if k.startswith("search.")}
    result = Sweep(parent, trials, curves[["trial", "epoch", "val_acc", "time_s"]], searched)
    if with_seed_recipe and parent.data.tags.get("space") != SEED_RECIPE:
        recipe = find_seed_recipe(client, parent)
        if recipe is not None:
            result.seed_recipe = load_sweep(client, recipe.info.run_id, with_seed_recipe=False)
    return result


def find_parent(client: MlflowClient, sweep: str) -> Run:
    if not (format.RUN_ID.fullmatch(sweep) or format.SWEEP_NAME.fullmatch(sweep)):
        raise SweepNotFound(f"--sweep {sweep!r} is neither a sweep name nor a parent run id")
    found = format.find_parent_run(client, sweep)
    if found is not None:
        return found
    known = _search(client, format.experiment_ids(client), f"tags.`{TAG_ROLE}` = 'parent'", limit=20)
    names = ", ".join(r.data.tags.get(TAG_SWEEP, "?") for r in known) or "none"
    raise SweepNotFound(f"no sweep {sweep!r} in {client.tracking_uri}; newest sweeps there: {names}")


def find_seed_recipe(client: MlflowClient, parent: Run) -> Run | None:
    """The newest seed_recipe run in the sweep's experiment, preferring one on the same
    data and model: a comparison across datasets says nothing."""
    runs = _search(client, parent.info.experiment_id,
                   f"tags.`{TAG_ROLE}` = 'parent' and tags.space = '{SEED_RECIPE}'")
    tags = parent.data.tags

    def same(run: Run) -> tuple[bool, bool]:
        t = run.data.tags
        return (t.get("dataset_fingerprint") == tags.get("dataset_fingerprint"),
                t.get("model") == tags.get("model"))

    runs = [r for r in runs if r.info.run_id != parent.info.run_id]
    return max(runs, key=same, default=None)  # max keeps the first (newest) of equals


def val_acc_history(client: MlflowClient, run_id: str, origin_ms: int) -> pd.DataFrame:
    """val_acc per epoch; a resumed trial may log an epoch twice, the last one counts."""
    hist = client.get_metric_history(run_id, "val_acc")
    frame = pd.DataFrame({"epoch": [m.step for m in hist], "val_acc": [m.value for m in hist],
                          "time_s": [(m.timestamp - origin_ms) / 1000 for m in hist]})
    if frame.empty:
        return _empty_curves().drop(columns="trial")
    frame = frame.sort_values("time_s").drop_duplicates("epoch", keep="last")
    return frame.sort_values("epoch").reset_index(drop=True)


def trial_frame(children: list[Run], histories: dict[str, pd.DataFrame], origin_ms: int) -> pd.DataFrame:
    rows = [_trial_row(run, histories[run.info.run_id], origin_ms) for run in children]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=["trial", "run_name", "outcome", "epochs", "best_val_acc", "run_id"])
    return frame.sort_values("trial").reset_index(drop=True)


def best_epoch(curve: pd.DataFrame) -> pd.Series | None:
    """A trial's best epoch: the highest val_acc and, of tied epochs, the latest (the one whose
    checkpoint Ray Tune keeps, and the sweep exports)."""
    if not len(curve):
        return None
    ordered = curve.sort_values("epoch")
    return ordered[ordered["val_acc"] == ordered["val_acc"].max()].iloc[-1]


def _trial_row(run: Run, curve: pd.DataFrame, origin_ms: int) -> dict:
    info, tags = run.info, run.data.tags
    outcome = tags.get("outcome", "running")
    if outcome == "running" and info.status in ("FINISHED", "FAILED", "KILLED"):
        outcome = "errored" if info.status != "FINISHED" else "completed"  # closed without a verdict
    best = best_epoch(curve)
    end_ms = info.end_time or time.time() * 1000
    row = {
        "trial": int(tags.get("ftsweep.trial_number", 0)), "run_name": info.run_name,
        "outcome": outcome, "stop_reason": tags.get("stop_reason", ""),
        "epochs": int(curve["epoch"].max()) if len(curve) else 0,
        "best_val_acc": float(best["val_acc"]) if best is not None else float("nan"),
        "best_epoch": int(best["epoch"]) if best is not None else 0,
        **{f"final_{k}": v for k, v in sorted(run.data.metrics.items())},
        "start": _ts(info.start_time), "end": _ts(info.end_time) if info.end_time else pd.NaT,
        "start_s": (info.start_time - origin_ms) / 1000, "end_s": (end_ms - origin_ms) / 1000,
        "duration_s": (end_ms - info.start_time) / 1000,
    }
    row.update(config_params(run.data.params))
    row.update(run_id=info.run_id, trial_id=tags.get(TAG_TRIAL, ""), error=tags.get("error", ""))
    return row


def config_params(params: dict[str, str]) -> dict:
    """The trial config back in its own types (MLflow keeps params as strings)."""
    known, out = TrialConfig.keys(), {}
    for key, text in sorted(params.items(), key=lambda kv: (kv[0] not in known, kv[0])):
        try:
            out[key] = coerce(key, text) if key in known else text
        except ValueError:
            out[key] = text
    return out


def _search(client: MlflowClient, experiments, filter_string: str, limit: int | None = None) -> list[Run]:
    """Every matching run, newest first, across result pages."""
    ids = [experiments] if isinstance(experiments, str) else list(experiments)
    runs, token = [], None
    while True:
        page = client.search_runs(ids, filter_string, max_results=min(limit or 1000, 1000),
                                  order_by=["attributes.start_time DESC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token or (limit and len(runs) >= limit):
            return runs[:limit] if limit else runs


def _ts(ms: int) -> pd.Timestamp:
    return pd.Timestamp(ms, unit="ms", tz="UTC")


def _empty_curves() -> pd.DataFrame:
    return pd.DataFrame({"trial": pd.Series(dtype=int), "epoch": pd.Series(dtype=int),
                         "val_acc": pd.Series(dtype=float), "time_s": pd.Series(dtype=float)})
