"""A sweep's decisions live in its own SweepState: two sweeps run one after the other in
one process each get their own outcomes and summaries, with nothing reset in between."""

import pytest
from mlflow.tracking import MlflowClient

from sweeps.cli import build_parser
from sweeps.plan.prepare import prepare
from sweeps.records.state import SweepState

pytestmark = pytest.mark.slow

TOP_K = """\
seed: 0
search:
  lr: {type: loguniform, low: 1.0e-3, high: 1.0e-1}
fixed: {batch_size: 3, max_epochs: 2}
scheduler: {type: top_k, k: 1, rung: 1}
tpe: {n_startup_trials: 2}
"""
ASHA_NEVER_STOPS = """\
seed: 1
search:
  lr: {type: loguniform, low: 1.0e-3, high: 1.0e-1}
fixed: {batch_size: 3, max_epochs: 2}
asha: {grace_period: 2, reduction_factor: 2}
"""


def plan_of(tmp_path, image_folder, name, space_text, trials, *extra):
    space = tmp_path / f"{name}.yaml"
    space.write_text(space_text)
    return prepare(build_parser().parse_args([
        "--space", str(space), "--data", str(image_folder), "--val-fraction", "0.5", "--weights", "none",
        "--image-size", "16", "--trials", str(trials), "--max-concurrent", "1", "--name", name,
        # a store per sweep, named after it: pytest may give a later test this test's folder again,
        # and MLflow keeps an engine per URI open in the process
        "--tracking-uri", f"sqlite:///{tmp_path}/{name}.db", "--storage", str(tmp_path / "results"), *extra]))


def outcomes_in_mlflow(tmp_path, info) -> dict[str, tuple[str, str]]:
    client = MlflowClient(f"sqlite:///{tmp_path}/{info['name']}.db")
    runs = client.search_runs([info["experiment_id"]],
                              f"tags.`mlflow.parentRunId` = '{info['parent_run_id']}'")
    return {r.data.tags["ftsweep.trial_id"]: (r.data.tags["outcome"], r.data.tags.get("stop_reason", ""))
            for r in runs}


def test_two_sweeps_in_one_process_keep_their_own_records(tmp_path, image_folder, cache_dir):
    import ray

    from sweeps.run import execute

    first, second = SweepState("first"), SweepState("second")
    try:
        info_a = execute(plan_of(tmp_path, image_folder, "first", TOP_K, 3), state=first)
        info_b = execute(plan_of(tmp_path, image_folder, "second", ASHA_NEVER_STOPS, 2, "--time-budget", "3600"),
                         state=second)
    finally:
        ray.shutdown()

    # top_k, k=1: every trial trains to epoch 1 and waits; the best goes on, the rest end there
    assert info_a["trials"] == {"completed": 1, "stopped_early": 2, "time_budget": 0, "errored": 0,
                                "paused": 0, "interrupted": 0}
    tagged_a = outcomes_in_mlflow(tmp_path, info_a)
    assert sorted(tagged_a.values()) == [("completed", ""), ("stopped_early", "not promoted from rung 1"),
                                         ("stopped_early", "not promoted from rung 1")]
    assert set(first.stops) == {t for t, (o, _) in tagged_a.items() if o == "stopped_early"}

    # the second sweep has a time budget it never reaches and a grace period ASHA cannot cut
    # before: every trial completed, none counted against the first sweep's stops
    assert info_b["trials"] == {"completed": 2, "stopped_early": 0, "time_budget": 0, "errored": 0,
                                "paused": 0, "interrupted": 0}
    assert sorted(outcomes_in_mlflow(tmp_path, info_b).values()) == [("completed", ""), ("completed", "")]
    assert second.stops == {} and not second.clock_ran_out and not set(second.pauses) & set(tagged_a)
    assert info_a["parent_run_id"] != info_b["parent_run_id"]


CLOCK = """\
seed: 0
search:
  lr: {type: loguniform, low: 1.0e-3, high: 1.0e-1}
fixed: {batch_size: 3, frozen_depth: 0, max_epochs: 300}
asha: {grace_period: 300, reduction_factor: 2}
"""


def test_a_time_budget_cut_is_recorded_as_the_clocks_everywhere(tmp_path, image_folder, cache_dir, capsys):
    """ASHA cannot stop anything before epoch 300: only the clock ends these trials. Ray Tune
    ends them without on_trial_complete; the records still name the clock."""
    import ray

    from sweeps.run import execute

    state = SweepState("clock")
    plan = plan_of(tmp_path, image_folder, "clock", CLOCK, 2, "--time-budget", "20", "--max-concurrent", "2")
    try:
        info = execute(plan, state=state)
    finally:
        ray.shutdown()
    started = outcomes_in_mlflow(tmp_path, info)
    assert state.clock_ran_out and started
    assert set(started.values()) == {("time_budget", "time_budget")}
    assert info["trials"]["time_budget"] == len(started) and info["trials"]["stopped_early"] == 0
    assert f"{len(started)} cut by the time budget" in capsys.readouterr().out


PATIENCE = """\
seed: 0
search:
  lr: {type: loguniform, low: 1.0e-12, high: 2.0e-12}
fixed: {batch_size: 3, frozen_depth: 5, max_epochs: 4, patience: 1}
asha: {grace_period: 4, reduction_factor: 2}
"""


@pytest.mark.parametrize("space, trials, cause", [(PATIENCE, 2, "patience")])
def test_a_stop_is_recorded_with_its_own_cause(tmp_path, image_folder, cache_dir, capsys, space, trials, cause):
    """Patience alone can stop these trials: an lr too small to change anything, and ASHA's
    grace period the whole budget."""
    import ray

    from sweeps.run import execute

    try:
        info = execute(plan_of(tmp_path, image_folder, cause, space, trials))
    finally:
        ray.shutdown()
    tagged = outcomes_in_mlflow(tmp_path, info)
    stopped = [t for t, (o, _) in tagged.items() if o == "stopped_early"]
    assert stopped and {tagged[t][1] for t in stopped} == {cause}
    assert {o for o, _ in tagged.values()} <= {"completed", "stopped_early"}
    assert info["trials"]["stopped_early"] == len(stopped) and info["trials"]["time_budget"] == 0
    assert info["trials"]["completed"] == len(tagged) - len(stopped)
    assert f"{len(stopped)} stopped early" in capsys.readouterr().out
