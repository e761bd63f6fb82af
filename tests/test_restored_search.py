"""A restored searcher whose record is older or newer than the restored trials is brought up
to date with them (sweeps/restored_search.py), with Ray Tune's and Optuna's real objects."""

import pytest
from ray.tune.experiment import Experiment, Trial
from ray.tune.search import ConcurrencyLimiter, SearchGenerator

from search_spaces.loader import load_space
from sweeps import driver, restored_search, schedulers

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
    restored_search.catch_up(Controller(stale, [t1, t2, t3]))

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
    restored_search.catch_up(Controller(newer, [t1, t2]))

    assert newer.get_state()["counter"] == 2
    assert limiter(newer).live_trials == {t2.trial_id}  # the lane is not held by a trial no one runs
    assert newer.next_trial() is not None  # so the second lane is given to a new trial


def test_a_finished_trial_the_study_still_has_running_is_told_to_it(space, tmp_path):
    gen = generator(space)
    t1, t2 = gen.next_trial(), gen.next_trial()
    gen.save_to_dir(str(tmp_path), "s")
    finish(gen, t1, 0.4)
    t2.set_status(Trial.ERROR)

    stale = generator(space)
    stale.restore_from_dir(str(tmp_path))
    restored_search.catch_up(Controller(stale, [t1, t2]))
    assert [(t.state.name, t.value) for t in study(stale).trials] == [("COMPLETE", 0.4), ("FAIL", None)]
    assert limiter(stale).live_trials == set()


def test_an_up_to_date_searcher_is_left_as_it_is(space):
    gen = generator(space)
    t1, t2 = gen.next_trial(), gen.next_trial()
    finish(gen, t1, 0.5)
    before = (gen.get_state()["counter"], set(limiter(gen).live_trials), len(study(gen).trials))
    restored_search.catch_up(Controller(gen, [t1, t2]))
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
