"""--warm-start: an earlier sweep's finished trials are in TPE's history before the first new
trial is sampled, and they stay in MLflow as the earlier sweep's runs."""

import json
from pathlib import Path

import optuna
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from ray.tune.search.optuna import OptunaSearch

from search_spaces.loader import load_space
from sweeps.records.tracking import MODE, OBJECTIVE, TAG_ROLE, TAG_SWEEP, TAG_TRIAL
from sweeps.records.warm_start import earlier_trials
from sweeps.run import main
from sweeps.tune.driver import param_space, search_algorithm

from conftest import run_sweep

# outcome, searched values, val_acc per epoch; in the smoke space's bounds unless noted
EARLIER = [
    ("completed", {"lr": 0.01, "decay_power": 1.0, "frozen_depth": 1}, [0.5, 0.75, 0.7]),
    ("stopped_early", {"lr": 0.05, "decay_power": 1.5, "frozen_depth": 0}, [0.4]),
    ("completed", {"lr": 0.5, "decay_power": 1.0, "frozen_depth": 1}, [0.6, 0.6, 0.6]),  # lr too high
    ("completed", {"lr": 0.002, "decay_power": 0.7, "frozen_depth": 4}, [0.6, 0.6, 0.6]),  # too deep
    ("errored", {"lr": 0.02, "decay_power": 1.0, "frozen_depth": 0}, [0.3]),
]


def log_earlier_sweep(uri: str, name: str, max_epochs: int = 3) -> str:
    """A finished sweep as sweeps/records/tracking.py lays it out; returns its parent run id."""
    client = MlflowClient(uri)
    experiment = client.create_experiment(f"exp-{name}")
    parent = client.create_run(experiment, run_name=name, tags={TAG_SWEEP: name, TAG_ROLE: "parent",
                                                                 "space": "smoke"}).info.run_id
    client.log_batch(parent, params=[Param("search.lr", "loguniform[0.001, 0.1]")])
    space = load_space("smoke")
    for number, (outcome, searched, accs) in enumerate(EARLIER, 1):
        config = space.config({**searched, "max_epochs": max_epochs}).to_dict()
        run = client.create_run(experiment, tags={
            MLFLOW_PARENT_RUN_ID: parent, TAG_SWEEP: name, TAG_ROLE: "trial", TAG_TRIAL: f"t{number}",
            "ftsweep.trial_number": str(number), "outcome": outcome}).info.run_id
        client.log_batch(run, params=[Param(k, str(v)) for k, v in config.items()],
                         metrics=[Metric("val_acc", a, 0, step) for step, a in enumerate(accs, 1)])
        client.set_terminated(run, "FAILED" if outcome == "errored" else "FINISHED")
    client.set_terminated(parent)
    return parent


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    return uri, log_earlier_sweep(uri, "earlier", max_epochs=5)


def test_finished_trials_inside_the_space_become_points_and_the_rest_are_named(tracking):
    uri, parent = tracking
    lines = []
    start = earlier_trials(uri, "earlier", load_space("smoke"), log=lines.append)
    assert start.parent_run_id == parent and start.sweep == "earlier"
    assert start.points == [EARLIER[0][1], EARLIER[1][1]]
    assert start.rewards == [0.75, 0.4]  # the best val_acc, not the last
    text = "\n".join(lines)
    assert "2 of its 5 trials" in text
    assert "trial 3: lr=0.5 is outside this sweep's loguniform [0.001, 0.1]" in text
    assert "trial 4: frozen_depth=4 is outside" in text and "trial 5: outcome errored" in text
    assert "max_epochs=5, this sweep fixes max_epochs=3" in text  # their val_acc measured another budget
    assert earlier_trials(uri, parent, load_space("smoke"), log=lines.append).points == start.points


def test_the_earlier_trials_are_in_the_study_before_the_first_new_trial_is_sampled(tracking):
    uri, _ = tracking
    space = load_space("smoke")
    start = earlier_trials(uri, "earlier", space, log=lambda _: None)
    searcher = search_algorithm(space, 2, start)  # a ConcurrencyLimiter, as the driver builds it
    assert searcher.set_search_properties(OBJECTIVE, MODE, param_space(space))
    study = searcher.searcher._ot_study
    assert [(t.state, t.params, t.value) for t in study.trials] == [
        (optuna.trial.TrialState.COMPLETE, point, reward)
        for point, reward in zip(start.points, start.rewards, strict=True)]
    config = searcher.suggest("new-trial")
    assert len(study.trials) == 3 and study.trials[2].state == optuna.trial.TrialState.RUNNING
    assert {k: config[k] for k in space.search} == study.trials[2].params
    assert search_algorithm(space, None, None).set_search_properties(OBJECTIVE, MODE, param_space(space))


