"""Shared fixtures: a real MLflow server on 127.0.0.1, a tiny ImageFolder, the demo cache."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(ROOT / "sweeps" / "run.py")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 90, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def stop_group(proc: subprocess.Popen) -> None:
    """Stop what a test started: its own process group, never processes found by name."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """The demo's cache (digits PNGs, pretrained backbone, decoded arrays), shared by tests.

    Reuses $FTSWEEP_CACHE when set, so CI and developers pretrain the backbone once."""
    path = Path(os.environ.get("FTSWEEP_CACHE") or tmp_path_factory.mktemp("ftsweep-cache"))
    os.environ["FTSWEEP_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1 with its own sqlite store; yields its URI."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        cwd=root, env=env, stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", proc=proc)
        yield uri
    finally:
        stop_group(proc)


def write_image_folder(root: Path, classes=("cat", "dog"), per_class: int = 6, size: int = 20,
                       seed: int = 0) -> Path:
    """A small ImageFolder whose classes differ in colour, in assorted modes and formats."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.zeros((size, size + 4, 3), np.uint8)
            base[..., c % 3] = 200
            img = Image.fromarray(np.clip(base + rng.integers(0, 40, base.shape), 0, 255).astype(np.uint8))
            mode, ext = [("RGB", "jpg"), ("L", "png"), ("RGBA", "png"), ("P", "png")][i % 4]
            img.convert(mode).save(folder / f"{i}.{ext}")
    return root


@pytest.fixture
def mlflow_env(monkeypatch):
    """predict/export main() and load_best set these MLflow variables for their process;
    undo them after each test."""
    for name, value in [("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1"), ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30"),
                        ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")]:
        monkeypatch.setenv(name, value)


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return write_image_folder(tmp_path / "images")


def assert_help_documents_every_flag(main, build_parser, capsys) -> None:
    """``main(["--help"])`` exits 0 and shows every flag, and every flag has a help text."""
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for action in build_parser()._actions:
        assert action.help, action.option_strings
        assert all(flag in out for flag in action.option_strings)


def collect(into: list, keep_dir: Path | None = None):
    """A trial ``report`` that keeps the metrics and, optionally, a copy of each checkpoint."""
    import shutil

    from trainables.train import CHECKPOINT_FILE

    def report(metrics, ckpt_dir):
        into.append(metrics)
        if keep_dir is not None:
            shutil.copy(ckpt_dir / CHECKPOINT_FILE, keep_dir / f"epoch{metrics['epoch']}.pt")
    return report


DEMO_SWEEP = "demo-sweep"


@pytest.fixture(scope="session")
def demo_sweep(cache_dir, tmp_path_factory) -> tuple[dict, str]:
    """A 2-trial smoke sweep on the digits demo, named ``DEMO_SWEEP`` and logged to its own
    sqlite store, shared by tests that leave the sweep as it is (they may add runs of other
    names to the store): (its sweep_summary.json, the tracking URI)."""
    import json

    cwd = tmp_path_factory.mktemp(DEMO_SWEEP)
    uri = f"sqlite:///{cwd}/mlflow.db"
    proc = run_sweep(["--space", "smoke", "--trials", "2", "--max-epochs", "2", "--name", DEMO_SWEEP,
                      "--tracking-uri", uri, "--storage", str(cwd / "results")], cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(Path(proc.stdout.strip().splitlines()[-1]).read_text()), uri


def run_sweep(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 600):
    """Run ``sweeps/run.py`` as a user would; returns the CompletedProcess."""
    return subprocess.run([*RUN, *args], cwd=cwd, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def shift_newest_checkpoint(trial_dir: Path) -> tuple[str, str]:
    """Make a killed sweep's record of a trial older than the trial's folder, as a kill just
    after Ray Tune replaced the trial's checkpoint leaves it: the newest checkpoint moves one
    index on (with its recorded result), so the one the record names is gone and a newer one
    is there. Returns the old and the new name."""
    import json

    old = max(p.name for p in trial_dir.glob("checkpoint_*"))
    new = f"checkpoint_{int(old.split('_')[1]) + 1:06d}"
    (trial_dir / old).rename(trial_dir / new)
    results = trial_dir / "result.json"
    lines = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    for line in lines:
        if line.get("checkpoint_dir_name") == old:
            line["checkpoint_dir_name"] = new
    results.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return old, new


def pytest_sessionfinish(session, exitstatus):
    """Shut down what in-process sweeps left of Ray while every module is still whole: its
    core worker's native threads, left to the interpreter's teardown, can crash it there."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
