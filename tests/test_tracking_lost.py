"""The tracking server dies during a sweep: training goes on, nothing is silently dropped."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import RUN, free_port, stop_group, wait_http

pytestmark = pytest.mark.slow


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
