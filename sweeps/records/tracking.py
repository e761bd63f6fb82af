"""MLflow on the driver side: one parent run per sweep, one nested child run per trial.

Only the driver writes (no sqlite lock storms from many trial processes). Every write
goes through one writer (``sweeps/records/writer.py``), in a child process of the driver while
trials run: it is retried, queued while the tracking server is away, and whatever could
still not be sent at the end is kept on disk and reported.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import time
from pathlib import Path

from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NOTE
from ray.tune import Callback

from sweeps.plan.inputs import dataset_input
from sweeps.plan.uris import check_tracking_uri, redact  # noqa: F401 - also sweeps.records.tracking's
from sweeps.records.format import (  # noqa: F401 - OBJECTIVE, MODE, OUTCOMES: also tracking's
    BEST_DIR,
    EPOCH_METRICS,
    MODE,
    OBJECTIVE,
    OPEN,
    OUTCOMES,
    TAG_INPUTS,
    TAG_OUTCOME,
    TAG_PAUSED_AT,
    TAG_ROLE,
    TAG_STOP_REASON,
    TAG_SWEEP,
    TAG_TRIAL,
    TAG_TRIAL_NUMBER,
    find_parent_run,
)
from sweeps.records.state import TIME_BUDGET, SweepState
from sweeps.records.writer import Writer, WriterProcess

SHORT = {"lr": "lr", "decay_power": "γ", "frozen_depth": "frozen", "weight_decay": "wd",
         "optimizer": "opt", "batch_size": "bs"}


def client(uri: str) -> MlflowClient:
    """An MlflowClient whose store is ready.

    MLflow creates a new sqlite store's tables (and migrates an old one) when it first
    opens it; two processes doing that at once on the same file crash one of them. The
    first opening therefore holds an exclusive lock on the database file (``flock``, which
    does not touch sqlite's own locks), so two sweeps started at the same moment on a new
    store wait for each other instead."""
    if not uri.startswith("sqlite:///"):
        return MlflowClient(uri)
    path = Path(uri.removeprefix("sqlite:///")).expanduser()
    with open(path, "ab") as f:  # an empty file is an empty sqlite database
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            c = MlflowClient(uri)
            c.search_experiments(max_results=1)  # the schema is created or migrated by now
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    return c


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class SweepTracker:
    """The sweep's parent run and the bookkeeping that maps trials to child runs."""

    def __init__(self, plan, spool_dir: Path | None = None):
        # Fail fast against a lost server instead of MLflow's default minutes of back-off;
        # Writer does its own retrying.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.plan = plan
        self.client = client(plan.tracking_uri)
        exp = self.client.get_experiment_by_name(plan.experiment)
        # The kind tag opens the experiment in the UI's training-runs view, not the GenAI one.
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(
            plan.experiment, tags={"mlflow.experimentKind": "custom_model_development"})
        spool = spool_dir / "mlflow_pending.jsonl" if spool_dir else None
        self.write: Writer | WriterProcess = Writer(self.client, spool)
        # What an earlier driver of this sweep could not send goes first, in order.
        self.replayed = self.write.load_spool() if plan.resume else 0
        self.trial_numbers: dict[str, int] = {}
        self.last_step: dict[str, int] = {}  # per trial: epochs already logged
        self.ended: set[str] = set()
        self.outcomes: dict[str, str] = {}  # per ended trial, as tagged in MLflow
        self.started: set[str] = set()
        self.paused: set[str] = set()  # trials waiting at a rung (a pausing scheduler)
        self.closing = False  # the parent run's end is queued
        self._start_parent()  # in this process: the sweep needs its parent run id now
        self.started |= set(self.write.run_ids) - {"parent"}  # trials that have a run, or one queued
        # from here on, writes leave through a child process: Tune's loop never waits on MLflow
        self.write = WriterProcess(plan.tracking_uri, spool, self.write.run_ids, self.write.queue)

    def _runs(self, filter_string: str):
        return self.client.search_runs([self.experiment_id], filter_string, max_results=10000)

    def _start_parent(self) -> None:
        plan = self.plan
        sweep = f"tags.`{TAG_SWEEP}` = '{plan.name}'"
        parent = find_parent_run(self.client, plan.name, self.experiment_id) if plan.resume else None
        if parent:  # --resume continues the same parent and its children
            self.parent_id = self.write.run_ids["parent"] = parent.info.run_id
            for run in self._runs(f"{sweep} and tags.`{TAG_ROLE}` = 'trial'"):
                trial_id = run.data.tags[TAG_TRIAL]
                self.write.run_ids[trial_id] = run.info.run_id
                self.trial_numbers[trial_id] = int(run.data.tags.get(TAG_TRIAL_NUMBER, 0))
                history = self.client.get_metric_history(run.info.run_id, "val_acc")
                self.last_step[trial_id] = max((m.step for m in history), default=0)
                if run.data.tags.get(TAG_OUTCOME) == "paused":
                    self.paused.add(trial_id)
                if run.data.tags.get(TAG_OUTCOME, "running") not in OPEN:
                    self.ended.add(trial_id)
                    self.outcomes[trial_id] = run.data.tags[TAG_OUTCOME]
            self._note_queued()
            self.write("reopen", "parent")  # sends the spooled writes first
            return
        space, cfg = plan.space, plan.space.config()
        # warm_start: the parent run whose trials TPE started from (sweeps/records/warm_start.py)
        warm = {"warm_start": plan.warm_start.parent_run_id} if plan.warm_start else {}
        tags = {TAG_SWEEP: plan.name, TAG_ROLE: "parent", "space": space.name, "model": cfg.model,
                "dataset": plan.dataset_label, "dataset_fingerprint": plan.data.dataset.fingerprint,
                "git_commit": git_commit(), MLFLOW_RUN_NOTE: self._description(),
                **({TAG_INPUTS: json.dumps(plan.inputs, sort_keys=True)} if plan.inputs else {}), **warm}
        self.write("create", "parent", experiment_id=self.experiment_id, run_name=plan.name, tags=tags,
                   start_time=now_ms())
        if "parent" not in self.write.run_ids:
            raise RuntimeError(f"could not create the sweep's MLflow run: {self.write.last_error}")
        self.parent_id = self.write.run_ids["parent"]
        self.write("inputs", "parent", **dataset_input(plan))
        params = {"space": space.name, "trials": plan.trials, "max_epochs": cfg.max_epochs,
                  "searched": ",".join(space.search) or "-", **{f"fixed.{k}": v for k, v in space.fixed.items()},
                  **{f"search.{k}": f"{p.type}{p.bounds()}" for k, p in space.search.items()},
                  "seed": space.seed, "scheduler": json.dumps(space.scheduler, sort_keys=True),
                  "asha.grace_period": space.grace_period,
                  "asha.reduction_factor": space.reduction_factor,
                  "tpe.n_startup_trials": space.n_startup_trials,
                  "cpus_per_trial": plan.resources["cpu"], "gpus_per_trial": plan.resources["gpu"],
                  "classes": len(plan.data.classes), "train_images": len(plan.data.dataset.train),
                  "val_images": len(plan.data.dataset.val), "image_size": plan.data.image_size,
                  "split_seed": plan.split_seed, "val_fraction": plan.val_fraction, **warm}
        self.write("batch", "parent", metrics=[], params={k: str(v)[:500] for k, v in params.items()})

    def _note_queued(self) -> None:
        """Count the spooled writes as logged: the trials they create are started, their
        epochs logged, their outcomes given; they are sent before anything new."""
        for op, key, kw in self.write.queue:
            if key == "parent":
                continue
            tags = kw.get("tags") or {}
            if op == "create":
                self.started.add(key)
                self.trial_numbers.setdefault(key, int(tags.get(TAG_TRIAL_NUMBER, 0)))
            steps = [int(m["step"]) for m in kw.get("metrics") or ()]
            if steps:
                self.last_step[key] = max(self.last_step.get(key, 0), *steps)
            if tags.get(TAG_OUTCOME, "running") not in OPEN:
                self.ended.add(key)
                self.outcomes[key] = tags[TAG_OUTCOME]

    def _description(self) -> str:
        plan, cfg = self.plan, self.plan.space.config()
        searched = ", ".join(f"{k} ({p.type} {p.bounds()})" for k, p in plan.space.search.items())
        return (f"Space **{plan.space.name}**: {plan.space.description}\n\n"
                f"Data: {plan.dataset_label} ({len(plan.data.dataset.train)} train / "
                f"{len(plan.data.dataset.val)} val images, {len(plan.data.classes)} classes, "
                f"{plan.data.image_size}px). Model: {cfg.model}.\n\n"
                f"Budget: {plan.trials} trials x up to {plan.total_epochs} epochs"
                f"{f', {plan.time_budget:.0f} s' if plan.time_budget else ''}. "
                f"Searched: {searched or 'nothing (a fixed recipe)'}.")

    # --- per trial -------------------------------------------------------------------
    def start_trial(self, trial_id: str, config: dict) -> None:
        if trial_id in self.started:
            return  # a resumed or retried trial continues its own run
        self.started.add(trial_id)
        number = self.trial_numbers[trial_id] = len(self.trial_numbers) + 1
        # A fixed recipe's lone trial says what it is; a sweep's trials say their settings.
        prefix = f"{self.plan.space.name} " if not self.plan.space.search else ""
        name = f"{prefix}trial-{number:03d} " + " ".join(
            f"{SHORT.get(k, k)}={fmt(config[k])}" for k in self.plan.space.search if k in config)
        tags = {MLFLOW_PARENT_RUN_ID: self.parent_id, TAG_SWEEP: self.plan.name, TAG_ROLE: "trial",
                TAG_TRIAL: trial_id, TAG_TRIAL_NUMBER: str(number), TAG_OUTCOME: "running"}
        self.write("create", trial_id, experiment_id=self.experiment_id, run_name=name.strip(), tags=tags,
                   start_time=now_ms())
        self.write("batch", trial_id, metrics=[], params={k: str(v) for k, v in config.items()})
        self.write("inputs", trial_id, **dataset_input(self.plan))

    def log_epoch(self, trial_id: str, result: dict) -> None:
        step, now = int(result["epoch"]), now_ms()
        if step <= self.last_step.get(trial_id, 0):
            return  # replayed after a resume from an older checkpoint: logged already
        self.last_step[trial_id] = step
        metrics = [dict(key=k, value=float(result[k]), timestamp=now, step=step)
                   for k in (*EPOCH_METRICS, *result.get("extra_metrics", ())) if k in result]
        self.write("batch", trial_id, metrics=metrics)

    def pause_trial(self, trial_id: str, rungs: list[int]) -> None:
        """The trial waits at a rung; its run stays open and goes on when it is resumed."""
        self.paused.add(trial_id)
        self.write("batch", trial_id, metrics=[], tags={TAG_OUTCOME: "paused",
                                                        TAG_PAUSED_AT: ",".join(map(str, rungs))})

    def resume_trial(self, trial_id: str) -> None:
        if trial_id in self.paused:
            self.paused.discard(trial_id)
            self.write("batch", trial_id, metrics=[], tags={TAG_OUTCOME: "running"})

    def end_trial(self, trial_id: str, outcome: str, reason: str = "") -> None:
        if trial_id not in self.started:
            return  # stopped before it ever ran (a pending trial when the time budget ran out)
        self.ended.add(trial_id)
        self.outcomes[trial_id] = outcome
        tags = {TAG_OUTCOME: outcome, **({TAG_STOP_REASON: reason} if reason else {})}
        if outcome == "errored":
            tags["error"] = reason[-5000:]
        self.write("batch", trial_id, metrics=[], tags=tags)
        self.write("end", trial_id, status="FAILED" if outcome == "errored" else "FINISHED", end_time=now_ms())

    def reconcile(self, results, state: SweepState) -> None:
        """After a resume, make MLflow agree with Ray Tune's own record of the sweep.

        A trial that finished just before the driver was killed is not reported again, so
        its run is ended here. A trial the driver started but Tune's last snapshot never
        saw is run again under a new trial; its partial run is kept, marked abandoned.
        """
        known = set()
        for r in results:
            trial_id = trial_id_of(r)
            known.add(trial_id)
            if trial_id and trial_id in self.started and trial_id not in self.ended:
                outcome, reason = state.outcome(trial_id, r.metrics or {}, trial_budget(r.config),
                                                errored=r.error is not None, paused=trial_id in self.paused)
                self.end_trial(trial_id, outcome, str(r.error)[-2000:] if r.error else reason)
        for trial_id in set(self.trial_numbers) - known:
            if trial_id not in self.ended:
                self.write("batch", trial_id, metrics=[], tags={
                    TAG_ROLE: "abandoned", TAG_OUTCOME: "abandoned",
                    TAG_STOP_REASON: "driver killed before Ray Tune recorded this trial; rerun as a new trial"})
                self.write("end", trial_id, status="KILLED", end_time=now_ms())
                self.ended.add(trial_id)

    def run_id(self, trial_id: str) -> str | None:
        return self.write.run_ids.get(trial_id)

    # --- the sweep -------------------------------------------------------------------
    def finish(self, best_dir: Path | None, metrics: dict, failed: bool, interrupted: str | None = None) -> list:
        """Log the best model and the sweep's totals and end its parent run: FINISHED,
        FAILED (no trial produced a result), or KILLED when a signal (``interrupted``, how
        to go on) stopped the sweep, with that said in its ``stop_reason`` tag."""
        if best_dir is not None:
            self.write("artifacts", "parent", local_dir=str(best_dir), artifact_path=BEST_DIR)
        now = now_ms()
        self.write("batch", "parent", metrics=[dict(key=k, value=float(v), timestamp=now, step=0)
                                               for k, v in metrics.items()])
        if interrupted:
            self.write("batch", "parent", metrics=[], tags={TAG_STOP_REASON: interrupted})
        status = "KILLED" if interrupted else "FAILED" if failed else "FINISHED"
        self.write("end", "parent", status=status, end_time=now_ms())
        self.closing = True
        return self.write.close()

    def abort(self, reason: str, killed: bool) -> str | None:
        """End the parent run after a fault stopped the sweep: KILLED (a signal) or FAILED
        (an error), ``reason`` in its stop_reason; returns that status. None once ``finish``
        has queued the parent's end: the writer process sends it (or spools it) on its own."""
        if self.closing:
            if isinstance(self.write, WriterProcess):
                self.write.detach()  # the wait for it was what stopped
            return None
        self.closing = True
        status = "KILLED" if killed else "FAILED"
        self.write("batch", "parent", metrics=[], tags={TAG_STOP_REASON: reason[-5000:]})
        self.write("end", "parent", status=status, end_time=now_ms())
        self.write.close()
        return status


def now_ms() -> int:
    """MLflow's timestamps: milliseconds since the epoch. Writes carry the moment they
    describe, since the writer may send them later."""
    return int(time.time() * 1000)


def trial_id_of(result) -> str:
    """The Tune trial id of a Result, also for a trial that errored before reporting."""
    return (result.metrics or {}).get("trial_id") or Path(result.path).name.removeprefix("trial_")


def outcome_of(last_result: dict, errored: bool, budget: int) -> str:
    """A finished trial's outcome judged from its last result alone, where the sweep kept no
    record of it: ``budget`` is the trial's own epochs (``trial_budget``); one that ended
    before them stopped early. The sweep's own records (``SweepState.outcome``) come first."""
    if errored or last_result.get("diverged"):
        return "errored"
    if last_result.get("early_stopped"):
        return "stopped_early"
    if int(last_result.get("epoch", 0)) >= budget:
        return "completed"
    return "stopped_early"


def trial_budget(config: dict | None) -> int:
    """The epochs a trial was given by its own config: max_epochs, plus recovery_epochs
    when it prunes (``TrialConfig.total_epochs``)."""
    from trainables.config import TrialConfig

    known = TrialConfig.keys()
    return TrialConfig.from_dict({k: v for k, v in (config or {}).items() if k in known}).total_epochs


def fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


class MlflowTrials(Callback):
    """Ray Tune callback: mirrors every trial into its child run as it happens, ending it
    with the outcome and stop reason the sweep's state gives (sweeps/records/state.py)."""

    def __init__(self, max_epochs: int, state: SweepState):
        self.max_epochs = max_epochs
        self.state = state

    @property
    def tracker(self) -> SweepTracker:
        return self.state.tracker

    # Tune keeps this in its experiment snapshot: a restored sweep remembers why trials stopped
    def get_state(self) -> dict:
        return self.state.as_record()

    def set_state(self, state: dict) -> None:
        self.state.restore(state)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.tracker.start_trial(trial.trial_id, trial.config)
        self.tracker.resume_trial(trial.trial_id)  # promoted from a rung: the same run goes on

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.tracker.log_epoch(trial.trial_id, result)
        rungs = self.state.pauses.get(trial.trial_id)
        # the scheduler decides before the callbacks hear of the result: paused at this one
        if trial.trial_id in self.state.paused and rungs and rungs[-1] == result.get("training_iteration"):
            self.tracker.pause_trial(trial.trial_id, rungs)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.end(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.tracker.end_trial(trial.trial_id, "errored", error_text(trial))

    def on_experiment_end(self, trials, **info):
        """Tune ends the trials --time-budget cuts without telling the callbacks: end them
        here, cut by the clock (or waiting at a rung when it ran out)."""
        if not self.state.clock_ran_out:
            return
        for trial in trials:
            if trial.status != "ERROR" and trial.trial_id not in self.tracker.ended:
                if trial.status != "PAUSED":
                    self.state.stop(trial.trial_id, TIME_BUDGET)
                self.end(trial)

    def end(self, trial) -> None:
        outcome, reason = self.state.outcome(trial.trial_id, trial.last_result or {}, trial_budget(trial.config),
                                             paused=trial.status == "PAUSED")
        self.tracker.end_trial(trial.trial_id, outcome, reason)


def error_text(trial) -> str:
    path = getattr(trial, "error_file", None)
    if path and Path(path).exists():
        lines = Path(path).read_text().strip().splitlines()
        return lines[-1] if lines else "error"
    return "error"
