"""Fractional --gpus-per-trial packs trials onto one GPU: the driver's own Tuner, on a Ray
node that declares one GPU. (No CUDA here: the trials only record what Ray gave them.)"""

import dataclasses
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def run_four_at_once(tmp_path, image_folder, name, trainable, flags=(), resources=None, **node):
    """Four 1-epoch trials of ``trainable`` through the driver's own Tuner on a Ray node with
    ``node``'s resources (``resources``, when given, replaces the plan's per-trial request).
    Checks that none errored and that all four were running at once; returns the plan and
    each trial's last result."""
    import ray

    from benchmarks.bench_sweeps import trial_results
    from sweeps.cli import build_parser
    from sweeps.plan.prepare import prepare
    from sweeps.run import execute

    args = build_parser().parse_args([
        "--space", "smoke", "--data", str(image_folder), "--weights", "none", "--image-size", "32",
        "--trials", "4", "--max-epochs", "1", "--name", name, *flags,
        "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--storage", str(tmp_path / "results")])
    plan = prepare(args)
    if resources:
        plan = dataclasses.replace(plan, resources=resources)
    ray.init(include_dashboard=False, log_to_driver=False, **node)
    try:
        info = execute(plan, trainable=trainable)
    finally:
        ray.shutdown()

    assert info["trials"]["errored"] == 0
    results = [r[-1] for r in trial_results(plan.sweep_dir) if r]
    assert len(results) == 4
    latest_start = max(r["started_at"] for r in results)
    assert all(r["ended_at"] > latest_start for r in results)  # all four were running at once
    return plan, results


def all_running(barrier: Path, n: int):
    """A function for a trial to call: it returns once ``n`` trials have called it (each leaves
    a file in ``barrier``), and raises when they never all run at once."""
    folder = str(barrier)

    def wait() -> None:
        import os
        import time
        import uuid

        open(os.path.join(folder, uuid.uuid4().hex), "w").close()
        deadline = time.monotonic() + 300
        while len(os.listdir(folder)) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(os.listdir(folder))} of {n} trials ever ran at once")
            time.sleep(0.05)
    barrier.mkdir(parents=True, exist_ok=True)
    return wait


def test_quarter_gpu_trials_run_four_at_once_on_the_one_gpu(tmp_path, image_folder, cache_dir):
    wait_for_all = all_running(tmp_path / "barrier", 4)

    def on_the_gpu(config, data):
        import time

        import ray
        from ray import tune

        started = time.time()
        wait_for_all()  # every trial that fits is running at once
        tune.report({"epoch": 1, "val_acc": 0.5, "best_val_acc": 0.5, "val_loss": 1.0, "train_loss": 1.0,
                     "lr": config["lr"], "started_at": started, "ended_at": time.time(),
                     "gpu_ids": ",".join(str(g) for g in ray.get_gpu_ids())})

    # what --gpus-per-trial 0.25 --cpus-per-trial 0.5 asks for (prepare refuses GPUs without CUDA)
    _, results = run_four_at_once(tmp_path, image_folder, "packed", on_the_gpu, ["--max-concurrent", "4"],
                                  resources={"cpu": 0.5, "gpu": 0.25}, num_cpus=2, num_gpus=1)
    assert {r["gpu_ids"] for r in results} == {"0"}  # each trial got a share of the same GPU


def test_without_max_concurrent_every_lane_runs_at_once(tmp_path, image_folder, cache_dir, monkeypatch):
    """A 4-CPU node and 1-CPU trials: TPE's sweep places all four trials before the first
    starts, and runs them at once. (Ray Tune's default with a searcher and no limit keeps
    one trial pending: lanes fill one actor start after another.)"""
    from sweeps.records.tracking import MlflowTrials

    placed_at_start = []  # how many trials Tune had created as each one started
    on_start = MlflowTrials.on_trial_start

    def counting(self, iteration, trials, trial, **info):
        placed_at_start.append(len(trials))
        on_start(self, iteration, trials, trial, **info)

    monkeypatch.setattr(MlflowTrials, "on_trial_start", counting)

    wait_for_all = all_running(tmp_path / "barrier", 4)

    def sleeper(config, data):  # nested: Ray ships it by value, not by this module's name
        """A trial that imports nothing heavy and waits until every lane has filled."""
        import time

        from ray import tune

        started = time.time()
        wait_for_all()
        tune.report({"epoch": 1, "val_acc": config["lr"], "best_val_acc": config["lr"], "val_loss": 1.0,
                     "train_loss": 1.0, "lr": config["lr"], "started_at": started, "ended_at": time.time()})

    plan, results = run_four_at_once(tmp_path, image_folder, "lanes", sleeper, num_cpus=4)
    assert plan.max_concurrent is None
    assert len({r["lr"] for r in results}) == 4  # TPE suggested four distinct points
    assert placed_at_start[0] == 4, placed_at_start  # every lane's trial placed before the first start


def test_lanes_count_what_fits_on_each_live_node(monkeypatch):
    import ray

    from sweeps.tune.driver import concurrent_trials

    nodes = [{"Alive": True, "Resources": {"CPU": 3.0, "GPU": 1.0}},
             {"Alive": True, "Resources": {"CPU": 3.0}},
             {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    assert concurrent_trials({"cpu": 2, "gpu": 0}, trials=100) == 2  # 3+3 CPUs, but no trial straddles two nodes
    assert concurrent_trials({"cpu": 1, "gpu": 0}, trials=4) == 4  # never more than the sweep's trials
    assert concurrent_trials({"cpu": 0.5, "gpu": 0.25}, trials=100) == 4  # GPU-bound: a quarter of the one GPU each
    assert concurrent_trials({"cpu": 4, "gpu": 0}, trials=10) == 0  # nothing fits: run.check_cluster refuses
