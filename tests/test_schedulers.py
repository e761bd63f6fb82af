"""Pausing schedulers: decisions on scripted results, a paused trial resumed bit for bit, and
the scheduler choice in a space file. Promotion sweeps end to end: tests/test_promotion_sweeps.py."""

import math
import textwrap
from types import SimpleNamespace

import pytest
import torch

from sweeps.tune import driver, restored, schedulers
from sweeps.tune.schedulers import LaneLimiter, PromotionScheduler, TopKScheduler, rung_milestones
from trainables.config import TrialConfig
from trainables.data import DataHandle, scan
from trainables.train import CHECKPOINT_FILE, run_trial

from conftest import write_image_folder

CONTINUE, PAUSE, STOP = "CONTINUE", "PAUSE", "STOP"


class FakeSearch:
    def __init__(self, finished=False):
        self.finished, self.completed = finished, {}

    def is_finished(self):
        return self.finished

    def on_trial_complete(self, trial_id, result=None, error=False):
        self.completed[trial_id] = result


class FakeController:
    """The part of Tune's controller a scheduler sees: the trials, the search, status changes."""

    def __init__(self, finished=False):
        self.trials, self.search_alg, self.stopped = [], FakeSearch(finished), []

    def get_trials(self):
        return self.trials

    def add(self, trial_id, status="RUNNING"):
        trial = SimpleNamespace(trial_id=trial_id, status=status, last_result={})
        self.trials.append(trial)
        return trial

    def _set_trial_status(self, trial, status):
        trial.status = status

    def stop_trial(self, trial):
        self.stopped.append(trial.trial_id)
        trial.status = "TERMINATED"


def report(scheduler, tc, trial, t, score):
    """A result of ``trial`` at epoch ``t``; the trial takes the state the decision gives it."""
    result = {"training_iteration": t, "best_val_acc": score}
    decision = scheduler.on_trial_result(tc, trial, result)
    trial.last_result = result
    if decision == PAUSE:
        trial.status = "PAUSED"
    elif decision == STOP:
        trial.status = "TERMINATED"
    return decision


def resume(scheduler, tc):
    """What Tune does with the scheduler's choice when a lane is free: it runs it."""
    trial = scheduler.choose_trial_to_run(tc)
    if trial is not None:
        trial.status = "RUNNING"
    return trial


@pytest.fixture(autouse=True)
def recorded_results(monkeypatch):
    monkeypatch.setattr(restored, "recorded_results", lambda trial: getattr(trial, "recorded", []))


def promotion(max_t=4, eta=2):
    return PromotionScheduler("training_iteration", "best_val_acc", "max", max_t, grace_period=1,
                              reduction_factor=eta)


def test_rungs_are_ashas():
    assert rung_milestones(1, 3, 27) == [1, 3, 9]
    assert rung_milestones(1, 2, 4) == [1, 2]
    assert rung_milestones(2, 3, 4) == [2]
    assert rung_milestones(5, 3, 4) == []


def test_a_trial_goes_on_only_in_the_top_of_its_rung_and_a_free_lane_takes_the_best_paused_one():
    s, tc = promotion(), FakeController()
    a, b, c, d, e, f, h = (tc.add(x) for x in "abcdefh")
    assert report(s, tc, a, 1, 0.5) == PAUSE            # alone at the rung: floor(1/2) = 0 go on
    assert report(s, tc, b, 1, 0.7) == CONTINUE         # 2 reached, the top 1 goes on
    assert report(s, tc, c, 1, 0.6) == PAUSE            # 3 reached: the top 1 (b) went on already
    assert resume(s, tc) is None                        # nothing promotable, no new trial pending
    assert report(s, tc, d, 1, 0.9) == CONTINUE         # 4 reached: d and b are the top 2
    assert report(s, tc, e, 1, 0.55) == PAUSE
    assert report(s, tc, f, 1, 0.65) == CONTINUE        # 6 reached: d, b, f
    assert report(s, tc, h, 1, 0.2) == PAUSE            # 7 reached: still 3
    g = tc.add("g")
    assert report(s, tc, g, 1, 0.1) == PAUSE            # 8 reached: top 4 = d, b, f, c
    assert resume(s, tc) is c                           # c, paused long ago, is promoted now
    assert resume(s, tc) is None                        # and only once
    assert s.promoted[1] == {"b", "d", "f", "c"}
    assert s.state.pauses == {"a": [1], "c": [1], "e": [1], "h": [1], "g": [1]}
    assert report(s, tc, b, 4, 0.8) == STOP             # the full budget


