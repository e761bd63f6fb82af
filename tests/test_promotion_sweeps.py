"""Promotion sweeps end to end: trials paused at a rung and resumed later keep one
continuous history in MLflow; a trainable that cannot resume is refused before any trial
starts; a killed promotion sweep resumes with its paused trials still paused. The
scheduler's decisions on scripted results are in tests/test_schedulers.py."""

import pytest

PROMOTION_SPACE = """\
description: promotion on the test fixtures' tiny data
trials: 6
seed: 0
search:
  lr: {type: loguniform, low: 1.0e-3, high: 0.1}
  decay_power: {type: uniform, low: 0.5, high: 2.0}
fixed:
  batch_size: 3
  max_epochs: 3
scheduler: {type: promotion, grace_period: 1, reduction_factor: 2}
tpe: {n_startup_trials: 2}
"""


def promotion_plan(tmp_path, image_folder, name):
    from sweeps.cli import build_parser
    from sweeps.plan.prepare import prepare

    space = tmp_path / "promotion.yaml"
    space.write_text(PROMOTION_SPACE)
    # one lane: the trials reach each rung in one order, so the decisions are the same every run
    return prepare(build_parser().parse_args([
        "--space", str(space), "--data", str(image_folder), "--val-fraction", "0.5", "--weights", "none",
        "--image-size", "16", "--max-concurrent", "1", "--name", name, "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
        "--storage", str(tmp_path / "results")]))


@pytest.mark.slow
def test_a_promotion_sweep_pauses_and_resumes_trials_with_one_continuous_history(tmp_path, image_folder,
                                                                                   cache_dir):
    import ray
    from mlflow.tracking import MlflowClient

    from sweeps.records.state import SweepState
    from sweeps.run import execute

    plan = promotion_plan(tmp_path, image_folder, "promo")
    state = SweepState(str(plan.sweep_dir))
    try:
        info = execute(plan, state=state)
    finally:
        ray.shutdown()
    assert info["trials"]["errored"] == 0 and sum(info["trials"].values()) == 6
    assert info["trials"]["completed"] >= 1 and info["trials"]["paused"] == 0  # none left waiting

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([info["experiment_id"]], "tags.`ftsweep.role` = 'trial'")
    assert len(runs) == 6
    resumed = []
    for run in runs:
        tags = run.data.tags
        trial_id = tags["ftsweep.trial_id"]
        assert tags["outcome"] in ("completed", "stopped_early")
        for key in ("val_acc", "lr", "train_loss"):  # epochs 1..N, each once
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            assert steps == list(range(1, len(steps) + 1)), (trial_id, key, steps)
        epochs = len(steps)
        paused_at = [int(r) for r in tags.get("ftsweep.paused_at", "").split(",") if r]
        assert paused_at == state.pauses.get(trial_id, [])
        if tags["outcome"] == "stopped_early":
            assert paused_at and epochs == paused_at[-1]  # ended where it last waited
            assert tags["stop_reason"] == f"not promoted from rung {epochs}"
        if paused_at and epochs > paused_at[0]:
            resumed.append((run, paused_at))
    assert resumed, "no trial was paused and later resumed"
    for run, _ in resumed:  # the learning rate went on where it stopped
        params = run.data.params
        lrs = sorted(client.get_metric_history(run.info.run_id, "lr"), key=lambda m: m.step)
        lr, power = float(params["lr"]), float(params["decay_power"])
        assert [m.value for m in lrs] == pytest.approx([lr * (1 - m.step / 3) ** power for m in lrs], abs=1e-9)
    times = [t for t, _ in info["anytime"]]
    bests = [b for _, b in info["anytime"]]
    assert times == sorted(times) and bests == sorted(bests) and bests[-1] == info["best"]["val_acc"]


