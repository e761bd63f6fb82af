"""Ray Tune wiring: the trainable with its resources, OptunaSearch, ASHA, storage."""

from __future__ import annotations

import contextlib
import os
import time

import ray
from ray import tune
from ray.tune.execution import class_cache
from ray.tune.logger import JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.stopper import Stopper

from sweeps.errors import UsageError
from sweeps.records.format import METRIC, MODE, OBJECTIVE
from sweeps.records.state import ASHA, SweepState
from sweeps.tune import restored, schedulers
from sweeps.tune.progress import LiveStatus
from sweeps.tune.ray_session import init_ray  # noqa: F401 - sweeps.tune.driver.init_ray, as callers know it
from trainables.ray_trial import trainable

# Tune gives every trial actor the runtime env {"PL_DISABLE_FORK": "1"}, meant for PyTorch
# Lightning, which trials do not use. A runtime env unlike the job's sends each trial's
# worker through Ray's runtime-env set-up (one more Python process to start, about 0.7
# CPU-s) instead of onto a worker Ray prestarted for the job with the trial's modules
# already imported (sweeps.tune.ray_session.init_ray). (Tune also passes on AWS_* and some Ray
# Train variables when the driver has them: then the trials start on new workers.)
class_cache.DEFAULT_ENV_VARS.pop("PL_DISABLE_FORK", None)


