"""Run a fine-tuning sweep: ``python sweeps/run.py --space lr_decay [--data DIR] ...``.

Parse, check every input, start the sweep's MLflow run, fit the Tuner, export the best
checkpoint, write ``sweep_summary.json`` and print its path last.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweeps.cli import build_parser  # noqa: E402
from sweeps.plan import UsageError, prepare  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.time()
    try:
        plan = prepare(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from sweeps import driver, summary
    from sweeps.tracking import MlflowTrials, SweepTracker

    sweep_dir = Path(plan.sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    plan.data.ensure()  # decode once, here, before any trial starts
    tracker = SweepTracker(plan, spool_dir=sweep_dir)
    print(f"Sweep {plan.name}: space {plan.space.name}, {plan.trials} trials, "
          f"{len(plan.data.dataset)} images in {len(plan.data.classes)} classes; "
          f"MLflow run {tracker.parent_id} in experiment {plan.experiment}")

    driver.init_ray(plan.ray_address)
    callback = MlflowTrials(tracker, plan.space.config().total_epochs)
    results = driver.build_tuner(plan, [callback]).fit()

    best = summary.best_trial(results)
    best_dir = sweep_dir / "best"
    if best is not None:
        summary.export_best(best[2], best_dir, plan)
    counts = summary.count_trials(results, plan.space.config().total_epochs)
    pending = tracker.finish(best_dir if best else None,
                             {"best_val_acc": best[1]["val_acc"] if best else 0.0, **counts},
                             failed=best is None)
    info = summary.build_summary(plan, tracker, results, time.time() - started, best, best_dir, pending)
    path = summary.write_summary(info, sweep_dir)
    _print_end(info, tracker, pending)
    print(path)
    return 0 if best is not None else 1


def _print_end(info: dict, tracker, pending: list) -> None:
    t = info["trials"]
    print(f"\nTrials: {t['completed']} completed, {t['stopped_early']} stopped early, "
          f"{t['errored']} errored in {info['wall_s']:.0f} s")
    best = info["best"]
    if best:
        searched = {k: best["config"][k] for k in tracker.plan.space.search}
        print(f"Best: val_acc {best['val_acc']:.4f} at epoch {best['epoch']} with {searched}")
        print(f"Best checkpoint: {best['checkpoint']} (MLflow run {info['parent_run_id']}, best/)")
    else:
        print("No trial produced a result.")
    if pending:
        print(f"WARNING: {len(pending)} MLflow writes could not be sent "
              f"({tracker.write.last_error}); kept in {tracker.write.spool}")


if __name__ == "__main__":
    sys.exit(main())
