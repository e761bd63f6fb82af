"""A sweep submitted to a real two-node Ray cluster with token authentication on.

Both nodes run on this machine: the head, and a worker that calls itself 127.0.0.2
(Linux answers on all of 127.0.0.0/8), so a trial's ``node_ip`` says which node ran it.
As on a production cluster, the head runs the job's driver and no trials (0 CPUs); the
worker's CPUs run them. The worker declares 3 CPUs, room for three trials at once, so
the sweep's ``--max-concurrent 2`` is what keeps a third one from starting. (With CPUs
on both nodes, which node a trial lands on is a race: Ray may place every trial on one
node, and Tune hands a finished trial's actor to a trial whose own actor on the other
node is still starting, so "trials ran on both nodes" could not be asserted.) Each node
has its own ``FTSWEEP_CACHE``, as nodes with their own disks would, so where the decoded
images were built shows whether that happened once per node. Each node also has its own
temp dir, ports and process session; the fixture stops exactly those sessions and checks
nothing of them is left (never ``ray stop``: it would stop every Ray on the machine,
other tests' included).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sweeps.tools.submit import EXCLUDES

from conftest import ROOT, free_port

pytestmark = pytest.mark.slow
RAY = [sys.executable, "-m", "ray.scripts.scripts"]
SUBMIT = [sys.executable, str(ROOT / "sweeps" / "tools" / "submit.py")]
WORKER_IP = "127.0.0.2"


@dataclass(frozen=True)
class Cluster:
    url: str  # the dashboard, where jobs are submitted
    env: dict  # a client's environment: RAY_AUTH_MODE=token and the token's file
    root: Path
    head_cache: Path  # FTSWEEP_CACHE of the head's processes, the job's driver included
    worker_cache: Path  # FTSWEEP_CACHE of the worker's processes


@pytest.fixture(scope="module")
def ray_cluster(cache_dir):
    # Short: Ray's unix sockets live under the temp dir and their paths are limited to 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="ftr-", dir="/tmp"))
    head_cache, worker_cache = root / "head-cache", root / "worker-cache"
    # The head's cache borrows the demo's images and pretrained backbone from the tests'
    # cache (trained once) but decodes into a folder of its own; the worker's starts empty.
    head_cache.mkdir()
    for shared in ("digits", "backbones"):
        (cache_dir / shared).mkdir(parents=True, exist_ok=True)
        (head_cache / shared).symlink_to(cache_dir / shared)
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    gcs, dashboard = free_port(), free_port()
    sessions: list[int] = []
    try:
        # Fixed ports elsewhere default to values another Ray on this machine may hold
        # (the agent's 52365, the client server's 10001), so every node gets free ones.
        # (Ray swaps the head's 127.0.0.1 for this machine's address as its node IP.)
        _ray_start(["--head", "--node-ip-address", "127.0.0.1", "--port", gcs,
                    "--dashboard-host", "127.0.0.1", "--dashboard-port", dashboard,
                    "--ray-client-server-port", free_port(), "--dashboard-agent-listen-port", free_port(),
                    "--num-cpus", 0, "--temp-dir", root / "head"],
                   {**env, "FTSWEEP_CACHE": str(head_cache)}, root / "head.log", sessions)
        _ray_start(["--address", f"127.0.0.1:{gcs}", "--node-ip-address", WORKER_IP,
                    "--dashboard-agent-listen-port", free_port(), "--num-cpus", 3,
                    "--temp-dir", root / "worker"],
                   {**env, "FTSWEEP_CACHE": str(worker_cache)}, root / "worker.log", sessions)
        url = f"http://127.0.0.1:{dashboard}"
        _wait_for_nodes(url, token.read_text(), 2)
        yield Cluster(url, env, root, head_cache, worker_cache)
    finally:
        left = _stop(sessions, root)
        assert not left, f"processes of the test's Ray cluster still running: {left}"
        shutil.rmtree(root, ignore_errors=True)  # kept (with the nodes' logs) when the check fails


def _ray_start(args: list, env: dict, log: Path, sessions: list[int]) -> None:
    """``ray start`` in a new session; it returns once the node is up, leaving the node's
    processes in that session."""
    with open(log, "w") as out:
        proc = subprocess.Popen([*RAY, "start", *map(str, args), "--disable-usage-stats"], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    sessions.append(proc.pid)  # before waiting: a half-started node is stopped too
    if proc.wait(timeout=180) != 0:
        raise RuntimeError(f"ray start {args[0]} failed:\n{log.read_text()[-3000:]}")


def _get(url: str, token: str):
    """GET a dashboard API with the token, as Ray's clients send it."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.load(r)


def _nodes(cluster: Cluster) -> list[dict]:
    token = Path(cluster.env["RAY_AUTH_TOKEN_PATH"]).read_text()
    return _get(f"{cluster.url}/api/v0/nodes", token)["data"]["result"]["result"]


