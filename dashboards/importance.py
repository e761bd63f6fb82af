"""Hyperparameter importance by Optuna's fANOVA, on an in-memory study of the finished trials.

Each trial's value is the best val_acc it reached. Trials ASHA stopped early count with
what they reached before they were stopped: that is the signal the scheduler acted on,
and leaving them out would leave few trials and only the good ones.
"""

from __future__ import annotations

import math
import warnings

import optuna
import pandas as pd
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from dashboards.frame import Searched


def distribution(p: Searched) -> BaseDistribution:
    if p.type == "choice":
        return CategoricalDistribution(p.bounds)
    if p.type == "int":
        return IntDistribution(int(p.bounds[0]), int(p.bounds[1]))
    return FloatDistribution(float(p.bounds[0]), float(p.bounds[1]), log=p.type == "loguniform")


def param_importances(trials: pd.DataFrame, searched: dict[str, Searched]) -> tuple[dict[str, float], str]:
    """({param: importance summing to 1}, a note for the reader); empty when not computable."""
    if not searched:
        return {}, "Nothing was searched in this sweep, so there is no importance to compute."
    if len(trials):
        trials = trials[(trials["outcome"] != "errored") & trials["best_val_acc"].notna()]
    dists = {name: distribution(p) for name, p in searched.items()}
    finished, skipped = [], 0
    for _, row in trials.iterrows():
        try:
            finished.append(optuna.trial.create_trial(
                params={k: _native(row[k]) for k in dists}, distributions=dists,
                value=float(row["best_val_acc"])))
        except (KeyError, ValueError):  # a value outside the logged range, e.g. a --set override
            skipped += 1
    left_out = f" ({skipped} trial(s) with values outside the searched range left out)" if skipped else ""
    if len(finished) < 2:
        return {}, f"Importance needs at least 2 scored trials; this sweep has {len(finished)}{left_out}."
    values = {t.value for t in finished}
    if len(values) == 1:
        return {}, f"All {len(finished)} trials reached the same val_acc: there is no variance to explain."
    varied = [k for k in dists if len({t.params[k] for t in finished}) > 1]
    if not varied:
        return {}, "Every trial used the same values, so importance cannot be told apart."
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    study.add_trials(finished)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a forest on a handful of trials warns; the note says so
        scores = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    if any(math.isnan(v) for v in scores.values()):
        return {}, "fANOVA could not attribute the variance of val_acc to any hyperparameter."
    constant = sorted(set(dists) - set(varied))
    note = (f"fANOVA (Optuna, 64 trees, seed 0) over {len(finished)} trials{left_out}; "
            "each value is the share of the variance in best val_acc it attributes to the parameter.")
    if constant:
        note += f" Not varied in this sweep, so 0: {', '.join(constant)}."
    if len(finished) < 10:
        note += f" With only {len(finished)} trials treat this as a hint, not a measurement."
    return {k: float(v) for k, v in sorted(scores.items(), key=lambda kv: -kv[1])}, note


def _native(value):
    """numpy scalars from a DataFrame row back to the Python types Optuna checks against."""
    return value.item() if hasattr(value, "item") else value
