"""The private parts of Ray Tune, Optuna and MLflow the platform relies on, each named, so an
upgrade that moves one fails here, saying which, instead of somewhere in a resumed sweep.
pyproject.toml pins the minor versions these were checked against."""

import inspect

import pytest


def has(owner, *names):
    for name in names:
        assert hasattr(owner, name), f"{getattr(owner, '__name__', owner)}.{name} is gone: see its use in sweeps/"


def test_ray_tune_internals():
    from ray.tune.execution import class_cache
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.schedulers import ASHAScheduler

    # driver.py: the runtime env Tune gives every trial actor
    assert isinstance(class_cache.DEFAULT_ENV_VARS, dict), "ray.tune.execution.class_cache.DEFAULT_ENV_VARS"
    # schedulers.py: a restored trial waiting at a rung goes back to PAUSED
    has(TuneController, "_set_trial_status")
    # driver.ResumableASHA.replay: results replayed into ASHA's one bracket
    asha = ASHAScheduler(time_attr="training_iteration", metric="m", mode="max", max_t=4)
    has(asha, "_brackets", "_time_attr", "_metric", "_metric_op", "_max_t")
    assert len(asha._brackets) == 1 and hasattr(asha._brackets[0], "on_result"), "ASHAScheduler._brackets[0].on_result"
    assert list(inspect.signature(asha._brackets[0].on_result).parameters) == ["trial", "cur_iter", "cur_rew"], \
        "ray.tune.schedulers.async_hyperband._Bracket.on_result(trial, cur_iter, cur_rew)"


def test_ray_train_and_core_internals():
    from ray._private.utils import get_num_cpus  # run.py, prepare.py, ray_session.py: a local Ray's CPUs
    from ray._raylet import AuthenticationTokenLoader  # tools/submit.py: the cluster's token
    from ray.train._internal.session import _TrainingResult  # restored.py: a checkpoint registered again
    from ray.tune.experiment import Trial
    from ray.tune.experiment.trial import _TrainingRunMetadata

    assert get_num_cpus() >= 1
    assert list(inspect.signature(_TrainingResult).parameters)[:2] == ["checkpoint", "metrics"], \
        "ray.train._internal.session._TrainingResult(checkpoint, metrics)"
    has(AuthenticationTokenLoader, "instance")
    # restored.catch_up_checkpoint: the trial's checkpoint manager and metadata
    has(Trial, "latest_checkpoint_result", "invalidate_json_state")
    has(_TrainingRunMetadata(), "checkpoint_manager", "invalidate_cache", "last_result")
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    manager = _CheckpointManager(checkpoint_config=None)
    has(manager, "_checkpoint_results", "register_checkpoint")


def test_optuna_search_internals():
    from ray.tune.search.optuna import OptunaSearch

    # restored._catch_up_optuna: the study, its trials by Tune id, the search space
    search = OptunaSearch(space={"x": __import__("optuna").distributions.FloatDistribution(0, 1)},
                          metric="m", mode="max")
    has(search, "_ot_study", "_ot_trials", "_completed_trials", "_space")
    has(search._ot_study, "enqueue_trial", "ask", "tell")


def test_mlflow_internals():
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry  # prepare.py: known stores

    assert isinstance(_tracking_store_registry._registry, dict), "_tracking_store_registry._registry"
    assert {"sqlite", "http", "file"} <= set(_tracking_store_registry._registry)


@pytest.mark.parametrize("package, pinned", [("ray", "2.60."), ("optuna", "5.1."), ("mlflow", "3.18.")])
def test_the_installed_versions_are_the_pinned_ones(package, pinned):
    from importlib.metadata import version

    assert version(package).startswith(pinned), f"{package} {version(package)}: the internals were checked on {pinned}x"