def test_a_free_lane_prefers_a_higher_rung_then_the_better_score():
    s, tc = promotion(max_t=8), FakeController()
    p, q, r = tc.add("p"), tc.add("q"), tc.add("r")
    assert report(s, tc, p, 1, 0.9) == PAUSE
    assert report(s, tc, q, 1, 0.8) == PAUSE            # 2 reached: the top 1 is p, paused
    assert resume(s, tc) is p
    assert report(s, tc, p, 2, 0.95) == PAUSE           # alone at rung 2
    assert report(s, tc, r, 1, 0.99) == CONTINUE        # 3 reached: the top 1 is r
    assert report(s, tc, r, 2, 0.97) == CONTINUE        # rung 2: r above p
    for name, score in (("x", 0.1), ("y", 0.2), ("z", 0.3), ("w", 0.4), ("v", 0.5)):
        s.record(name, 1, score)                        # rung 1: 8 reached, top 4: r, p, q, v
    s.record("u", 2, 0.5)
    s.record("t", 2, 0.4)                               # rung 2: 4 reached, top 2: r, p
    assert resume(s, tc) is p                           # rung 2 before rung 1
    assert resume(s, tc) is q
    assert resume(s, tc) is None


def test_a_promotable_trial_at_its_rung_yields_its_lane_to_a_better_paused_one():
    s, tc = promotion(max_t=8), FakeController()
    a, b, c = tc.add("a"), tc.add("b"), tc.add("c")
    report(s, tc, a, 1, 0.9)
    report(s, tc, b, 1, 0.1)                            # 2 reached: a is promotable, b waits
    assert (a.status, b.status) == ("PAUSED", "PAUSED")
    # c arrives promotable too (4 reached, top 2 = a, c) but a, paused, ranks higher: c waits
    tc.add("d")
    s.record("d", 1, 0.0)
    assert report(s, tc, c, 1, 0.5) == PAUSE
    assert resume(s, tc) is a and resume(s, tc) is c


def test_paused_trials_no_result_can_promote_end_stopped_early_with_the_reason():
    s, tc = promotion(), FakeController()
    a, b = tc.add("a"), tc.add("b")
    report(s, tc, a, 1, 0.2)
    report(s, tc, b, 1, 0.6)                            # b goes on, a waits
    assert resume(s, tc) is None and tc.stopped == []   # the search may still bring trials
    tc.search_alg.finished = True
    assert resume(s, tc) is None
    assert tc.stopped == ["a"]                          # no trial can reach rung 1 any more
    assert report(s, tc, b, 2, 0.7) == PAUSE            # alone at rung 2
    assert resume(s, tc) is None
    assert tc.stopped == ["a", "b"]
    assert s.state.stops == {"a": "not promoted from rung 1", "b": "not promoted from rung 2"}
    assert a.last_result["stop_reason"] == "not promoted from rung 1"
    assert tc.search_alg.completed["b"]["best_val_acc"] == 0.7  # TPE learns the score


def test_a_paused_trial_waits_while_a_trial_below_its_rung_may_still_arrive():
    s, tc = promotion(), FakeController(finished=True)
    a, b = tc.add("a"), tc.add("b")
    report(s, tc, a, 1, 0.9)                            # a waits; b has not reached rung 1
    assert resume(s, tc) is None and tc.stopped == []
    report(s, tc, b, 1, 0.1)
    assert resume(s, tc) is a                           # 2 reached: a is the top 1


