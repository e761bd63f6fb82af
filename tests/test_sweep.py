"""A real sweep through Ray Tune (OptunaSearch + ASHA) against a real MLflow server, checked
with MlflowClient the way a user's script would."""

import json
from pathlib import Path

import mlflow
import pytest
import torch
import torchvision
from mlflow.tracking import MlflowClient

from trainables import demo
from trainables.config import TrialConfig
from trainables.data import DataHandle, scan
from trainables.pipeline import Batches

from conftest import run_sweep

pytestmark = pytest.mark.slow
TRIALS = 4


@pytest.fixture(scope="module")
def sweep(mlflow_server, cache_dir, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("sweep")
    proc = run_sweep(["--space", "smoke", "--trials", str(TRIALS), "--name", "itest",
                      "--tracking-uri", mlflow_server, "--storage", str(cwd / "results")], cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary_path = Path(proc.stdout.strip().splitlines()[-1])
    assert summary_path.name == "sweep_summary.json"
    return json.loads(summary_path.read_text()), MlflowClient(mlflow_server), cwd


def children(client, summary):
    return client.search_runs([summary["experiment_id"]],
                              f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'")


def test_summary_accounts_for_every_trial(sweep):
    summary, _, _ = sweep
    assert {"name", "space", "tracking_uri", "experiment_id", "parent_run_id", "trials", "wall_s",
            "total_trial_epochs", "best"} <= set(summary)
    assert summary["name"] == "itest" and summary["space"] == "smoke"
    assert sum(summary["trials"].values()) == TRIALS and summary["trials"]["errored"] == 0
    assert TRIALS <= summary["total_trial_epochs"] <= TRIALS * 3
    assert set(summary["best"]) >= {"config", "val_acc", "epoch", "run_id", "checkpoint"}


def test_one_parent_and_one_child_per_trial(sweep):
    summary, client, _ = sweep
    # The server is shared with other tests: this sweep's parent is the one with its name.
    parents = client.search_runs([summary["experiment_id"]],
                                 "tags.`ftsweep.role` = 'parent' and tags.`ftsweep.sweep` = 'itest'")
    assert [p.info.run_id for p in parents] == [summary["parent_run_id"]]
    tags = parents[0].data.tags
    assert tags["space"] == "smoke" and tags["model"] == "resnet18"
    assert tags["dataset_fingerprint"] and tags["git_commit"]
    runs = children(client, summary)
    assert len(runs) == TRIALS
    assert len({r.data.tags["ftsweep.trial_id"] for r in runs}) == TRIALS


def test_child_runs_carry_config_metric_history_and_outcome(sweep):
    summary, client, _ = sweep
    runs = children(client, summary)
    outcomes = [r.data.tags["outcome"] for r in runs]
    assert {o: outcomes.count(o) for o in set(outcomes)} == {
        k: v for k, v in summary["trials"].items() if v}
    assert "stopped_early" in outcomes  # ASHA did stop someone
    for run in runs:
        assert set(run.data.params) == set(TrialConfig.keys())
        history = client.get_metric_history(run.info.run_id, "val_acc")
        steps = [m.step for m in history]
        assert steps == list(range(1, len(steps) + 1))
        if run.data.tags["outcome"] == "completed":
            assert len(steps) == 3
        else:
            assert len(steps) < 3 and run.data.tags["stop_reason"] == "asha"
        for key in ("val_loss", "train_loss", "lr"):
            assert len(client.get_metric_history(run.info.run_id, key)) == len(steps)


def test_a_finished_sweep_keeps_only_the_best_trials_best_checkpoint(sweep):
    summary, _, cwd = sweep
    trial_dirs = list((cwd / "results" / "itest").glob("trial_*"))
    assert len(trial_dirs) == TRIALS
    left = [c for d in trial_dirs for c in d.glob("checkpoint_*")]
    # --keep-checkpoints 1 (default): every trial ended, so --resume needs none of them
    assert len(left) == 1
    kept = torch.load(left[0] / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert kept["state"]["best_val_acc"] == pytest.approx(summary["best"]["val_acc"])
    on_disk = sum(f.stat().st_size for f in left[0].rglob("*") if f.is_file())
    assert summary["checkpoints"]["kept"] == 1 and summary["checkpoints"]["bytes_kept"] == on_disk
    assert summary["checkpoints"]["freed"] >= TRIALS - 1 and summary["checkpoints"]["bytes_freed"] > 0
    assert summary["checkpoint_bytes"] == on_disk


def test_trial_results_are_written_once_as_json(sweep):
    _, _, cwd = sweep
    for trial_dir in (cwd / "results" / "itest").glob("trial_*"):
        assert (trial_dir / "result.json").stat().st_size > 0
        # MLflow holds the metrics: no CSV or TensorBoard copies of them
        assert not list(trial_dir.glob("progress.csv")) + list(trial_dir.glob("events.out.tfevents*"))


def test_best_checkpoint_loads_and_reproduces_its_val_acc(sweep, tmp_path):
    summary, client, _ = sweep
    local = Path(mlflow.artifacts.download_artifacts(
        run_id=summary["parent_run_id"], artifact_path="best", dst_path=str(tmp_path),
        tracking_uri=client._tracking_client.tracking_uri))
    meta = json.loads((local / "meta.json").read_text())
    assert {"model", "classes", "image_size", "mean", "std", "config", "val_acc"} <= set(meta)
    model = torchvision.models.get_model(meta["model"], num_classes=len(meta["classes"]))
    model.load_state_dict(torch.load(local / "model.pt", weights_only=True))
    model.eval()
    ds = scan(demo.transfer_folder(), val_fraction=0.2, seed=meta["config"]["seed"])
    assert list(ds.classes) == meta["classes"]
    x, y = DataHandle(ds, meta["image_size"], str(tmp_path / "decoded")).arrays("val")
    correct = 0
    with torch.no_grad():
        for images, labels in Batches(x, y, 64, mean=meta["mean"], std=meta["std"], shuffle=False):
            correct += (model(images).argmax(1) == labels).sum().item()
    assert correct / len(y) == pytest.approx(meta["val_acc"], abs=1e-9)
    assert meta["val_acc"] == pytest.approx(summary["best"]["val_acc"])
    logged = client.get_metric_history(summary["best"]["run_id"], "val_acc")
    assert max(m.value for m in logged) == pytest.approx(meta["val_acc"])

