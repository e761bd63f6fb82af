"""Trials that raise, fail once, or diverge: the sweep goes on and accounts for each."""

import os
from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient

from sweeps.cli import build_parser
from sweeps.plan.prepare import prepare
from sweeps.run import execute

pytestmark = pytest.mark.slow


def make_flaky(folder: Path):
    """A trainable whose trials, in the order they first start, raise every time, fail
    once after epoch 1, diverge, and behave. Defined in a function so that Ray pickles it
    by value."""
    def flaky(config, data):
        from ray import tune

        from trainables.ray_trial import trainable
        from trainables.train import CHECKPOINT_FILE, run_trial

        trial_id = tune.get_context().get_trial_id()
        role_file = folder / f"role-{trial_id}"
        if not role_file.exists():
            for role in ("raises", "fails_once", "diverges", "behaves"):
                try:
                    os.close(os.open(folder / f"claim-{role}", os.O_CREAT | os.O_EXCL))
                except FileExistsError:
                    continue
                role_file.write_text(role)
                break
        role = role_file.read_text()
        if role == "raises":
            raise ValueError("permanent failure for testing")
        if role == "diverges":
            return trainable({**config, "lr": 1e12, "decay_power": 0.0}, data)
        if role == "fails_once" and tune.get_checkpoint() is None:
            def report_then_fail(metrics, ckpt_dir):
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(ckpt_dir))
                raise RuntimeError("transient failure for testing")
            return run_trial(config, data, report_then_fail, threads=1)
        if role == "fails_once":
            with tune.get_checkpoint().as_directory() as d:
                import torch
                epoch = torch.load(Path(d) / CHECKPOINT_FILE, weights_only=True)["state"]["epoch"]
            (folder / "resumed-from-epoch").write_text(str(epoch))
        return trainable(config, data)
    return flaky


def test_failing_trials_are_retried_or_recorded_and_the_sweep_goes_on(tmp_path, cache_dir):
    args = build_parser().parse_args([
        "--space", "smoke", "--trials", "4", "--max-concurrent", "1", "--name", "flaky",
        "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--storage", str(tmp_path / "results"),
        "--set", "max_epochs=2", "--max-failures", "1"])
    try:
        info = execute(prepare(args), trainable=make_flaky(tmp_path))
    finally:
        ray.shutdown()
    assert info["trials"]["errored"] == 2 and sum(info["trials"].values()) == 4
    assert info["best"] is not None

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([info["experiment_id"]], "tags.`ftsweep.role` = 'trial'")
    by_role = {(tmp_path / f"role-{r.data.tags['ftsweep.trial_id']}").read_text(): r for r in runs}
    assert set(by_role) == {"raises", "fails_once", "diverges", "behaves"}

    raised = by_role["raises"]
    assert (raised.info.status, raised.data.tags["outcome"]) == ("FAILED", "errored")
    assert "permanent failure for testing" in raised.data.tags["error"]

    diverged = by_role["diverges"]
    assert (diverged.info.status, diverged.data.tags["outcome"]) == ("FAILED", "errored")
    assert "loss became" in diverged.data.tags["error"]

    # Retried once, from the checkpoint of its first epoch, and logged without repeats.
    retried = by_role["fails_once"]
    assert (tmp_path / "resumed-from-epoch").read_text() == "1"
    assert retried.data.tags["outcome"] in ("completed", "stopped_early")
    steps = [m.step for m in client.get_metric_history(retried.info.run_id, "val_acc")]
    assert steps == list(range(1, len(steps) + 1))
