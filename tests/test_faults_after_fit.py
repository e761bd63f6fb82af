"""A fault once the trials are done (exporting the best model, logging it, retaining
checkpoints, waiting for MLflow's writes) never leaves the sweep's MLflow run RUNNING: an
error ends it FAILED with its message, a signal KILLED with the signal's exit code, and
--resume finishes what was left."""

import os
import signal

import pytest
from mlflow.tracking import MlflowClient

from sweeps.run import main

pytestmark = pytest.mark.slow

SPACE = """\
seed: 0
search:
  lr: {type: loguniform, low: 1.0e-3, high: 1.0e-1}
fixed: {batch_size: 3, max_epochs: 1}
"""


@pytest.fixture(scope="module", autouse=True)
def one_ray():
    import ray

    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store for the module's sweeps, as a user has (sweep names tell them apart)."""
    return tmp_path_factory.mktemp("faults")


@pytest.fixture
def tmp_path(store, monkeypatch):  # noqa: F811 - every sweep of the module in the one store
    monkeypatch.chdir(store)  # MLflow's default artifact root, ./mlruns, goes there too
    return store


def sweep_args(tmp_path, image_folder, name):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    return ["--space", str(space), "--data", str(image_folder), "--val-fraction", "0.5", "--weights", "none",
            "--image-size", "16", "--trials", "1", "--name", name, "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
            "--storage", str(tmp_path / "results")]


def parent(tmp_path, name):
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.`ftsweep.sweep` = '{name}' and tags.`ftsweep.role` = 'parent'")
    assert len(runs) == 1
    return runs[0]


def fault(kind: str):
    def raise_it(*args, **kwargs):
        if kind == "error":
            raise RuntimeError("disk on fire")
        if kind == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        raise KeyboardInterrupt
    return raise_it


@pytest.mark.parametrize("phase, kind, code, status", [
    ("sweeps.results.summary.export_readable_best", "error", 1, "FAILED"),
    ("sweeps.records.best_model.log_model", "sigterm", 128 + signal.SIGTERM, "KILLED"),
    ("sweeps.results.retention.retain", "ctrl_c", 128 + signal.SIGINT, "KILLED"),
])
def test_a_fault_after_the_fit_ends_the_run_and_resume_finishes_it(tmp_path, image_folder, cache_dir, monkeypatch,
                                                                    capsys, phase, kind, code, status):
    name = f"after-{kind}"
    module, _, attr = phase.rpartition(".")
    with monkeypatch.context() as m:
        m.setattr(f"{module}.{attr}", fault(kind))
        assert main(sweep_args(tmp_path, image_folder, name)) == code
    said = capsys.readouterr().err
    told = [line for line in said.splitlines() if "is marked" in line]  # one line says it all
    assert len(told) == 1 and f"is marked {status}" in told[0] and "--resume" in told[0]
    assert "in raise_it" not in said  # no traceback of ours
    run = parent(tmp_path, name)
    assert run.info.status == status
    reason = run.data.tags["stop_reason"]
    assert ("disk on fire" in reason) if kind == "error" else ("interrupted by SIG" in reason)

    assert main([*sweep_args(tmp_path, image_folder, name), "--resume"]) == 0
    assert parent(tmp_path, name).info.status == "FINISHED"
    assert (tmp_path / "results" / name / "sweep_summary.json").exists()


def test_ctrl_c_while_waiting_for_mlflow_leaves_the_writer_to_finish(tmp_path, image_folder, cache_dir, monkeypatch):
    from sweeps.records.writer import WriterProcess

    waited = []
    real_close = WriterProcess.close

    def interrupted(self, *args, **kwargs):
        waited.append(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(WriterProcess, "close", interrupted)
    assert main(sweep_args(tmp_path, image_folder, "waiting")) == 128 + signal.SIGINT
    monkeypatch.setattr(WriterProcess, "close", real_close)
    assert waited[-1]._proc.wait(120) == 0  # it sent everything once the driver stopped waiting
    assert parent(tmp_path, "waiting").info.status == "FINISHED"  # the sweep's end was queued already
