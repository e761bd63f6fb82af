"""After the fit: count the trials, export the best checkpoint, write sweep_summary.json."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from sweeps.records.format import METRIC, OUTCOMES
from sweeps.records.tracking import outcome_of, redact, trial_budget, trial_id_of
from sweeps.results.storage import replace_dir


def count_trials(results, outcomes: dict[str, str] | None = None, interrupted: bool = False,
                 paused: set[str] = frozenset()) -> dict:
    """Trials by outcome: as the tracker tagged them in MLflow (``outcomes``, by trial id),
    else judged from the trial's last result against its own budget. In a sweep a signal
    stopped (``interrupted``), a trial that had not ended was cut by the signal, not by
    ASHA: it counts as ``interrupted`` (``--resume`` continues it); one waiting at a rung
    then (``paused``, the sweep state's) counts as paused."""
    counts = {**dict.fromkeys(OUTCOMES, 0), "interrupted": 0}
    for r in results:
        outcome = (outcomes or {}).get(trial_id_of(r))
        if outcome not in counts and trial_id_of(r) in paused:
            outcome = "paused"  # waiting at a rung when the sweep stopped: --resume goes on from there
        if outcome not in counts:  # not ended through the tracker (or tagged abandoned)
            outcome = ("interrupted" if interrupted and r.error is None
                       else outcome_of(r.metrics or {}, r.error is not None, trial_budget(r.config)))
        counts[outcome] += 1
    return counts


def total_epochs(results) -> int:
    return sum(int((r.metrics or {}).get("epoch", 0)) for r in results)


def anytime_curve(results, origin: float) -> list[list[float]]:
    """The sweep's best val_acc so far against wall-clock seconds since ``origin`` (when the
    command started): one ``[t, best]`` point each time the best improved. Results from
    before ``origin`` (a resumed sweep's earlier drivers) count from t = 0."""
    reports = []
    for r in results:
        frame = r.metrics_dataframe
        if frame is None or not {"reported_at", METRIC} <= set(frame.columns):
            continue
        rows = frame.dropna(subset=["reported_at", METRIC])
        reports += zip(rows["reported_at"].astype(float), rows[METRIC].astype(float), strict=True)
    points, best = [], None
    for at, value in sorted(reports):
        if best is None or value > best:
            best = value
            points.append([round(max(0.0, at - origin), 2), value])
    return points


def ranked_checkpoints(results) -> list:
    """Every kept checkpoint as (result, epoch metrics, checkpoint), best val_acc first; the
    sort is stable, so of tied ones the earlier trial's goes first."""
    kept = [(r, metrics, ckpt) for r in results for ckpt, metrics in r.best_checkpoints or [] if METRIC in metrics]
    return sorted(kept, key=lambda k: -k[1][METRIC])


def export_readable_best(results, out_dir: Path, log=print):
    """Export the best checkpoint that can be read (``export_best``); a damaged one is named
    and passed over for the next best. Returns its (result, metrics, checkpoint), or None."""
    for result, metrics, checkpoint in ranked_checkpoints(results):
        try:
            export_best(checkpoint, out_dir)
            return result, metrics, checkpoint
        except Exception as e:  # noqa: BLE001 - torch.load of a damaged file raises many types
            log(f"WARNING: checkpoint {checkpoint.path} (val_acc {metrics[METRIC]:.4f}) cannot be read "
                f"({type(e).__name__}: {str(e)[:200]}); taking the next best")
    return None


def export_best(checkpoint, out_dir: Path) -> dict:
    """Write ``best/model.pt`` (a plain torchvision state_dict) and ``best/meta.json``,
    by renames (``storage.replace_dir``): never half of one pair and half of the other."""
    import torch  # here, not at the top: the driver starts its trials without importing torch

    with checkpoint.as_directory() as src:
        ckpt = torch.load(Path(src) / "checkpoint.pt", map_location="cpu", weights_only=True)
    meta = {"model": ckpt["config"]["model"], "classes": ckpt["classes"],
            "image_size": ckpt["image_size"], "mean": ckpt["mean"], "std": ckpt["std"],
            "config": ckpt["config"], "val_acc": ckpt["state"]["best_val_acc"],
            "epoch": ckpt["state"]["epoch"]}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".best-"))
    torch.save(ckpt["model"], tmp / "model.pt")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    replace_dir(tmp, out_dir)
    return meta


