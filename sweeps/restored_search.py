"""Bring a restored sweep's searcher up to date with its restored trials.

Ray Tune records a sweep in separate files: the trials (``experiment_state-*.json``), the
search generator with its concurrency limiter (``search_gen_state-*.json``) and the
searcher itself (``searcher-state-*.pkl``). It writes them one after another and uploads
them as separate objects, so a driver killed mid-write or mid-upload (on S3 an upload takes
long enough to be hit) can leave a searcher record that is older, or newer, than the trial
list. ``Tuner.restore`` takes each file as it finds it. Seen here: a sweep of 6 trials,
killed as its first trial ended and resumed, ran 7, because the generator remembered
suggesting 2 trials while the trial list held 3; and the limiter never passed the third
trial's result on to TPE.

The trial list is the record to trust: it is what resume runs, and what MLflow's trial runs
and the checkpoints belong to. While the restored trials are added, before the first new
trial is asked for, the scheduler (``CatchUpOnRestore``) makes the searcher agree with it:

- the generator counts exactly the trials in the list as suggested, so the sweep ends with
  ``--trials`` of them;
- every concurrency limiter holds exactly the trials that will run again as live, so a lane
  is neither held by a trial the list does not have nor given twice;
- Optuna's study holds every trial of the list: a trial it does not remember is added with
  its own parameters (running, or finished with the objective it recorded), and a trial the
  list shows finished is told to the study if the study still has it running.
"""

from __future__ import annotations

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
        if not self._replayed:
            catch_up(tune_controller)
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
    searcher = generator.searcher
    while hasattr(searcher, "searcher"):
        if isinstance(searcher, ConcurrencyLimiter) and searcher.live_trials != live:
            searcher.live_trials = set(live)
            searcher.num_unfinished_live_trials = len(live)
        searcher = searcher.searcher
    _catch_up_optuna(searcher, trials)


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


def _params(searcher, trial) -> dict:
    flat = flatten_dict(trial.config)
    return {name: flat[name] for name in searcher._space}