def _wait_for_nodes(url: str, token: str, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        nodes = _get(f"{url}/api/v0/nodes", token)["data"]["result"]["result"]
        if sum(n["state"] == "ALIVE" for n in nodes) >= count:
            return
        time.sleep(1)
    raise TimeoutError(f"the cluster at {url} did not reach {count} nodes in {timeout} s")


def _ours(sessions: list[int], root: Path) -> dict[int, str]:
    """Live processes of the sessions the fixture started, or naming its temp dir (a worker
    that left the session would still name its raylet's socket there): pid -> command."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # exited meanwhile
            continue
        state, _ppid, _pgrp, session = stat.rsplit(")", 1)[1].split()[:4]
        if state != "Z" and (int(session) in sessions or str(root) in cmdline):
            found[int(proc.name)] = cmdline[:120]
    return found


def _stop(sessions: list[int], root: Path) -> dict[int, str]:
    """SIGTERM the fixture's processes, SIGKILL what is left after a grace period (a
    raylet drains for up to 30 s); returns what still runs after that (nothing, normally)."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        for pid in _ours(sessions, root):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while _ours(sessions, root) and time.monotonic() < deadline:
            time.sleep(0.5)
    return _ours(sessions, root)


def _without_auth_env(env: dict, home: Path) -> dict:
    env = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(home)  # no ~/.ray/auth_token either
    return env


