"""A restored sweep's record brought up to date (sweeps/tune/restored.py), with Ray Tune's and
Optuna's real objects: a searcher whose record is older or newer than the restored trials,
and a trial whose recorded checkpoint is gone."""

import shutil
from pathlib import Path

import pytest
from ray.tune.experiment import Experiment, Trial
from ray.tune.search import ConcurrencyLimiter, SearchGenerator

from search_spaces.loader import load_space
from sweeps.tune import driver, restored, schedulers

TRIALS = 6


@pytest.fixture
def space():
    return load_space("smoke")


def generator(space) -> SearchGenerator:
    """The sweep's searcher (seeded TPE with constant liar, 2 lanes), as Tune wraps it."""
    gen = SearchGenerator(driver.search_algorithm(space, 2))
    gen.set_search_properties(driver.OBJECTIVE, driver.MODE, driver.param_space(space))
    gen.add_configurations([Experiment("sweep", run=lambda config: None, config=driver.param_space(space),
                                       num_samples=TRIALS)])
    return gen


class Controller:
    """What Tune hands a scheduler: the search algorithm and the trials added so far."""

    def __init__(self, gen, trials):
        self.search_alg, self.trials = gen, trials

    def get_trials(self):
        return self.trials


def finish(gen, trial, value: float) -> None:
    gen.on_trial_complete(trial.trial_id, result={driver.OBJECTIVE: value, "training_iteration": 1})
    trial.set_status(Trial.TERMINATED)
    trial.run_metadata.last_result = {driver.OBJECTIVE: value, "training_iteration": 1}


def limiter(gen) -> ConcurrencyLimiter:
    return gen.searcher


def study(gen):
    return gen.searcher.searcher._ot_study


def searched(space, trial) -> dict:
    return {name: trial.config[name] for name in space.search}


def test_a_searcher_older_than_the_trials_learns_them_and_suggests_no_extra_trial(space, tmp_path):
    gen = generator(space)
    t1, t2 = gen.next_trial(), gen.next_trial()
    gen.save_to_dir(str(tmp_path), "s")  # the searcher's record: two trials suggested, both running
    finish(gen, t1, 0.5)
    t3 = gen.next_trial()  # the trials' record, written later: t1 ended, t3 suggested

    stale = generator(space)
    stale.restore_from_dir(str(tmp_path))
    assert stale.get_state()["counter"] == 2 and limiter(stale).live_trials == {t1.trial_id, t2.trial_id}
    restored.catch_up(Controller(stale, [t1, t2, t3]))

    assert stale.get_state()["counter"] == 3
    assert limiter(stale).live_trials == {t2.trial_id, t3.trial_id}
    assert limiter(stale).num_unfinished_live_trials == 2
    ot = study(stale).trials
    assert [(t.state.name, t.value) for t in ot] == [("COMPLETE", 0.5), ("RUNNING", None), ("RUNNING", None)]
    assert ot[2].params == searched(space, t3)  # t3 with its own parameters
    # t3's result reaches TPE through the limiter, and the sweep ends with TRIALS trials
    finish(stale, t3, 0.7)
    assert study(stale).trials[2].value == 0.7
    finish(stale, t2, 0.6)
    made = 3
    while (trial := stale.next_trial()) is not None:
        made += 1
        finish(stale, trial, 0.1)
    assert made == TRIALS and stale.is_finished()


def test_a_searcher_newer_than_the_trials_forgets_what_they_do_not_hold(space, tmp_path):
    gen = generator(space)
    t1, t2 = gen.next_trial(), gen.next_trial()
    finish(gen, t1, 0.5)
    gen.next_trial()  # suggested after the trials' record was written: no trial runs it
    gen.save_to_dir(str(tmp_path), "s")

    newer = generator(space)
    newer.restore_from_dir(str(tmp_path))
    restored.catch_up(Controller(newer, [t1, t2]))

    assert newer.get_state()["counter"] == 2
    assert limiter(newer).live_trials == {t2.trial_id}  # the lane is not held by a trial no one runs
    t4 = newer.next_trial()
    assert t4 is not None  # so the second lane is given to a new trial
    # and at the scheduler's first choice, the study no longer has the unlisted trial running
    assert restored.forget_unlisted(Controller(newer, [t1, t2, t4])) == 1
    assert [t.state.name for t in study(newer).trials] == ["COMPLETE", "RUNNING", "FAIL", "RUNNING"]


