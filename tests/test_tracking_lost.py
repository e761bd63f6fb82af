"""The tracking server dies during a sweep: training goes on, nothing is silently dropped."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from conftest import RUN, free_port, stop_group, wait_http

pytestmark = pytest.mark.slow


def orphaned_writers(since: float) -> list[psutil.Process]:
    """The MLflow writer processes started since ``since`` (a killed driver's, to wait for:
    they spool what they hold, then exit)."""
    out = []
    for p in psutil.process_iter(["cmdline", "create_time"]):
        cmd = p.info["cmdline"] or []
        if p.info["create_time"] >= since and any(c.endswith("sweeps/records/writer.py") for c in cmd):
            out.append(p)
    return out


def test_sweep_finishes_and_keeps_what_it_could_not_log(tmp_path, cache_dir):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--workers", "1",
         "--artifacts-destination", str(tmp_path / "artifacts")],
        cwd=tmp_path, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    sweep = None
    try:
        wait_http(f"{uri}/health", proc=server)
        sweep = subprocess.Popen([*RUN, "--space", "smoke", "--trials", "4", "--name", "lost",
                                  "--tracking-uri", uri, "--storage", str(tmp_path / "results")],
                                 cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, start_new_session=True)
        client = MlflowClient(uri)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # wait for the first logged epoch
            runs = client.search_runs(["1"], "tags.`ftsweep.role` = 'trial'") if sweep.poll() is None else []
            if any(r.data.metrics for r in runs):
                break
            time.sleep(0.5)
        stop_group(server)  # the server goes away mid-sweep
        out, _ = sweep.communicate(timeout=600)
    finally:
        stop_group(server)
        if sweep is not None:
            stop_group(sweep)
    assert sweep.returncode == 0, out[-3000:]
    summary = json.loads(Path(out.strip().splitlines()[-1]).read_text())
    assert sum(summary["trials"].values()) == 4  # training went on
    assert summary["unlogged_mlflow_writes"] > 0
    assert "MLflow writes could not be sent" in out
    spool = Path(summary["sweep_dir"]) / "mlflow_pending.jsonl"
    pending = [json.loads(line) for line in spool.read_text().splitlines()]
    assert len(pending) == summary["unlogged_mlflow_writes"]
    assert any(p["op"] == "batch" and p["metrics"] for p in pending)  # the epochs it could not send
    assert Path(summary["best"]["checkpoint"]).exists()  # and the best model is on disk


def _server(tmp_path: Path, port: int) -> subprocess.Popen:
    """``mlflow server`` on 127.0.0.1:port over the same store each time it is started."""
    return subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--workers", "1",
         "--artifacts-destination", str(tmp_path / "artifacts")],
        cwd=tmp_path, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _epochs_recorded(sweep_dir: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in sweep_dir.glob("trial_*/result.json"))


def test_server_lost_then_driver_killed_then_resume_logs_every_epoch_once(tmp_path, cache_dir):
    """The writes held while the server was away survive the driver's death and are sent by
    --resume, before its own: every trial's whole history, each epoch once."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    sweep_dir = tmp_path / "results" / "twice"
    args = [*RUN, "--space", "smoke", "--trials", "6", "--max-concurrent", "2", "--name", "twice",
            "--tracking-uri", uri, "--storage", str(tmp_path / "results")]
    server = _server(tmp_path, port)
    driver = None
    try:
        wait_http(f"{uri}/health", proc=server)
        started = time.time() - 1
        driver = subprocess.Popen(args, cwd=tmp_path, stdout=open(tmp_path / "first.log", "w"),
                                  stderr=subprocess.STDOUT, start_new_session=True)
        client = MlflowClient(uri)
        deadline = time.monotonic() + 900  # a first run pretrains the demo backbone
        while time.monotonic() < deadline and driver.poll() is None:  # the first logged epoch
            if any(r.data.metrics for r in client.search_runs(["1"], "tags.`ftsweep.role` = 'trial'")):
                break
            time.sleep(0.5)
        else:
            pytest.fail("no epoch was logged:\n" + (tmp_path / "first.log").read_text()[-3000:])
        stop_group(server)  # the server goes away mid-sweep
        deadline = time.monotonic() + 300
        seen = _epochs_recorded(sweep_dir)
        while time.monotonic() < deadline and driver.poll() is None and _epochs_recorded(sweep_dir) < seen + 3:
            time.sleep(0.2)  # epochs trained, and held by the writer, while the server is away
        assert driver.poll() is None, "the sweep ended before it could be killed"
        assert _epochs_recorded(sweep_dir) >= seen + 3, "no epochs were trained while the server was away"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        stop_group(server)
        if driver is not None:
            stop_group(driver)  # and its local Ray; the MLflow writer has a group of its own
    spool = sweep_dir / "mlflow_pending.jsonl"
    # the orphaned writer spools what it holds, then exits: wait for its exit
    psutil.wait_procs(orphaned_writers(started), timeout=120)
    assert spool.exists()
    pending = [json.loads(line) for line in spool.read_text().splitlines()]
    assert any(p["op"] == "batch" and p.get("metrics") for p in pending)

    server = _server(tmp_path, port)  # the server is back
    try:
        wait_http(f"{uri}/health", proc=server)
        again = subprocess.run([*args, "--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        summary = json.loads(Path(again.stdout.strip().splitlines()[-1]).read_text())
        assert summary["unlogged_mlflow_writes"] == 0 and not spool.exists()
        assert sum(summary["trials"].values()) == 6
        client = MlflowClient(uri)
        runs = client.search_runs(["1"], "tags.`ftsweep.sweep` = 'twice' and tags.`ftsweep.role` = 'trial'")
        assert len(runs) == 6
        for run in runs:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
            trial_dir = sweep_dir / f"trial_{run.data.tags['ftsweep.trial_id']}"
            ran = max(json.loads(line)["epoch"] for line in (trial_dir / "result.json").read_text().splitlines())
            assert steps == list(range(1, ran + 1)), (run.info.run_name, steps, ran)
            assert run.data.tags["outcome"] in ("completed", "stopped_early")
    finally:
        stop_group(server)
