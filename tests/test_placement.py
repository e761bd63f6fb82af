"""Fractional --gpus-per-trial packs trials onto one GPU: the driver's own Tuner, on a Ray
node that declares one GPU. (No CUDA here: the trials only record what Ray gave them.)"""

import dataclasses

import pytest

pytestmark = pytest.mark.slow


def test_quarter_gpu_trials_run_four_at_once_on_the_one_gpu(tmp_path, image_folder, cache_dir):
    import ray

    from sweeps.cli import build_parser
    from sweeps.plan import prepare
    from sweeps.run import execute

    def on_the_gpu(config, data):
        import time

        import ray
        from ray import tune

        started = time.time()
        time.sleep(6)  # long enough for every trial that fits to be running at once
        tune.report({"epoch": 1, "val_acc": 0.5, "val_loss": 1.0, "train_loss": 1.0, "lr": config["lr"],
                     "started_at": started, "ended_at": time.time(),
                     "gpu_ids": ",".join(str(g) for g in ray.get_gpu_ids())})

    args = build_parser().parse_args([
        "--space", "smoke", "--data", str(image_folder), "--weights", "none", "--image-size", "32",
        "--trials", "4", "--max-epochs", "1", "--max-concurrent", "4", "--name", "packed",
        "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--storage", str(tmp_path / "results")])
    # what --gpus-per-trial 0.25 --cpus-per-trial 0.5 asks for (prepare refuses GPUs without CUDA)
    plan = dataclasses.replace(prepare(args), resources={"cpu": 0.5, "gpu": 0.25})
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        info = execute(plan, trainable=on_the_gpu)
    finally:
        ray.shutdown()

    assert info["trials"]["errored"] == 0
    from sweeps.bench_sweeps import trial_results

    results = [r[-1] for r in trial_results(plan.sweep_dir) if r]
    assert len(results) == 4
    assert {r["gpu_ids"] for r in results} == {"0"}  # each trial got a share of the same GPU
    latest_start = max(r["started_at"] for r in results)
    assert all(r["ended_at"] > latest_start for r in results)  # all four were running at once