def checkpoint_bytes(sweep_dir: Path) -> int:
    return sum(f.stat().st_size for f in sweep_dir.glob("*/checkpoint_*/**/*") if f.is_file())


def build_summary(plan, tracker, results, wall_s: float, best, best_dir, pending: list) -> dict:
    summary = {
        "name": plan.name, "space": plan.space.name, "tracking_uri": redact(plan.tracking_uri),
        "experiment_id": tracker.experiment_id, "parent_run_id": tracker.parent_id,
        "trials": count_trials(results, getattr(tracker, "outcomes", None)), "wall_s": round(wall_s, 2),
        "total_trial_epochs": total_epochs(results),
        # best val_acc so far against seconds since the command started, [[t, best], ...]
        "anytime": anytime_curve(results, time.time() - wall_s),
        "best": None, "sweep_dir": plan.sweep_dir, "model": plan.space.config().model,
        "dataset": plan.dataset_label, "unlogged_mlflow_writes": len(pending),
        # how long the end of the sweep waited for the MLflow writer to catch up
        "mlflow_wait_s": round(getattr(tracker.write, "wait_s", 0.0), 2),
        # when MLflow held every write (or they were spooled), in epoch seconds
        "mlflow_done_at": round(getattr(tracker.write, "done_at", 0.0) or time.time(), 3),
    }
    if plan.is_local:
        summary["checkpoint_bytes"] = checkpoint_bytes(Path(plan.sweep_dir))
    if best is not None:
        result, metrics, _ = best
        summary["best"] = {
            "config": {k: result.config[k] for k in sorted(result.config)},
            "val_acc": metrics[METRIC], "epoch": int(metrics["epoch"]),
            "run_id": tracker.run_id(trial_id_of(result)),
            "checkpoint": str(best_dir / "model.pt"),
        }
    if plan.max_acc_drop is not None:
        summary["smallest_within_drop"] = smallest_entry(size_candidates(results), plan.max_acc_drop,
                                                         tracker.run_id)
    return summary


def size_candidates(results) -> list[dict]:
    """Every epoch of every trial as a model: its val_acc and its size (``nonzero_params``)."""
    out = []
    for r in results:
        frame = r.metrics_dataframe
        if frame is None or not {"epoch", "val_acc", "nonzero_params"} <= set(frame.columns):
            continue
        sparsity = frame["sparsity"] if "sparsity" in frame else 0.0
        rows = frame.assign(sparsity=sparsity).dropna(subset=["val_acc", "nonzero_params"])
        out += [{"trial_id": trial_id_of(r), "epoch": int(row.epoch), "val_acc": float(row.val_acc),
                 "nonzero_params": int(row.nonzero_params), "sparsity": float(row.sparsity),
                 "config": {k: r.config[k] for k in sorted(r.config)}}
                for row in rows.itertuples()]
    return out


def smallest_within_drop(candidates: list[dict], drop: float) -> dict | None:
    """The candidate with the fewest nonzero parameters whose val_acc is at most ``drop``
    below the best candidate's; ties go to the higher val_acc, then the earlier epoch.

    A candidate is one model: a trial at one epoch, so its val_acc was measured on the
    weights it is counted by (a pruning trial's dense epochs are candidates too).
    """
    if not candidates:
        return None
    floor = max(c["val_acc"] for c in candidates) - drop - 1e-12  # 1e-12: float noise, not a margin
    within = [c for c in candidates if c["val_acc"] >= floor]
    return min(within, key=lambda c: (c["nonzero_params"], -c["val_acc"], c["epoch"]))


def smallest_entry(candidates: list[dict], drop: float, run_id) -> dict | None:
    """The ``smallest_within_drop`` entry of sweep_summary.json; ``run_id`` maps a trial id
    to its MLflow run."""
    pick = smallest_within_drop(candidates, drop)
    if pick is None:
        return None
    best = smallest_within_drop(candidates, 0.0)
    return {"max_acc_drop": drop, "best_val_acc": best["val_acc"],
            "best_nonzero_params": best["nonzero_params"], "val_acc": pick["val_acc"],
            "epoch": pick["epoch"], "nonzero_params": pick["nonzero_params"],
            "sparsity": pick["sparsity"], "run_id": run_id(pick["trial_id"]), "config": pick["config"]}


def write_summary(summary: dict, sweep_dir: Path) -> Path:
    path = sweep_dir / "sweep_summary.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    os.replace(tmp, path)
    return path
