"""The records a sweep keeps are right: each trial's outcome against its own budget, the
time budget's cuts told apart from ASHA's, counted alike in MLflow, the summary and the
live status."""

import json
from types import SimpleNamespace

import pytest

from sweeps.plan.inputs import recorded_inputs
from sweeps.records.state import SweepState
from sweeps.records.tracking import MlflowTrials
from sweeps.results import summary
from sweeps.tune import driver
from sweeps.tune.progress import counts

from conftest import write_image_folder


class Tracker:
    """The parts of SweepTracker the callback uses; records what it would tag."""

    def __init__(self):
        self.ended, self.outcomes = {}, {}

    def end_trial(self, trial_id, outcome, reason=""):
        self.ended[trial_id] = (outcome, reason)
        self.outcomes[trial_id] = outcome


def trial(trial_id, epoch, max_epochs, status="TERMINATED", **extra):
    return SimpleNamespace(trial_id=trial_id, status=status, config={"max_epochs": max_epochs},
                           last_result={"epoch": epoch, **extra}, metric_analysis={})


def end(callback, *trials):
    for t in trials:
        callback.on_trial_complete(0, list(trials), t)


def test_a_trial_that_ran_its_own_smaller_budget_completed():
    tracker = Tracker()
    state = SweepState("s", tracker)
    state.stop("cut", "asha")
    callback = MlflowTrials(max_epochs=5, state=state)  # the sweep's longest budget
    end(callback, trial("short", 2, max_epochs=2), trial("cut", 1, max_epochs=5))
    assert tracker.ended["short"] == ("completed", "")
    assert tracker.ended["cut"] == ("stopped_early", "asha")


def test_the_time_budget_cut_is_its_own_outcome_and_asha_stays_asha():
    """ASHA's stop is recorded as it decides; the clock's trials, which Tune ends without
    telling the callbacks, end at the experiment's end as cut by the clock."""
    tracker = Tracker()
    state = SweepState("s", tracker)
    state.stop("asha", "asha")
    callback = MlflowTrials(max_epochs=5, state=state)
    trials = [trial("asha", 1, 5), trial("clock", 2, 5, status="RUNNING"), trial("full", 5, 5),
              trial("patient", 3, 5, early_stopped=1)]
    end(callback, trials[0], trials[2], trials[3])
    state.clock_ran_out = True  # TimeBudget.stop_all
    callback.on_experiment_end(trials)
    assert tracker.ended == {"asha": ("stopped_early", "asha"), "clock": ("time_budget", "time_budget"),
                             "full": ("completed", ""), "patient": ("stopped_early", "patience")}
    # the summary and the live status count what MLflow was told
    results = [SimpleNamespace(metrics={**t.last_result, "trial_id": t.trial_id}, error=None,
                               config=t.config, path=f"/x/trial_{t.trial_id}") for t in trials]
    assert summary.count_trials(results, tracker.outcomes) == {
        "completed": 1, "stopped_early": 2, "time_budget": 1, "errored": 0, "paused": 0, "interrupted": 0}
    for t in trials:
        t.status = "TERMINATED"
    live = counts(trials, max_epochs=5, tagged=tracker.outcomes)
    assert (live["time_budget"], live["stopped_early"], live["completed"]) == (1, 2, 1)


def test_without_records_the_summary_judges_each_trial_by_its_own_budget():
    results = [SimpleNamespace(metrics={"epoch": 2, "trial_id": "a"}, error=None,
                               config={"max_epochs": 2}, path="/x/trial_a"),
               SimpleNamespace(metrics={"epoch": 2, "trial_id": "b"}, error=None,
                               config={"max_epochs": 4}, path="/x/trial_b")]
    counted = summary.count_trials(results)
    assert (counted["completed"], counted["stopped_early"]) == (1, 1)


def test_a_signal_cuts_the_trials_that_had_not_ended_it_does_not_stop_them_early():
    """In an interrupted sweep a trial short of its budget that the tracker never ended was
    cut by the signal (``--resume`` continues it), not by ASHA; ended trials keep their outcome."""
    results = [SimpleNamespace(metrics={"epoch": 2, "trial_id": t}, error=None, config={"max_epochs": 4},
                               path=f"/x/trial_{t}") for t in ("cut", "asha")]
    counted = summary.count_trials(results, {"asha": "stopped_early"}, interrupted=True)
    assert (counted["interrupted"], counted["stopped_early"]) == (1, 1)


def test_asha_names_the_trials_it_stopped():
    state = SweepState("s")
    asha = driver.ResumableASHA(time_attr="training_iteration", metric="best_val_acc", mode="max",
                                max_t=2, grace_period=1, reduction_factor=2, state=state)
    a, b = SimpleNamespace(trial_id="a"), SimpleNamespace(trial_id="b")
    for t in (a, b):
        asha.on_trial_add(None, t)
    assert asha.on_trial_result(None, a, {"training_iteration": 1, "best_val_acc": 0.9}) == "CONTINUE"
    assert asha.on_trial_result(None, b, {"training_iteration": 1, "best_val_acc": 0.1}) == "STOP"
    assert state.stops == {"b": "asha"}


# --- a name is one sweep, and --resume continues it only on the same inputs --------------

def _args(image_folder, tmp_path, *extra):
    from sweeps.cli import build_parser

    return build_parser().parse_args([
        "--space", "smoke", "--data", str(image_folder), "--weights", "none", "--image-size", "16",
        "--max-epochs", "3", "--name", "same", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
        "--storage", str(tmp_path / "results"), *extra])


