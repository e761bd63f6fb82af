"""Bring a restored sweep's record up to date: the searcher with the restored trials, and a
trial with the checkpoints its folder holds.

Ray Tune writes the trial list, the search generator and the searcher as separate files, one
after another, so a killed driver can leave them disagreeing; the trial list is the record to
trust, and the rest is made to agree with it before the first new trial is asked for. The
internals of Ray Tune and Optuna this needs are named in tests/test_internals.py.
"""
from __future__ import annotations

import json
import posixpath
import re

import pyarrow.fs
from ray.train._internal.session import _TrainingResult
from ray.tune import Checkpoint
from ray.tune.experiment import Trial
from ray.tune.search import ConcurrencyLimiter, SearchGenerator
from ray.tune.utils import flatten_dict

LIVE = (Trial.PENDING, Trial.RUNNING, Trial.PAUSED)


class CatchUpOnRestore:
    """Scheduler mixin: until the scheduler first chooses a trial to run (and sets
    ``_replayed``, having replayed the recorded results into its rungs), every added trial
    brings the searcher up to date with the trials added so far (``catch_up``). After a
    restore that is every restored trial, added before the first new trial is asked for; in
    a new sweep the first trials, for which it changes nothing."""

    _replayed = False

    def on_trial_add(self, tune_controller, trial):
        if not self._replayed and tune_controller is not None:
            try:
                catch_up(tune_controller)
                catch_up_checkpoint(trial)
            except (OSError, ValueError) as e:  # a record cut off by the kill: it stays as Tune restored it
                print(f"warning: could not bring the restored record of trial {trial.trial_id} up to date "
                      f"({type(e).__name__}: {e}); it goes on as Ray Tune restored it")
        super().on_trial_add(tune_controller, trial)


def catch_up(tune_controller) -> None:
    generator = tune_controller.search_alg
    if not isinstance(generator, SearchGenerator):
        return  # a fixed recipe: Tune's variant generator, no searcher to keep in step
    trials = tune_controller.get_trials()
    state = generator.get_state()
    if state["counter"] != len(trials):
        state["counter"] = len(trials)
        state["finished"] = state["finished"] and state["counter"] >= state["total_samples"]
        generator.set_state(state)
    live = {t.trial_id for t in trials if t.status in LIVE}
    *wrappers, searcher = _searchers(generator)
    for limiter in wrappers:
        if isinstance(limiter, ConcurrencyLimiter) and limiter.live_trials != live:
            limiter.live_trials = set(live)
            limiter.num_unfinished_live_trials = len(live)
    _catch_up_optuna(searcher, trials)


def _searchers(generator) -> list:
    """The searcher a search generator wraps, outermost first (limiters, then the searcher)."""
    chain = []
    searcher = getattr(generator, "searcher", None)
    while searcher is not None:
        chain.append(searcher)
        searcher = getattr(searcher, "searcher", None)
    return chain or [None]


def _catch_up_optuna(searcher, trials) -> None:
    from ray.tune.search.optuna import OptunaSearch

    if not isinstance(searcher, OptunaSearch) or not isinstance(searcher._space, dict):
        return
    from optuna.trial import TrialState

    for trial in trials:
        known = searcher._ot_trials.get(trial.trial_id)
        if trial.status in LIVE:
            if known is None:  # suggested after the searcher's record was written
                searcher._ot_study.enqueue_trial(_params(searcher, trial), skip_if_exists=False)
                searcher._ot_trials[trial.trial_id] = searcher._ot_study.ask(fixed_distributions=searcher._space)
            continue
        if trial.trial_id in searcher._completed_trials:
            continue
        value = (trial.last_result or {}).get(searcher.metric)
        state = TrialState.FAIL if trial.status == Trial.ERROR else \
            TrialState.COMPLETE if value is not None else TrialState.PRUNED
        if known is None:
            searcher.add_evaluated_point(_params(searcher, trial), value, error=state == TrialState.FAIL,
                                         pruned=state == TrialState.PRUNED)
        else:
            searcher._ot_study.tell(known, value if state == TrialState.COMPLETE else None, state=state)
        searcher._completed_trials.add(trial.trial_id)


