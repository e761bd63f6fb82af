"""Run a fine-tuning sweep: ``python sweeps/run.py --space lr_decay [--data DIR] ...``.

Parse, check every input, start the sweep's MLflow run, fit the Tuner, export the best
checkpoint, write ``sweep_summary.json`` and print its path last.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweeps.cli import build_parser  # noqa: E402
from sweeps.errors import UsageError  # noqa: E402
from sweeps.plan.prepare import prepare  # noqa: E402
from sweeps.results import storage  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.time()
    try:
        plan, opened = plan_and_join_ray(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("INTERRUPTED (Ctrl-C) before the sweep started", file=sys.stderr)
        return 128 + signal.SIGINT
    from sweeps.tune.signals import Terminated

    try:
        info = execute(plan, started, opened=opened)
    except (KeyboardInterrupt, Terminated) as e:
        how = "SIGTERM" if isinstance(e, Terminated) else "Ctrl-C"
        print(f"INTERRUPTED ({how}); {_notes(e)}. To finish the sweep, {resume_hint(plan)}", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
    except Exception as e:  # noqa: BLE001 - said in a line; the parent run says FAILED, with it
        print(f"error: the sweep failed: {type(e).__name__}: {e}; {_notes(e)}. To finish it, {resume_hint(plan)}",
              file=sys.stderr)
        return 1
    if info["best"] is not None and not info.get("interrupted"):
        print("\n".join(next_steps(plan.name, info["tracking_uri"], info["experiment_id"])), file=sys.stderr)
        sys.stderr.flush()
    print(storage.join(plan.sweep_dir, "sweep_summary.json"))  # last: scripts read the summary's path here
    if info.get("interrupted"):  # a stopped sweep is not a finished one: 130 for Ctrl-C, 143 for SIGTERM
        return 128 + signal.Signals[info["interrupted"]["signal"]].value
    return 0 if info["best"] is not None else 1


def _notes(e: BaseException) -> str:
    """What ``execute`` added to a fault: how the sweep's MLflow run ended."""
    return "; ".join(getattr(e, "__notes__", []))


def plan_and_join_ray(args):
    """The checked plan, with Ray joined; on one machine also the sweep's opened MLflow run
    (else None: ``execute`` opens it).

    On one machine the start-up overlaps. Once the quick checks have passed (the space,
    flags, model name, resources, tracking server), Ray starts in the main thread, where it
    sets its signal handlers; meanwhile a helper thread runs the slower checks (scanning
    and decoding the data, building the model) and opens the sweep's MLflow run. When a
    slower check fails, Ray is shut down again and nothing was logged. On a cluster every
    check comes first, then Ray: nothing is logged when a node cannot see the storage or
    fit a trial.
    """
    if args.ray_address or os.environ.get("RAY_ADDRESS"):
        plan = prepare(args)
        check_cluster(plan)
        return plan, open_sweep(plan)
    from concurrent.futures import ThreadPoolExecutor

    import ray

    from sweeps.tune.ray_session import init_ray

    quick_checks_done, cancelled = threading.Event(), threading.Event()

    def plan_and_open():
        try:
            plan = prepare(args, checked=quick_checks_done.set)
        finally:
            quick_checks_done.set()  # a failed check ends them too
        if cancelled.is_set():  # Ctrl-C, or Ray could not start: open nothing
            raise UsageError("the sweep was cancelled before it started")
        return plan, open_sweep(plan)

    pool = ThreadPoolExecutor(1, thread_name_prefix="prepare")
    planning = pool.submit(plan_and_open)
    try:
        quick_checks_done.wait()
        if planning.done() and planning.exception() is not None:
            planning.result()  # raises the check's error: Ray never started
        init_ray(None, lanes=_lanes(args))
        return planning.result()
    except BaseException:
        cancelled.set()
        pool.shutdown(wait=True)  # the helper ends its check, and then opens nothing
        if planning.done() and planning.exception() is None:  # it had opened the sweep already
            folder, tracker = planning.result()[1]
            with contextlib.suppress(Exception):
                tracker.finish(None, {}, failed=True)
            folder.close()
        if ray.is_initialized():
            ray.shutdown()
        raise
    finally:
        pool.shutdown(wait=False)