def test_ray_job_submit_runs_the_shared_storage_check_on_every_node(ray_cluster, tmp_path):
    shared = tmp_path / "shared"
    code = textwrap.dedent(f"""
        import ray
        from sweeps.results import storage
        ray.init()
        storage.require_shared({str(shared)!r}, {{}})  # every node sees it: no error
        try:
            storage.require_shared({str(shared)!r}, {{"/nonexistent/ftsweep": "the dataset (--data)"}})
        except storage.NotShared as e:
            print(e)
    """)
    # The README's form: the plain Ray CLI, which sends the token only with RAY_AUTH_MODE=token.
    proc = subprocess.run(
        [*RAY, "job", "submit", "--address", ray_cluster.url, "--working-dir", ".",
         "--runtime-env-json", json.dumps({"excludes": EXCLUDES}), "--", "python", "-c", code],
        cwd=ROOT, env=ray_cluster.env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    unseen = [line for line in proc.stdout.splitlines()
              if "cannot see the dataset (--data) /nonexistent/ftsweep" in line]
    assert len(unseen) == 2 and any(WORKER_IP in line for line in unseen), proc.stdout[-4000:]
    assert not list(shared.glob(".ftsweep-probe-*"))  # the probe file is cleaned up


TRIALS, MAX_CONCURRENT = 6, 2  # the worker has room for 3 trials at once: the limit is --max-concurrent's


def test_submitted_sweep_runs_on_the_worker_within_max_concurrent_decoding_once_per_node(
        ray_cluster, mlflow_server, tmp_path):
    shared = tmp_path / "shared"  # every node of this cluster sees it: they share a machine
    name = f"cluster-{uuid.uuid4().hex[:6]}"
    job_id = f"ftsweep-{name}"
    # No RAY_AUTH_MODE here: submit.py sends the token from RAY_AUTH_TOKEN_PATH regardless.
    # No --env FTSWEEP_CACHE either: it would give every node the same cache folder.
    env = {k: v for k, v in ray_cluster.env.items() if k != "RAY_AUTH_MODE"}
    proc = subprocess.run(
        [*SUBMIT, "--address", ray_cluster.url, "--submission-id", job_id, "--",
         "--space", "smoke", "--trials", str(TRIALS), "--max-epochs", "1", "--name", name,
         "--max-concurrent", str(MAX_CONCURRENT), "--storage", str(shared), "--tracking-uri", mlflow_server],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"job {job_id} SUCCEEDED" in proc.stderr

    sweep_dir = shared.resolve() / name
    assert proc.stdout.strip().splitlines()[-1] == str(sweep_dir / "sweep_summary.json")
    summary = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert sum(summary["trials"].values()) == TRIALS and summary["trials"]["errored"] == 0
    assert Path(summary["best"]["checkpoint"]).is_file()

    # The driver ran on the head, the trials on the worker: their checkpoints crossed nodes.
    nodes = {n["node_id"]: n for n in _nodes(ray_cluster)}
    token = Path(ray_cluster.env["RAY_AUTH_TOKEN_PATH"]).read_text()
    driver_node = nodes[_get(f"{ray_cluster.url}/api/jobs/{job_id}", token)["driver_node_id"]]
    assert driver_node["is_head_node"] and driver_node["node_ip"] != WORKER_IP
    trials = _trial_results(sweep_dir)
    assert len(trials) == TRIALS
    assert {r["node_ip"] for results in trials.values() for r in results} == {WORKER_IP}

    # --max-concurrent: never more trials at once than asked, though the worker had room for one more.
    spans = [(results[0]["started_at"], results[-1]["reported_at"]) for results in trials.values()]
    assert _most_at_once(spans) == MAX_CONCURRENT, sorted(spans)
    assert len({r["pid"] for results in trials.values() for r in results}) >= 2  # trials in separate processes

    # Decoded once per node: by the driver into the head's cache, and by one trial into the
    # worker's (its own FTSWEEP_CACHE, from the environment of its `ray start`). Every other
    # trial, in either of the worker's trial processes, read the worker's copy.
    images = sum(1 for _ in (ray_cluster.head_cache / "digits" / "5-9").rglob("*.png"))
    datasets = {cache: [p.name for p in (cache / "decoded").glob("*") if p.is_dir()]
                for cache in (ray_cluster.head_cache, ray_cluster.worker_cache)}
    # The worker decoded only the sweep's dataset; the head has it too (and may hold the demo
    # backbone's pretraining set of digits 0-4, when the driver had to build that backbone).
    assert len(datasets[ray_cluster.worker_cache]) == 1, datasets
    assert datasets[ray_cluster.worker_cache][0] in datasets[ray_cluster.head_cache], datasets
    decodes = sorted(results[-1]["decodes_in_trial"] for results in trials.values())
    assert decodes == [0] * (TRIALS - 1) + [images], decodes

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([summary["experiment_id"]], f"tags.`ftsweep.sweep` = '{name}'")
    parents = [r for r in runs if r.data.tags.get("ftsweep.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("ftsweep.role") == "trial"]
    assert [p.info.run_id for p in parents] == [summary["parent_run_id"]]
    assert {c.data.tags["ftsweep.trial_id"] for c in children} == set(trials)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {summary["parent_run_id"]}


def _trial_results(sweep_dir: Path) -> dict[str, list[dict]]:
    """Each trial's results, in the order it reported them (its result.json)."""
    return {f.parent.name.removeprefix("trial_"): [json.loads(line) for line in f.read_text().splitlines()
                                                   if line.strip()]
            for f in sweep_dir.glob("trial_*/result.json")}


def _most_at_once(spans: list[tuple[float, float]]) -> int:
    """The most of the (start, end) intervals that cover one moment."""
    # At the same instant an end comes before a start: touching intervals do not overlap.
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


def test_submit_without_token_exits_2_naming_where_to_put_it(ray_cluster, tmp_path):
    proc = subprocess.run(
        [*SUBMIT, "--address", ray_cluster.url, "--", "--space", "smoke",
         "--storage", str(tmp_path / "shared"), "--tracking-uri", "http://127.0.0.1:5000"],
        cwd=tmp_path, env=_without_auth_env(ray_cluster.env, tmp_path), capture_output=True,
        text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "token authentication" in proc.stderr and "no token was found" in proc.stderr
    for place in ("RAY_AUTH_TOKEN environment variable", "RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token"):
        assert place in proc.stderr


def test_submit_with_a_wrong_token_exits_2_naming_its_source(ray_cluster, tmp_path):
    env = _without_auth_env(ray_cluster.env, tmp_path)
    env["RAY_AUTH_TOKEN"] = "not-the-cluster-token"
    proc = subprocess.run(
        [*SUBMIT, "--address", ray_cluster.url, "--", "--space", "smoke",
         "--storage", str(tmp_path / "shared"), "--tracking-uri", "http://127.0.0.1:5000"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "rejected the token from RAY_AUTH_TOKEN" in proc.stderr


def _submit_unreachable_mlflow(cluster: Cluster, *own: str, cwd: Path):
    """A sweep that submit.py accepts but run.py refuses on the cluster: nobody serves MLflow there."""
    tracking = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.run(
        [*SUBMIT, "--address", cluster.url, *own, "--", "--space", "smoke",
         "--storage", str(cwd / "shared"), "--tracking-uri", tracking],
        cwd=cwd, env=cluster.env, capture_output=True, text=True, timeout=300)
    return proc, tracking


def test_a_sweep_failing_on_the_cluster_exits_1_and_no_wait_returns_the_job_id(ray_cluster, tmp_path):
    proc, tracking = _submit_unreachable_mlflow(ray_cluster, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"MLflow tracking server {tracking} is unreachable" in proc.stdout  # run.py's message, streamed
    assert "FAILED (run.py exit status 2)" in proc.stderr

    proc, _ = _submit_unreachable_mlflow(ray_cluster, "--no-wait", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job_id = proc.stdout.strip()
    assert f"ray job stop --address {ray_cluster.url} {job_id}" in proc.stderr
    token = Path(ray_cluster.env["RAY_AUTH_TOKEN_PATH"]).read_text()
    deadline = time.monotonic() + 120
    while (status := _get(f"{ray_cluster.url}/api/jobs/{job_id}", token)["status"]) not in (
            "SUCCEEDED", "FAILED", "STOPPED") and time.monotonic() < deadline:
        time.sleep(1)
    assert status == "FAILED"