def test_top_k_trains_every_trial_one_epoch_then_the_best_k():
    s = TopKScheduler("training_iteration", "best_val_acc", "max", max_t=3, k=2)
    tc = FakeController()
    trials = [tc.add(x) for x in "abc"] + [tc.add("d", status="PENDING")]
    for t, score in zip(trials[:3], (0.5, 0.9, 0.7), strict=True):
        assert report(s, tc, t, 1, score) == PAUSE
    assert resume(s, tc) is trials[3]                   # the search may bring more: d starts
    tc.search_alg.finished = True
    assert resume(s, tc) is None                        # d has not trained its epoch
    assert report(s, tc, trials[3], 1, 0.8) == PAUSE    # even the last one waits
    assert resume(s, tc).trial_id == "b"
    assert resume(s, tc).trial_id == "d"
    assert resume(s, tc) is None
    assert tc.stopped == ["a", "c"]


def test_a_restore_rebuilds_the_rungs_and_puts_the_waiting_trials_back_in_paused():
    s, tc = promotion(max_t=8), FakeController()
    went_on = tc.add("went_on", status="PENDING")      # Tune's restore makes every unfinished trial PENDING
    went_on.recorded = [{"training_iteration": t, "best_val_acc": 0.5 + t / 10} for t in (1, 2, 3)]
    waiting = tc.add("waiting", status="PENDING")
    waiting.recorded = [{"training_iteration": 1, "best_val_acc": 0.4}]
    new = tc.add("new", status="PENDING")
    for t in (went_on, waiting):
        t.last_result = t.recorded[-1]
    assert s.choose_trial_to_run(tc) is went_on        # resumed mid-way: before a new trial
    assert waiting.status == "PAUSED" and new.status == "PENDING"
    assert s.rungs == {1: {"went_on": 0.6, "waiting": 0.4}, 2: {"went_on": 0.7}, 4: {}}
    assert s.promoted[1] == {"went_on"} and s.promoted[2] == {"went_on"}
    assert s.state.paused == {"waiting"}


def test_the_lane_limiter_does_not_count_paused_trials():
    from ray.tune.search import Searcher

    class Counter(Searcher):
        def suggest(self, trial_id):
            return {"x": 1}

        def on_trial_complete(self, trial_id, result=None, error=False):
            pass

    limiter = LaneLimiter(Counter(metric="m", mode="max"), max_concurrent=2)
    assert limiter.suggest("a") and limiter.suggest("b")
    assert limiter.suggest("c") is None                 # both lanes held
    limiter.paused = {"a"}
    assert limiter.suggest("c")                         # a waits at a rung: its lane is free
    assert limiter.suggest("d") is None


def test_only_a_trainable_that_reads_its_checkpoint_can_be_paused():
    from trainables.ray_trial import trainable

    def no_resume(config, data):
        pass

    def resumes(config, data):
        def inner():
            from ray import tune

            return tune.get_checkpoint()
        return inner

    assert schedulers.resumes_from_checkpoint(trainable)
    assert schedulers.resumes_from_checkpoint(resumes)
    assert not schedulers.resumes_from_checkpoint(no_resume)


# --- the space file --------------------------------------------------------------------

def write(tmp_path, text):
    path = tmp_path / "space.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


@pytest.mark.parametrize("text, culprit", [
    ("scheduler: {type: hyperband}\n", "scheduler.type: unknown scheduler 'hyperband'"),
    ("scheduler: {type: promotion, grace: 2}\n", "unknown key scheduler.grace"),
    ("scheduler: {type: top_k, reduction_factor: 3}\n", "unknown key scheduler.reduction_factor"),
    ("scheduler: {type: top_k, k: 0}\n", "scheduler.k must be >= 1"),
    ("scheduler: {type: top_k, k: 2.5}\n", "scheduler.k must be an integer"),
    ("scheduler: {type: promotion, reduction_factor: 1}\n", "scheduler.reduction_factor must be > 1"),
    ("scheduler: {type: promotion, grace_period: fast}\n", "scheduler.grace_period must be an integer"),
    ("scheduler: promotion\n", "'scheduler' must be a mapping with 'type'"),
    ("asha: {grace_period: 1}\nscheduler: {type: asha}\n", "both 'asha' and 'scheduler'"),
])
def test_a_bad_scheduler_names_the_file_and_key(tmp_path, text, culprit):
    from search_spaces.loader import SpaceError, load_space

    path = write(tmp_path, text)
    with pytest.raises(SpaceError) as err:
        load_space(path)
    assert path in str(err.value) and culprit in str(err.value)