@pytest.mark.slow
def test_promotion_refuses_a_trainable_that_cannot_resume_before_any_trial_starts(tmp_path, image_folder,
                                                                                  cache_dir):
    import ray
    from mlflow.tracking import MlflowClient

    from sweeps.errors import UsageError
    from sweeps.run import execute

    def never_resumes(config, data):
        from ray import tune

        tune.report({"epoch": 1, "val_acc": 0.5, "best_val_acc": 0.5})

    plan = promotion_plan(tmp_path, image_folder, "refused")
    try:
        with pytest.raises(UsageError, match="never_resumes never reads one"):
            execute(plan, trainable=never_resumes)
    finally:
        ray.shutdown()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert client.search_runs(experiments, "") == []  # no sweep was opened: no parent run, no trial run


@pytest.mark.slow
def test_a_killed_promotion_sweep_resumes_with_its_paused_trials_paused(tmp_path, image_folder, cache_dir):
    import contextlib
    import json
    import os
    import signal
    import subprocess
    import time
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    from conftest import ROOT, RUN, shift_newest_checkpoint, stop_group

    space = tmp_path / "promotion.yaml"
    space.write_text(PROMOTION_SPACE)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = [*RUN, "--space", str(space), "--data", str(image_folder), "--val-fraction", "0.5", "--weights", "none",
            "--image-size", "16", "--max-concurrent", "1", "--name", "killed", "--tracking-uri", uri,
            "--storage", str(tmp_path / "r")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    driver_proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=open(tmp_path / "first.log", "w"),
                                   stderr=subprocess.STDOUT, start_new_session=True)
    client = MlflowClient(uri)

    def trial_runs():
        experiments = [e.experiment_id for e in client.search_experiments()]
        return client.search_runs(experiments, "tags.`ftsweep.sweep` = 'killed' and tags.`ftsweep.role` = 'trial'")

    try:
        def paused() -> set[str]:
            return {r.data.tags["ftsweep.trial_id"] for r in trial_runs() if r.data.tags.get("outcome") == "paused"}

        def snapshot() -> int:  # when Tune last wrote its record of the trials
            return max((f.stat().st_mtime_ns for f in (tmp_path / "r" / "killed").glob("experiment_state-*.json")),
                       default=0)

        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and driver_proc.poll() is None:
            seen = paused()
            if not seen:
                time.sleep(0.5)
                continue
            before = snapshot()
            while snapshot() <= before and driver_proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)  # until Tune has recorded the trials once more
            if seen & paused():  # still waiting after a snapshot (a promoted one would not be): kill now
                break
        assert driver_proc.poll() is None, "the sweep finished before it could be killed"
        os.kill(driver_proc.pid, signal.SIGKILL)  # the driver dies without any cleanup
        driver_proc.wait()
    finally:
        stop_group(driver_proc)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver_proc.pid, signal.SIGKILL)  # the local Ray the killed driver started
    paused_before = {r.data.tags["ftsweep.trial_id"] for r in trial_runs() if r.data.tags["outcome"] == "paused"}
    assert paused_before
    # the record names a checkpoint of a paused trial that is gone; a newer one is in its folder
    shifted = sorted(paused_before)[0]
    old, new = shift_newest_checkpoint(tmp_path / "r" / "killed" / f"trial_{shifted}")

    again = subprocess.run([*args, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"trial {shifted}: its recorded checkpoint {old} is gone; it resumes from the newer {new}" in again.stdout
    rebuilt = [line for line in again.stdout.splitlines() if line.startswith("PromotionScheduler: rungs rebuilt")]
    assert rebuilt and int(rebuilt[0].split("; ")[1].split()[0]) >= 1, again.stdout[-3000:]  # back in PAUSED
    summary = json.loads(Path(again.stdout.strip().splitlines()[-1]).read_text())
    assert sum(summary["trials"].values()) == 6 and summary["trials"]["errored"] == 0
    runs = trial_runs()
    assert len(runs) == 6
    for run in runs:
        assert run.data.tags["outcome"] in ("completed", "stopped_early")
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_acc"))
        assert steps == list(range(1, len(steps) + 1)), (run.info.run_name, steps)