@pytest.fixture
def started_sweep(image_folder, tmp_path, monkeypatch, cache_dir):
    """A sweep whose parent run was created as the driver creates it (nothing trained)."""
    from sweeps.plan.prepare import prepare
    from sweeps.records.tracking import SweepTracker

    monkeypatch.chdir(tmp_path)
    plan = prepare(_args(image_folder, tmp_path, "--set", "batch_size=8"), log=lambda _: None)
    tracker = SweepTracker(plan)
    assert tracker.write.close() == []
    return tracker.parent_id


def test_the_parent_run_records_what_the_sweep_ran_on(started_sweep, tmp_path):
    from mlflow.tracking import MlflowClient

    parent = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(started_sweep)
    inputs = recorded_inputs(parent)
    assert (inputs["model"], inputs["max_epochs"], inputs["batch_size"], inputs["image_size"]) == \
        ("resnet18", "3", "8", "16")
    assert inputs["split_seed"] == "0" and inputs["dataset_fingerprint"] and inputs["weights"] == "none"
    assert parent.data.params["split_seed"] == "0"


def test_resume_with_other_inputs_lists_each_difference_before_anything_starts(
        started_sweep, image_folder, tmp_path):
    from sweeps.errors import UsageError
    from sweeps.plan.prepare import prepare

    same = prepare(_args(image_folder, tmp_path, "--set", "batch_size=8", "--resume"), log=lambda _: None)
    assert same.trials == 4  # the same sweep resumes
    other_data = write_image_folder(tmp_path / "other", per_class=7)
    with pytest.raises(UsageError) as e:
        prepare(_args(other_data, tmp_path, "--set", "batch_size=16", "--max-epochs", "2", "--model",
                      "mobilenet_v3_small", "--resume"), log=lambda _: None)
    text = str(e.value)
    assert started_sweep in text
    for change in ("batch_size: 8 → 16", "max_epochs: 3 → 2", "model: resnet18 → mobilenet_v3_small",
                   "dataset_fingerprint: "):
        assert change in text, text
    with pytest.raises(UsageError, match="split_seed: 0 → 1"):
        prepare(_args(image_folder, tmp_path, "--set", "batch_size=8", "--split-seed", "1", "--resume"),
                log=lambda _: None)


def test_a_name_in_use_is_refused_naming_the_earlier_run_and_the_ways_on(
        started_sweep, image_folder, tmp_path, capsys):
    from sweeps.run import main

    argv = ["--space", "smoke", "--data", str(image_folder), "--weights", "none", "--image-size", "16",
            "--name", "same", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
            "--storage", str(tmp_path / "results")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert started_sweep in err and "--resume" in err and "another --name" in err
    # a sweep folder without a run (say, another tracking store) is a sweep too
    (tmp_path / "results" / "elsewhere").mkdir(parents=True)
    assert main([*argv[:-5], "elsewhere", *argv[-4:]]) == 2
    assert "folder" in capsys.readouterr().err


# --- seeds: --set seed is --seed; neither moves the validation split --------------------

def test_set_seed_is_the_sweeps_seed_and_the_split_has_its_own(image_folder, tmp_path, monkeypatch, cache_dir):
    from sweeps.errors import UsageError
    from sweeps.plan.prepare import prepare

    monkeypatch.chdir(tmp_path)

    def plan(*extra):
        return prepare(_args(image_folder, tmp_path, "--name", "fresh", *extra), log=lambda _: None)

    by_set, by_flag, default = plan("--set", "seed=7"), plan("--seed", "7"), plan()
    assert by_set.space.seed == by_set.space.config().seed == 7 == by_flag.space.config().seed
    assert default.space.config().seed == 0
    with pytest.raises(UsageError, match="--seed 3 and --set seed=7 disagree"):
        plan("--seed", "3", "--set", "seed=7")
    # the search seed leaves the validation images (and the decoded cache) as they were
    assert by_flag.data.dataset.val == default.data.dataset.val
    assert by_flag.data.dataset.fingerprint == default.data.dataset.fingerprint
    assert plan("--split-seed", "1").data.dataset.val != default.data.dataset.val


def test_a_damaged_best_checkpoint_gives_way_to_the_best_readable_one(tmp_path, capsys):
    import torch
    from ray.tune import Checkpoint

    def checkpoint(name, val_acc, epoch):
        folder = tmp_path / name
        folder.mkdir()
        torch.save({"config": {"model": "resnet18"}, "classes": ["a", "b"], "image_size": 16, "mean": [0.5] * 3,
                    "std": [0.2] * 3, "state": {"best_val_acc": val_acc, "epoch": epoch},
                    "model": {"w": torch.zeros(2)}}, folder / "checkpoint.pt")
        return Checkpoint.from_directory(str(folder))

    best, second = checkpoint("best", 0.9, 3), checkpoint("second", 0.8, 2)
    data = (tmp_path / "best" / "checkpoint.pt").read_bytes()
    (tmp_path / "best" / "checkpoint.pt").write_bytes(data[:len(data) // 2])  # cut off
    results = [SimpleNamespace(best_checkpoints=[(best, {"val_acc": 0.9})]),
               SimpleNamespace(best_checkpoints=[(second, {"val_acc": 0.8})])]
    found = summary.export_readable_best(results, tmp_path / "out")
    assert found is not None and found[1]["val_acc"] == 0.8
    assert "cannot be read" in capsys.readouterr().out
    assert (tmp_path / "out" / "model.pt").exists()
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["epoch"] == 2
