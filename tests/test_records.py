"""The records a sweep keeps are right: each trial's outcome against its own budget, the
time budget's cuts told apart from ASHA's, counted alike in MLflow, the summary and the
live status."""

from types import SimpleNamespace

from sweeps import driver, summary
from sweeps.progress import counts
from sweeps.tracking import MlflowTrials


class Tracker:
    """The parts of SweepTracker the callback uses; records what it would tag."""

    def __init__(self, time_budget=None):
        self.plan = SimpleNamespace(time_budget=time_budget)
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


def test_a_trial_that_ran_its_own_smaller_budget_completed(monkeypatch):
    tracker = Tracker()
    monkeypatch.setattr(MlflowTrials, "active", tracker)
    callback = MlflowTrials(max_epochs=5)  # the sweep's longest budget
    end(callback, trial("short", 2, max_epochs=2), trial("cut", 1, max_epochs=5))
    assert tracker.ended["short"] == ("completed", "")
    assert tracker.ended["cut"] == ("stopped_early", "asha")


def test_the_time_budget_cut_is_its_own_outcome_and_asha_stays_asha(monkeypatch):
    tracker = Tracker(time_budget=60)
    monkeypatch.setattr(MlflowTrials, "active", tracker)
    monkeypatch.setattr(driver, "ASHA_STOPPED", {"asha"})
    callback = MlflowTrials(max_epochs=5)
    trials = [trial("asha", 1, 5), trial("clock", 2, 5), trial("full", 5, 5),
              trial("patient", 3, 5, early_stopped=1)]
    end(callback, *trials)
    assert tracker.ended == {"asha": ("stopped_early", "asha"), "clock": ("time_budget", "time_budget"),
                             "full": ("completed", ""), "patient": ("stopped_early", "patience")}
    # the summary and the live status count what MLflow was told
    results = [SimpleNamespace(metrics={**t.last_result, "trial_id": t.trial_id}, error=None,
                               config=t.config, path=f"/x/trial_{t.trial_id}") for t in trials]
    assert summary.count_trials(results, tracker.outcomes) == {
        "completed": 1, "stopped_early": 2, "time_budget": 1, "errored": 0}
    live = counts(trials, max_epochs=5)
    assert (live["time_budget"], live["stopped_early"], live["completed"]) == (1, 2, 1)


def test_without_records_the_summary_judges_each_trial_by_its_own_budget():
    results = [SimpleNamespace(metrics={"epoch": 2, "trial_id": "a"}, error=None,
                               config={"max_epochs": 2}, path="/x/trial_a"),
               SimpleNamespace(metrics={"epoch": 2, "trial_id": "b"}, error=None,
                               config={"max_epochs": 4}, path="/x/trial_b")]
    counted = summary.count_trials(results)
    assert (counted["completed"], counted["stopped_early"]) == (1, 1)


def test_asha_names_the_trials_it_stopped(monkeypatch):
    monkeypatch.setattr(driver, "ASHA_STOPPED", set())
    asha = driver.ResumableASHA(time_attr="training_iteration", metric="best_val_acc", mode="max",
                                max_t=2, grace_period=1, reduction_factor=2)
    a, b = SimpleNamespace(trial_id="a"), SimpleNamespace(trial_id="b")
    for t in (a, b):
        asha.on_trial_add(None, t)
    assert asha.on_trial_result(None, a, {"training_iteration": 1, "best_val_acc": 0.9}) == "CONTINUE"
    assert asha.on_trial_result(None, b, {"training_iteration": 1, "best_val_acc": 0.1}) == "STOP"
    assert driver.ASHA_STOPPED == {"b"}