class ResumableASHA(restored.CatchUpOnRestore, ASHAScheduler):
    """ASHA whose rungs (and searcher, sweeps/tune/restored.py) survive ``Tuner.restore``.

    Ray Tune snapshots the trials but not the scheduler, so a resumed sweep's ASHA would
    start with empty rungs and judge the remaining trials against nothing. Before the
    first trial is chosen to run, every trial's recorded results are replayed into the
    rungs, in order, exactly as they were recorded the first time.
    """

    def __init__(self, *args, state: SweepState | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.state = state or SweepState()

    def on_trial_result(self, tune_controller, trial, result):
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == self.STOP and result.get(self._time_attr, 0) < self._max_t:
            self.state.stop(trial.trial_id, ASHA)
        return decision

    def choose_trial_to_run(self, tune_controller):
        if not self._replayed:
            self._replayed = True
            restored.forget_unlisted(tune_controller)
            replayed = self.replay(tune_controller.get_trials())
            if replayed:
                print(f"ASHA: rungs rebuilt from {replayed} results recorded before the restart")
        return super().choose_trial_to_run(tune_controller)

    def replay(self, trials) -> int:
        if len(self._brackets) != 1:  # the bracket of a finished trial is not recorded anywhere
            return 0
        replayed = 0
        for trial in trials:
            for result in restored.recorded_results(trial):
                if self._metric in result and self._time_attr in result:
                    self._brackets[0].on_result(trial, result[self._time_attr],
                                                self._metric_op * result[self._metric])
                    replayed += 1
        return replayed


def param_space(space) -> dict:
    """Tune distributions for the searched keys, constants for the rest of the config."""
    return {**space.config().to_dict(), **{n: _distribution(p) for n, p in space.search.items()}}


def _distribution(p):
    if p.type == "uniform":
        return tune.uniform(p.low, p.high)
    if p.type == "loguniform":
        return tune.loguniform(p.low, p.high)
    if p.type == "int":
        return tune.randint(int(p.low), int(p.high) + 1)  # Tune's randint excludes high
    return tune.choice(list(p.values))


def search_algorithm(space, max_concurrent: int | None, warm_start=None):
    """Seeded TPE; ``warm_start`` (sweeps/records/warm_start.py) gives it an earlier sweep's trials
    as completed ones, in its study before the first new trial is sampled."""
    if not space.search:
        return None  # a fixed recipe: nothing to search
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    # constant_liar: running trials count as pessimistic results, so parallel TPE samples
    # spread out instead of piling onto the same point.
    sampler = optuna.samplers.TPESampler(seed=space.seed, multivariate=True, constant_liar=True,
                                         n_startup_trials=space.n_startup_trials)
    earlier = warm_start.points if warm_start and warm_start.points else None
    search = OptunaSearch(sampler=sampler, metric=OBJECTIVE, mode=MODE, points_to_evaluate=earlier,
                          evaluated_rewards=warm_start.rewards if earlier else None)
    # a trial paused at a rung holds no lane: the limiter of a pausing scheduler does not count it
    limiter = schedulers.LaneLimiter if space.scheduler["type"] in schedulers.PAUSING else ConcurrencyLimiter
    return limiter(search, max_concurrent) if max_concurrent else search


def concurrent_trials(resources: dict, trials: int) -> int:
    """Trials that fit at once on the cluster's live nodes for one trial's request
    (``{"cpu": C, "gpu": G}``), at most ``trials``; 0 when no node fits one.

    Counted per node, since a trial cannot straddle two. Ray Tune with a searcher and no
    concurrency limit keeps one trial pending at a time (``_get_max_pending_trials``), so
    lanes would fill one actor start after another; a limit of exactly this many lets Tune
    place every lane's trial, and start its actor, together.
    """
    fit = 0
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        have = node.get("Resources", {})
        per_node = [int(have.get("CPU", 0) / resources["cpu"] + 1e-9)] if resources.get("cpu") else []
        if resources.get("gpu"):
            per_node.append(int(have.get("GPU", 0) / resources["gpu"] + 1e-9))
        fit += min(per_node, default=0)
    return min(fit, trials)


class TimeBudget(Stopper):
    """--time-budget: stops the sweep once its seconds have passed in this driver process,
    and records that the clock did (Tune ends the trials it cuts without telling the
    callbacks, so the MLflow callback learns their cause here)."""

    def __init__(self, seconds: float, state: SweepState):
        self.seconds, self.state = seconds, state
        self._deadline: float | None = None

    def __setstate__(self, saved):  # a restored sweep's clock starts again with its driver
        self.__dict__.update(saved, _deadline=None)

    def __call__(self, trial_id, result) -> bool:
        return False

    def stop_all(self) -> bool:
        if self._deadline is None:
            self._deadline = time.monotonic() + self.seconds
        if time.monotonic() >= self._deadline:
            self.state.clock_ran_out = True
        return self.state.clock_ran_out


def make_scheduler(space, max_t: int, state: SweepState | None = None):
    """The space's ``scheduler``: ASHA (stops trials at rungs), or one that pauses them there
    and resumes them from their checkpoints (sweeps/tune/schedulers.py)."""
    settings = space.scheduler
    if settings["type"] in schedulers.PAUSING:
        return schedulers.pausing_scheduler(settings, time_attr="training_iteration", metric=OBJECTIVE,
                                            mode=MODE, max_t=max_t, state=state)
    return ResumableASHA(time_attr="training_iteration", max_t=max_t,
                         grace_period=min(settings["grace_period"], max_t),
                         reduction_factor=settings["reduction_factor"], state=state)


def check_resumable(space, trainable_fn) -> None:
    """A pausing scheduler resumes trials from their checkpoints: refuse a trainable that
    never reads one, before anything starts."""
    if space.scheduler["type"] in schedulers.PAUSING and not schedulers.resumes_from_checkpoint(trainable_fn):
        name = getattr(trainable_fn, "__qualname__", type(trainable_fn).__name__)
        raise UsageError(f"{space.path}: scheduler {space.scheduler['type']} pauses trials and resumes them "
                         f"from their checkpoints, but the trainable {name} never reads one "
                         "(ray.tune.get_checkpoint()); use scheduler type asha")


def build_tuner(plan, callbacks: list, trainable_fn=None, state: SweepState | None = None) -> tune.Tuner:
    """The sweep's Tuner (or, with --resume, the restored one); ``state`` records its
    scheduler's and clock's decisions (sweeps/records/state.py)."""
    space = plan.space
    max_t = plan.total_epochs
    state = state or SweepState(plan.name)
    check_resumable(space, trainable_fn or trainable)
    scheduler = make_scheduler(space, max_t, state)
    run_config = tune.RunConfig(
        name=plan.name, storage_path=plan.storage, callbacks=[*callbacks, JsonLoggerCallback()],
        stop=TimeBudget(plan.time_budget, state) if plan.time_budget else None,
        # Keeps the best checkpoint of each trial plus (always) its latest, to resume from.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=METRIC,
                                                checkpoint_score_order=MODE),
        failure_config=tune.FailureConfig(max_failures=plan.max_failures),
        progress_reporter=LiveStatus(max_t, plan.trials, state=state),
        verbose=1)
    trainable_ = tune.with_resources(tune.with_parameters(trainable_fn or trainable, data=plan.data),
                                     plan.resources)
    if plan.resume and _exists(plan):
        return tune.Tuner.restore(plan.sweep_dir, trainable=trainable_, resume_errored=True,
                                  param_space=param_space(space))
    # Without --max-concurrent, every lane the cluster has for this request, started together.
    concurrent = plan.max_concurrent or concurrent_trials(plan.resources, plan.trials) or None
    tune_config = tune.TuneConfig(
        metric=OBJECTIVE, mode=MODE, num_samples=plan.trials, scheduler=scheduler,
        search_alg=search_algorithm(space, concurrent, plan.warm_start),
        # Tune's own limit counts paused trials as holding a lane: none for a pausing scheduler
        max_concurrent_trials=None if space.search or space.scheduler["type"] in schedulers.PAUSING
        else concurrent,
        reuse_actors=True,
        trial_name_creator=_trial_name, trial_dirname_creator=_trial_name)
    return tune.Tuner(trainable_, param_space=param_space(space), tune_config=tune_config,
                      run_config=run_config)


def json_results_only():
    """Within it, Tune writes each trial's results once, as the JSON lines resume reads
    (``JsonLoggerCallback``, which ``build_tuner`` adds), and not again as CSV and
    TensorBoard files: MLflow holds the metrics. Tune's default is all three."""
    return environment(TUNE_DISABLE_AUTO_CALLBACK_LOGGERS="1")


@contextlib.contextmanager
def environment(**values):
    """Set these environment variables within it; put back what was there."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _trial_name(trial) -> str:
    return f"trial_{trial.trial_id}"


def _exists(plan) -> bool:
    return tune.Tuner.can_restore(plan.sweep_dir)