def test_a_finished_trial_the_study_still_has_running_is_told_to_it(space, tmp_path):
    gen = generator(space)
    t1, t2 = gen.next_trial(), gen.next_trial()
    gen.save_to_dir(str(tmp_path), "s")
    finish(gen, t1, 0.4)
    t2.set_status(Trial.ERROR)

    stale = generator(space)
    stale.restore_from_dir(str(tmp_path))
    restored.catch_up(Controller(stale, [t1, t2]))
    assert [(t.state.name, t.value) for t in study(stale).trials] == [("COMPLETE", 0.4), ("FAIL", None)]
    assert limiter(stale).live_trials == set()


def test_an_up_to_date_searcher_is_left_as_it_is(space):
    gen = generator(space)
    t1, t2 = gen.next_trial(), gen.next_trial()
    finish(gen, t1, 0.5)
    before = (gen.get_state()["counter"], set(limiter(gen).live_trials), len(study(gen).trials))
    restored.catch_up(Controller(gen, [t1, t2]))
    assert (gen.get_state()["counter"], limiter(gen).live_trials, len(study(gen).trials)) == before


@pytest.mark.parametrize("scheduler", [
    driver.ResumableASHA(max_t=3),
    schedulers.PromotionScheduler("training_iteration", driver.OBJECTIVE, driver.MODE, 3),
    schedulers.TopKScheduler("training_iteration", driver.OBJECTIVE, driver.MODE, 3),
])
def test_every_scheduler_catches_the_searcher_up_until_it_first_chooses_a_trial(space, scheduler, tmp_path):
    gen = generator(space)
    t1 = gen.next_trial()
    gen.save_to_dir(str(tmp_path), "s")
    t2 = gen.next_trial()
    stale = generator(space)
    stale.restore_from_dir(str(tmp_path))
    controller = Controller(stale, [t1, t2])
    scheduler.set_search_properties(driver.OBJECTIVE, driver.MODE)
    scheduler.on_trial_add(controller, t2)
    assert stale.get_state()["counter"] == 2
    scheduler.choose_trial_to_run(controller)
    stale.restore_from_dir(str(tmp_path))  # after it has chosen, added trials are new ones
    scheduler.on_trial_add(controller, t2)
    assert stale.get_state()["counter"] == 1


# --- a trial whose recorded checkpoint is gone --------------------------------------------

def restored_trial(tmp_path, recorded: list[int], on_disk: list[int], results: list[int]) -> Trial:
    """A trial as Tune restores it: its record registered the checkpoints ``recorded`` (the
    last one its latest), its folder holds ``on_disk``, its result.json the results of
    ``results``; every checkpoint i was reported with iteration i + 1."""
    import json

    from ray import tune
    from ray.train._internal.session import _TrainingResult
    from ray.train._internal.storage import StorageContext

    tune.register_trainable("restored_fake", lambda config: None)
    storage = StorageContext(storage_path=str(tmp_path), experiment_dir_name="sweep", trial_dir_name="trial_a")
    trial = Trial("restored_fake", config={"lr": 0.1}, trial_id="a", storage=storage,
                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val_acc",
                                                          checkpoint_score_order="max"))
    folder = Path(storage.trial_fs_path)

    def result(i):
        return {"val_acc": 0.1 * i, "training_iteration": i + 1, "checkpoint_dir_name": f"checkpoint_{i:06d}"}

    for i in sorted(set(recorded) | set(on_disk)):
        (folder / f"checkpoint_{i:06d}").mkdir(parents=True)
        (folder / f"checkpoint_{i:06d}" / "checkpoint.pt").write_text(str(i))
    for i in recorded:
        trial.on_checkpoint(_TrainingResult(tune.Checkpoint(str(folder / f"checkpoint_{i:06d}")), result(i)))
    for i in set(recorded) - set(on_disk):
        shutil.rmtree(folder / f"checkpoint_{i:06d}", ignore_errors=True)
    trial.run_metadata.last_result = result(recorded[-1])
    (folder / "result.json").write_text("".join(json.dumps(result(i)) + "\n" for i in results))
    trial.set_status(Trial.PENDING)
    return trial