def forget_unlisted(tune_controller) -> int:
    """Once every restored trial is in the list (the scheduler's first choice): the trials
    the searcher remembers suggesting but the list does not hold will never run. They end
    in its study as failed instead of staying there running, where constant liar would
    keep steering TPE away from their parameters. Returns how many."""
    from optuna.trial import TrialState
    from ray.tune.search.optuna import OptunaSearch

    searcher = _searchers(getattr(tune_controller, "search_alg", None))[-1]
    if not isinstance(searcher, OptunaSearch):
        return 0
    listed = {t.trial_id for t in tune_controller.get_trials()}
    unlisted = [i for i in searcher._ot_trials if i not in listed and i not in searcher._completed_trials]
    for trial_id in unlisted:
        searcher._ot_study.tell(searcher._ot_trials[trial_id], None, state=TrialState.FAIL)
        searcher._completed_trials.add(trial_id)
    return len(unlisted)


def _params(searcher, trial) -> dict:
    flat = flatten_dict(trial.config)
    return {name: flat[name] for name in searcher._space}


CHECKPOINT_DIR = re.compile(r"checkpoint_(\d+)")


def catch_up_checkpoint(trial) -> str | None:
    """A trial that will run again but whose recorded latest checkpoint is gone resumes from
    a newer checkpoint in its folder; returns its name (None when nothing changed). Without
    one, Tune's restore fails as before and the trial ends errored.

    The newest folder is taken when it is the only newer one (the checkpoint whose arrival
    deleted the recorded one: complete, since a worker reports a checkpoint only once it is
    stored) or when a recorded result names it; otherwise it may be one a killed worker was
    still writing, and the one before it is taken. Its metrics are the result recorded for
    it, which then also becomes the trial's last result; without one (Tune writes results
    and its record in the same upload), the recorded checkpoint's, an iteration further per
    checkpoint (one report per checkpoint), and the last result stays the record's, as the
    schedulers' replay of the recorded results sees it."""
    latest = trial.latest_checkpoint_result
    if trial.status not in LIVE or latest is None or latest.checkpoint is None or trial.storage is None:
        return None
    fs, gone = latest.checkpoint.filesystem, latest.checkpoint.path
    gone_index = _index(gone)
    if gone_index is None or fs.get_file_info(gone).type != pyarrow.fs.FileType.NotFound:
        return None
    folder = pyarrow.fs.FileSelector(trial.storage.trial_fs_path, allow_not_found=True)
    newer = sorted((i, info.path) for info in fs.get_file_info(folder)
                   if info.type == pyarrow.fs.FileType.Directory and (i := _index(info.path)) is not None
                   and i > gone_index)
    if not newer:
        return None
    named = {r.get("checkpoint_dir_name"): r for r in recorded_results(trial)}
    index, path = newer[-1] if len(newer) == 1 or posixpath.basename(newer[-1][1]) in named else newer[-2]
    name = posixpath.basename(path)
    recorded = named.get(name)
    metrics = dict(recorded) if recorded else {
        **latest.metrics, "checkpoint_dir_name": name,
        "training_iteration": latest.metrics.get("training_iteration", 0) + index - gone_index}
    manager = trial.run_metadata.checkpoint_manager
    manager._checkpoint_results = [r for r in manager._checkpoint_results
                                   if fs.get_file_info(r.checkpoint.path).type != pyarrow.fs.FileType.NotFound]
    manager.register_checkpoint(_TrainingResult(Checkpoint(path, filesystem=fs), metrics))
    trial.storage.current_checkpoint_index = index  # the last one written: the next goes after it
    if recorded:
        trial.run_metadata.last_result = {**recorded, "config": trial.config}
    trial.run_metadata.invalidate_cache()
    trial.invalidate_json_state()
    print(f"trial {trial.trial_id}: its recorded checkpoint {posixpath.basename(gone)} is gone; "
          f"it resumes from the newer {name}")
    return name


def _index(path: str) -> int | None:
    match = CHECKPOINT_DIR.fullmatch(posixpath.basename(path))
    return int(match.group(1)) if match else None


def recorded_results(trial) -> list[dict]:
    """The results a trial reported before the driver stopped (its result.json)."""
    if not trial.last_result or trial.storage is None or not trial.storage.trial_dir_name:
        return []  # a new trial: nothing recorded yet
    try:
        fs = trial.storage.storage_filesystem
        with fs.open_input_stream(f"{trial.storage.trial_fs_path}/result.json") as f:
            text = f.read().decode()
    except OSError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]