def test_tpe_is_told_each_trials_best_val_acc_not_its_last(tracking):
    """One objective: a trial that peaked at 0.8 and ended at 0.5 counts as 0.8 in TPE's
    study, as it does in the summary, the report and the warm-start rewards."""
    uri, _ = tracking
    space = load_space("smoke")
    start = earlier_trials(uri, "earlier", space, log=lambda _: None)
    searcher = search_algorithm(space, None, start)
    # as the Tuner does: its metric is the driver's, so the searcher must keep the objective
    from sweeps.tune import driver
    assert searcher.set_search_properties(None, None, param_space(space))
    assert searcher.metric == OBJECTIVE
    searcher.suggest("t1")
    last = {"epoch": 3, "val_acc": 0.5, "best_val_acc": 0.8, "training_iteration": 3}
    searcher.on_trial_complete("t1", result=last)
    study = searcher._ot_study
    assert study.trials[-1].value == 0.8
    # warm-start rewards are the same quantity: the best of the earlier trial's val_acc
    assert start.rewards[0] == max(EARLIER[0][2])
    assert driver.METRIC == "val_acc"  # checkpoints stay scored by their own epoch


def test_an_unknown_earlier_sweep_or_a_space_without_search_stops_before_anything_starts(
        tracking, image_folder, tmp_path, monkeypatch, capsys):
    uri, _ = tracking
    monkeypatch.chdir(tmp_path)
    common = ["--data", str(image_folder), "--weights", "none", "--image-size", "16", "--tracking-uri", uri]
    assert main(["--space", "smoke", "--warm-start", "nosuchsweep", *common]) == 2
    err = capsys.readouterr().err
    assert "--warm-start: no sweep 'nosuchsweep'" in err and "earlier" in err  # names what is there
    assert main(["--space", "seed_recipe", "--warm-start", "earlier", *common]) == 2
    assert "searches nothing" in capsys.readouterr().err


@pytest.mark.slow
def test_a_second_sweep_starts_from_the_first_without_copying_its_runs(mlflow_server, cache_dir, tmp_path):
    common = ["--space", "smoke", "--trials", "2", "--max-epochs", "1", "--tracking-uri", mlflow_server,
              "--storage", str(tmp_path / "results")]
    first = run_sweep([*common, "--name", "ws-first"], tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    first_summary = json.loads(Path(first.stdout.strip().splitlines()[-1]).read_text())
    client = MlflowClient(mlflow_server)

    def children(summary):
        runs = client.search_runs([summary["experiment_id"]],
                                  f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'")
        return {r.info.run_id: (r.data.params, r.data.metrics, r.data.tags["outcome"]) for r in runs}

    before = children(first_summary)
    second = run_sweep([*common, "--name", "ws-second", "--warm-start", "ws-first"], tmp_path)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "Warm start from sweep ws-first" in second.stdout and "2 of its 2 trials" in second.stdout
    summary = json.loads(Path(second.stdout.strip().splitlines()[-1]).read_text())

    parent = client.get_run(summary["parent_run_id"])
    assert parent.data.tags["warm_start"] == first_summary["parent_run_id"]
    assert parent.data.params["warm_start"] == first_summary["parent_run_id"]
    assert len(children(summary)) == 2  # only the new trials
    assert children(first_summary) == before  # the earlier sweep's runs, untouched

    # TPE as the second sweep saved it: the first sweep's trials with their best val_acc,
    # then its own two.
    restored = OptunaSearch()
    restored.restore_from_dir(summary["sweep_dir"])
    study = restored._ot_study
    assert len(study.trials) == 4
    expected = [({"lr": float(p["lr"]), "decay_power": float(p["decay_power"]),
                  "frozen_depth": int(p["frozen_depth"])},
                 max(m.value for m in client.get_metric_history(run_id, "val_acc")))
                for run_id, (p, _, _) in before.items()]
    assert sorted(((t.params, t.value) for t in study.trials[:2]), key=str) == sorted(expected, key=str)