def test_a_trial_whose_recorded_checkpoint_is_gone_resumes_from_the_newer_one_with_its_result(tmp_path):
    trial = restored_trial(tmp_path, recorded=[2], on_disk=[3], results=[0, 1, 2, 3])
    assert restored.catch_up_checkpoint(trial) == "checkpoint_000003"
    assert Path(trial.checkpoint.path).name == "checkpoint_000003"
    assert trial.latest_checkpoint_result.metrics["training_iteration"] == 4  # restore goes on from here
    assert trial.latest_checkpoint_result.metrics["val_acc"] == pytest.approx(0.3)
    assert trial.storage.current_checkpoint_index == 3  # the next checkpoint is written as checkpoint_000004
    assert trial.last_result["training_iteration"] == 4  # as the schedulers' replay of result.json sees it
    assert (Path(trial.storage.trial_fs_path) / "checkpoint_000003" / "checkpoint.pt").exists()  # kept


def test_without_its_result_the_newer_checkpoint_counts_one_iteration_per_checkpoint(tmp_path):
    trial = restored_trial(tmp_path, recorded=[1, 2], on_disk=[4], results=[0, 1, 2])
    assert restored.catch_up_checkpoint(trial) == "checkpoint_000004"
    assert trial.latest_checkpoint_result.metrics["training_iteration"] == 5
    assert trial.last_result["training_iteration"] == 3  # the record's, as result.json has it


@pytest.mark.parametrize("results, taken", [([0, 1, 2, 3], "checkpoint_000003"),  # the newest is recorded
                                            ([0, 1, 2], "checkpoint_000002")])  # it may be half-written
def test_of_two_newer_checkpoints_an_unrecorded_newest_is_passed_over(tmp_path, results, taken):
    trial = restored_trial(tmp_path, recorded=[1], on_disk=[2, 3], results=results)
    assert restored.catch_up_checkpoint(trial) == taken


def test_a_record_that_cannot_be_read_leaves_the_trial_as_tune_restored_it(tmp_path, capsys):
    trial = restored_trial(tmp_path, recorded=[2], on_disk=[3], results=[0, 1])
    with open(Path(trial.storage.trial_fs_path) / "result.json", "a") as f:
        f.write('{"val_acc": 0.3, "training_iter')  # cut off by the kill
    controller = Controller(None, [trial])
    driver.ResumableASHA(max_t=3, metric=driver.OBJECTIVE, mode=driver.MODE).on_trial_add(controller, trial)
    assert Path(trial.checkpoint.path).name == "checkpoint_000002"
    assert "could not bring the restored record of trial a up to date (JSONDecodeError" in capsys.readouterr().out


@pytest.mark.parametrize("on_disk, status", [([2, 3], Trial.PENDING),  # the recorded one is there
                                             ([1], Trial.PENDING),  # only older ones: Tune's error stands
                                             ([3], Trial.TERMINATED)])  # not run again
def test_otherwise_the_trial_is_left_as_tune_restored_it(tmp_path, on_disk, status):
    trial = restored_trial(tmp_path, recorded=[2], on_disk=on_disk, results=[0, 1, 2, 3])
    trial.set_status(status)
    assert restored.catch_up_checkpoint(trial) is None
    assert Path(trial.checkpoint.path).name == "checkpoint_000002"