def _lanes(args) -> int:
    """Trials this machine runs at once as its CPUs allow, at most --max-concurrent and
    --trials (GPUs are counted later: this only sizes the workers Ray prestarts)."""
    from ray._private.utils import get_num_cpus  # the CPUs a local Ray declares

    fit = max(1, int(get_num_cpus() // args.cpus_per_trial))
    return min(fit, args.max_concurrent or fit, args.trials or fit)


def open_sweep(plan):
    """The sweep's folder (``storage.SweepFolder``) and its MLflow parent run (``SweepTracker``)."""
    from sweeps.records.tracking import SweepTracker

    try:  # the name is claimed here, atomically: a second driver of this sweep stops now
        folder = storage.SweepFolder(plan.sweep_dir, resume=plan.resume)
    except storage.SweepTaken as e:
        raise UsageError(f"--name {plan.name}: {e}. Wait for it, or pass another --name") from None
    if folder.remote and not plan.resume:  # the scratch lock is per machine: ask MLflow again
        _check_still_new(plan)
    return folder, SweepTracker(plan, spool_dir=folder.local)


def _check_still_new(plan) -> None:
    from sweeps.records.format import find_parent_run
    from sweeps.records.tracking import client

    mlflow = client(plan.tracking_uri)
    exp = mlflow.get_experiment_by_name(plan.experiment)
    parent = find_parent_run(mlflow, plan.name, exp.experiment_id) if exp else None
    if parent is not None:
        raise UsageError(f"--name {plan.name}: a sweep of this name started meanwhile (MLflow parent run "
                         f"{parent.info.run_id}). Add --resume to continue it, or pass another --name")


def check_cluster(plan) -> None:
    """Join Ray now, and on a cluster stop before anything is logged when a node cannot
    see the storage folder or the trials' inputs."""
    from sweeps.tune import driver

    driver.init_ray(plan.ray_address)
    if driver.concurrent_trials(plan.resources, plan.trials) == 0:
        gpus = f" and {plan.resources['gpu']:g} GPUs" if plan.resources["gpu"] else ""
        raise UsageError(f"no node of the Ray cluster at {plan.ray_address} has {plan.resources['cpu']:g} CPUs"
                         f"{gpus} for a trial (--cpus-per-trial, --gpus-per-trial); no trial could ever start")
    try:
        storage.require_shared(plan.storage, storage.trial_inputs(plan))
    except storage.NotShared as e:
        raise UsageError(str(e)) from None


def execute(plan, started: float | None = None, trainable=None, opened=None, state=None) -> dict:
    """Run a checked plan: MLflow parent run (``opened`` by ``plan_and_join_ray``, or now), Tuner
    fit, best checkpoint, summary. ``state`` (a new one by default) records the sweep's decisions.
    Whatever stops it once its MLflow run is open (an error, Ctrl-C, SIGTERM) ends that run
    FAILED or KILLED, the reason in its stop_reason, and is raised again."""
    from sweeps.tune import driver, signals

    started = started or time.time()
    if opened is None:  # a trainable of one's own: refused before the sweep opens, if it cannot resume
        driver.check_resumable(plan.space, trainable or driver.trainable)
    folder, tracker = opened or open_sweep(plan)
    try:
        with signals.sigterm_raises():
            return _run_opened(plan, started, trainable, state, folder, tracker)
    except BaseException as e:
        killed = isinstance(e, (KeyboardInterrupt, signals.Terminated))
        what = (f"interrupted by {'SIGTERM' if isinstance(e, signals.Terminated) else 'SIGINT'}" if killed
                else f"{type(e).__name__}: {e}")
        status = None
        with contextlib.suppress(Exception):  # the fault itself is what the caller must hear of
            status = tracker.abort(f"{what}; to finish, {resume_hint(plan)}", killed)
        with contextlib.suppress(Exception):
            folder.close()
        e.add_note(f"the sweep's MLflow run {tracker.parent_id} is marked {status}" if status
                   else f"the sweep's MLflow run {tracker.parent_id} had ended already")
        raise


def _run_opened(plan, started: float, trainable, state, folder, tracker) -> dict:
    """``execute`` once the sweep's folder and MLflow run are open."""
    from sweeps.records import best_model, registry
    from sweeps.records.state import SweepState
    from sweeps.records.tracking import MlflowTrials, trial_id_of
    from sweeps.results import retention, summary
    from sweeps.tune import driver, signals

    sweep_dir = folder.local
    print(f"Sweep {plan.name}: space {plan.space.name}, {plan.trials} trials, "
          f"{len(plan.data.dataset)} images in {len(plan.data.classes)} classes; "
          f"MLflow run {tracker.parent_id} in experiment {plan.experiment}")
    if plan.data.dataset.skipped:
        (sweep_dir / "skipped_files.txt").write_text("\n".join(plan.data.dataset.skipped) + "\n")
        tracker.write("artifact", "parent", local_path=str(sweep_dir / "skipped_files.txt"))

    driver.init_ray(plan.ray_address)
    state = state or SweepState(str(plan.sweep_dir))  # this sweep's decisions, for all that follows
    state.tracker = tracker
    ctrl_c = signals.CtrlC(state)
    with state.open(), driver.json_results_only(), ctrl_c:
        callbacks = [MlflowTrials(plan.total_epochs, state), ctrl_c.callback()]
        results = driver.build_tuner(plan, callbacks, trainable, state).fit()
    if ctrl_c.caught is None:  # an interrupted sweep's running trials stay open for --resume, as after a kill
        tracker.reconcile(results, state)

    best_dir = sweep_dir / "best"
    best = summary.export_readable_best(results, best_dir)
    if best is not None:
        best_model.log_model(tracker, best_dir, sweep_dir / "model")  # the MLflow Model, runs:/<parent>/model
    # what --resume and the best trials still need stays; the rest of the checkpoints go
    checkpoints = retention.retain(results, tracker.outcomes, plan.keep_checkpoints, trial_id_of)
    counts = summary.count_trials(results, tracker.outcomes, interrupted=ctrl_c.caught is not None,
                                  paused=state.paused)
    stopped_by = (f"interrupted by {ctrl_c.caught.name}; to continue, {resume_hint(plan)}"
                  if ctrl_c.caught is not None else None)
    pending = tracker.finish(best_dir if best else None,
                             {"best_val_acc": best[1]["val_acc"] if best else 0.0, **counts,
                              "wall_s": time.time() - started,
                              "total_trial_epochs": summary.total_epochs(results)},
                             failed=best is None, interrupted=stopped_by)
    info = summary.build_summary(plan, tracker, results, time.time() - started, best, best_dir, pending)
    info["trials"], info["checkpoints"] = counts, checkpoints
    if ctrl_c.caught is not None:
        info["interrupted"] = {"signal": ctrl_c.caught.name, "resume": resume_hint(plan)}
    if plan.register:
        info["registered"] = registry.register_sweep(plan, info, pending)
    if folder.remote and info["best"]:
        info["best"]["checkpoint"] = folder.location("best", "model.pt")
    summary.write_summary(info, sweep_dir)
    folder.publish(pending=bool(pending))
    folder.close()
    _print_end(info, tracker, pending)
    return info


def _print_end(info: dict, tracker, pending: list) -> None:
    from sweeps.records.tracking import fmt

    t = info["trials"]
    cut = f", {t['interrupted']} interrupted" if t.get("interrupted") else ""
    print(f"\nTrials: {t['completed']} completed, {t['stopped_early']} stopped early, "
          f"{t['time_budget']} cut by the time budget, {t['errored']} errored{cut} in {info['wall_s']:.0f} s "
          "(the whole command, start-up included)")
    best = info["best"]
    if best:
        searched = ", ".join(f"{k}={fmt(best['config'][k])}" for k in tracker.plan.space.search)
        print(f"Best: val_acc {best['val_acc']:.4f} at epoch {best['epoch']}"
              f"{' with ' + searched if searched else ''}")
        print(f"Best checkpoint: {best['checkpoint']} (MLflow run {info['parent_run_id']}, best/)")
    else:
        print("No trial produced a result.")
    c = info.get("checkpoints")
    if c:
        print(f"Checkpoints: kept {c['kept']} ({c['bytes_kept'] / 2**20:.1f} MiB), "
              f"freed {c['freed']} ({c['bytes_freed'] / 2**20:.1f} MiB)")
    if pending:
        print(f"WARNING: {len(pending)} MLflow writes could not be sent "
              f"({tracker.write.last_error}); kept in {tracker.write.spool}")
    if info.get("interrupted"):
        how = "Ctrl-C" if info["interrupted"]["signal"] == "SIGINT" else info["interrupted"]["signal"]
        print(f"INTERRUPTED ({how}): the sweep did not finish; its MLflow run is marked KILLED. "
              f"To continue it, {info['interrupted']['resume']}", file=sys.stderr)


def next_steps(name: str, tracking_uri: str, experiment_id: str) -> list[str]:
    """What to do with a finished sweep, as commands with its real names."""
    uri = f" --tracking-uri {tracking_uri}"
    view = f"#/experiments/{experiment_id}?workflowType=machine_learning"  # the training runs, not GenAI
    if tracking_uri.startswith(("http://", "https://")):
        ui = f"  open {tracking_uri.rstrip('/')}/{view}"
    else:
        ui = f"  mlflow ui --backend-store-uri {tracking_uri}   then open http://127.0.0.1:5000/{view}"
    return ["Next:",
            f"  ftsweep report{uri} --sweep {name}",
            ui,
            f"  ftsweep predict{uri} --run {name} --images DIR --out predictions.csv",
            f"  ftsweep register{uri} --run {name} MODEL_NAME"]


def resume_hint(plan) -> str:
    return f"run the same command with --resume --name {plan.name}"


if __name__ == "__main__":
    sys.exit(main())