def test_a_bad_scheduler_exits_2_before_ray_starts(tmp_path, capsys):
    from sweeps.run import main

    path = write(tmp_path, "scheduler: {type: pbt}\n")
    assert main(["--space", path, "--storage", str(tmp_path / "r"), "--tracking-uri",
                 f"sqlite:///{tmp_path}/m.db"]) == 2
    assert "unknown scheduler 'pbt'" in capsys.readouterr().err
    import ray

    assert not ray.is_initialized()


def test_the_scheduler_setting_reaches_the_tuner(tmp_path):
    from search_spaces.loader import load_space

    assert load_space("lr_decay").scheduler == {"type": "asha", "grace_period": 1, "reduction_factor": 3.0}
    asha = driver.make_scheduler(load_space("lr_decay"), 6)
    assert isinstance(asha, driver.ResumableASHA)
    promoted = driver.make_scheduler(load_space("lr_decay_promotion"), 6)
    assert isinstance(promoted, PromotionScheduler) and promoted.milestones == [1, 3]
    top = driver.make_scheduler(load_space("one_epoch_top_k"), 6)
    assert isinstance(top, TopKScheduler) and (top.k, top.milestones) == (3, [1])


# --- training ----------------------------------------------------------------------------

class Paused(Exception):
    """Stands for Tune stopping the trial's actor once it paused at a rung."""


def test_a_paused_and_resumed_trial_is_bit_for_bit_the_one_that_never_paused(tmp_path):
    folder = write_image_folder(tmp_path / "images", per_class=8)
    handle = DataHandle(scan(folder, val_fraction=0.5), 16, str(tmp_path / "cache"))
    cfg = TrialConfig(model="resnet18", weights="none", image_size=16, lr=0.001, batch_size=4, max_epochs=4,
                      decay_power=1.5, seed=0, augment_strength=0.3, hflip=True)
    straight, first, second = [], [], []
    final = {}

    def keep(into, name):
        def report(metrics, ckpt_dir):
            into.append(metrics)
            final[name] = torch.load(ckpt_dir / CHECKPOINT_FILE, weights_only=True)
        return report

    run_trial(cfg, handle, keep(straight, "straight"), threads=1)

    def pause_at_rung(metrics, ckpt_dir):
        first.append(metrics)
        if metrics["epoch"] == 2:
            (tmp_path / "paused").mkdir()
            (tmp_path / "paused" / CHECKPOINT_FILE).write_bytes((ckpt_dir / CHECKPOINT_FILE).read_bytes())
            raise Paused

    with pytest.raises(Paused):
        run_trial(cfg, handle, pause_at_rung, threads=1)
    run_trial(cfg, handle, keep(second, "resumed"), resume_from=tmp_path / "paused" / CHECKPOINT_FILE, threads=1)

    assert [m["epoch"] for m in first + second] == [1, 2, 3, 4]
    assert all(math.isfinite(m["val_loss"]) for m in straight)  # NaN would equal nothing
    keys = ("train_loss", "val_loss", "val_acc", "lr", "best_val_acc")
    assert [[m[k] for k in keys] for m in first + second] == [[m[k] for k in keys] for m in straight]
    # the learning-rate schedule goes on where it stopped: lr_t = lr (1 - t/T)^γ per step
    assert [m["lr"] for m in second] == pytest.approx(
        [cfg.lr * (1 - e / cfg.max_epochs) ** cfg.decay_power for e in (3, 4)], abs=1e-12)
    a, b = final["straight"], final["resumed"]
    for part in ("model", "optimizer", "scheduler", "generator", "state"):
        assert_identical(a[part], b[part], part)


def assert_identical(a, b, where):
    """Equal to the last bit: tensors by torch.equal, everything else by ==."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}/{i}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


def test_the_live_status_counts_paused_trials_apart():
    from sweeps.tune.progress import counts, status_line

    trials = [SimpleNamespace(status=s, last_result={"epoch": 1}, metric_analysis={}, trial_id=i)
              for i, s in enumerate(("RUNNING", "PAUSED", "PAUSED", "PENDING"))]
    c = counts(trials, 3)
    assert (c["running"], c["paused"], c["pending"]) == (1, 2, 1)
    assert "1 running, 2 paused, 1 pending" in status_line(trials, 3, total=4, elapsed=5)
