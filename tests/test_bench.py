"""The benchmark script: its measurements run, and its JSON holds every figure, finite.

No test here asserts a speed: the figures depend on the machine and on what else runs.
"""

import json
import math
import subprocess
import sys

import pytest
import torch

from benchmarks import bench, bench_sweeps
from search_spaces.loader import load_space
from trainables.config import TrialConfig
from trainables.data import DataHandle, scan

from conftest import ROOT, write_image_folder

FIGURES = ["limit_img_per_s", "sweep_img_per_s", "efficiency", "startup_s", "overhead_per_trial_s",
           "overhead_mlflow_complete_per_trial_s", "bare_ray_overhead_per_trial_s",
           "bare_ray_json_only_overhead_per_trial_s",
           "bare_ray_default_overhead_per_trial_s", "decodes_per_image",
           "feature_cache_speedup", "feature_cache_build_s", "linear_probe_speedup", "linear_probe_build_s"]


@pytest.fixture
def handle(tmp_path):
    folder = write_image_folder(tmp_path / "images", per_class=8)
    return DataHandle(scan(folder, val_fraction=0.5), 32, str(tmp_path / "cache" / "decoded"))


def tiny_args(*extra):
    return bench.build_parser().parse_args(["--out", "unused.json", "--image-size", "32", "--cpus", "1",
                                            "--limit-epochs", "2", "--feature-epochs", "2", *extra])


BASE = TrialConfig(model="resnet18", weights="none", image_size=32, batch_size=4, lr=0.01)


def test_limit_counts_every_epoch_and_takes_the_steady_ones(handle):
    out = bench.measure_limit(BASE, handle, tiny_args())
    assert len(out["limit"]["epoch_s"]) == 2
    expected = len(handle.dataset.train) / out["limit"]["epoch_s"][1]  # the median of epoch 2 alone
    assert out["limit_img_per_s"] == pytest.approx(expected)


def test_feature_cache_figures_come_from_cached_and_uncached_trials(handle):
    out = bench.measure_feature_cache(BASE, handle, tiny_args())
    assert (out["feature_cache"]["frozen_depth"], out["linear_probe"]["frozen_depth"]) == (4, 5)
    for name in ("feature_cache", "linear_probe"):
        for key in (f"{name}_speedup", f"{name}_build_s"):
            assert math.isfinite(out[key]) and out[key] > 0, key
        # --rounds 2 of each, every one with its 2 epochs
        assert [len(run) for run in out[name]["cached_epoch_s"] + out[name]["uncached_epoch_s"]] == [2] * 4
    # both depths were built once, where every trial of the sweep would look for them
    assert len(list((handle.path.parent.parent / "features").glob("*/meta.json"))) == 2


def test_targets_compare_each_figure_with_its_bound():
    figures = {"efficiency": 0.95, "startup_s": 20.0, "overhead_per_trial_s": 1.3,
               "bare_ray_overhead_per_trial_s": 1.0, "decodes_per_image": 1.0,
               "feature_cache_speedup": 1.5, "linear_probe_speedup": 30.0}
    result = {k: v["pass"] for k, v in bench.targets(figures).items()}
    assert result == {"efficiency": True, "startup_s": False, "overhead_per_trial_s": False,
                      "decodes_per_image": True, "feature_cache_speedup": False,
                      "linear_probe_speedup": True}
    assert bench.targets(figures)["overhead_per_trial_s"]["bound"] == pytest.approx(1.2)


def test_rampup_runs_to_the_moment_every_lane_is_busy():
    results = [[{"started": 10.0, "ended": 20.0}], [{"started": 12.5, "ended": 21.0}],
               [{"started": 11.0, "ended": 19.0}]]
    assert bench_sweeps.rampup(results, 3) == pytest.approx(2.5)
    results[0][0]["ended"] = 12.0  # the first ended before the last began: never all at once
    with pytest.raises(ValueError, match="never running at once"):
        bench_sweeps.rampup(results, 3)
    figures = {"rampup_s": 2.5, "bare_random_rampup_s": 2.0}
    assert bench.targets(figures)["rampup_s"]["bound"] == pytest.approx(2.4)
    assert not bench.targets(figures)["rampup_s"]["pass"]


def test_overhead_per_trial_is_the_pace_at_which_trials_start():
    # two at once: trials 3..6 each start 0.5 s after a running one ends
    results = [[{"started": t}] for t in (10.0, 10.1, 10.5, 10.6, 11.0, 11.1)]
    assert bench_sweeps.per_trial(results, concurrent=2) == pytest.approx(1.1 / 4)
    with pytest.raises(ValueError, match="need more than the 2"):
        bench_sweeps.per_trial(results[:2], concurrent=2)


def test_sweep_command_lines_are_the_run_commands_own(tmp_path):
    from sweeps.cli import build_parser

    args = bench.build_parser().parse_args(["--out", "b.json", "--cpus", "4", "--cpus-per-trial", "2",
                                            "--data", str(tmp_path)])
    sweep = build_parser().parse_args(bench_sweeps.sweep_argv(args, tmp_path, "s", 8, 2))
    assert (sweep.cpus_per_trial, sweep.max_concurrent, sweep.trials, sweep.data) == (2, 2, 8, str(tmp_path))
    rampup = build_parser().parse_args(bench_sweeps.sweep_argv(args, tmp_path, "r", 16, 1, "bench-rampup",
                                                               cpus_per_trial=1, max_concurrent=False))
    assert (rampup.cpus_per_trial, rampup.max_concurrent, rampup.experiment) == (1, None, "bench-rampup")


def test_phases_begun_on_a_busy_machine_are_named():
    load = {"limit": {"load_average_1min": 3.0, "cpu_pressure_some_avg10": 45.0},
            "sweep": {"load_average_1min": 1.0, "cpu_pressure_some_avg10": 2.0},
            "decodes": {"load_average_1min": 1.0}}  # no pressure stall information: no verdict
    warnings = bench.busy_warnings(load)
    assert len(warnings) == 1 and warnings[0].startswith("limit: CPUs were busy")


@pytest.mark.parametrize("flags, culprit", [
    (["--cpus", "1", "--cpus-per-trial", "2"], "--cpus 1"),
    (["--overhead-trials", "0"], "--overhead-trials"),
    (["--cpus", "2", "--overhead-trials", "2"], "must exceed the 2 trials"),
    (["--epochs", "0"], "--epochs"),
])
def test_bad_settings_stop_before_anything_runs(tmp_path, capsys, flags, culprit):
    assert bench.main(["--out", str(tmp_path / "b.json"), *flags]) == 2
    assert culprit in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


def test_the_benchmark_space_trains_everything_and_never_stops_early():
    space = load_space("bench")
    cfg = space.config()
    assert set(space.search) == {"lr"}
    assert (cfg.frozen_depth, cfg.weights) == (0, "none")
    assert space.grace_period >= cfg.max_epochs * 10  # capped at max_epochs by the driver


@pytest.mark.slow
def test_benchmark_writes_every_figure(tmp_path):
    folder = write_image_folder(tmp_path / "images", per_class=8)
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--out", str(out), "--data", str(folder),
         "--image-size", "32", "--cpus", "2", "--trials", "2", "--epochs", "1", "--limit-epochs", "1",
         "--decode-trials", "2", "--overhead-trials", "4", "--rounds", "1", "--feature-epochs", "1",
         "--rampup-lanes", "3", "--rampup-sleep", "6", "--work-dir", str(tmp_path / "work")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for key in FIGURES:
        assert math.isfinite(report[key]) and report[key] > 0, key
    assert report["efficiency"] == pytest.approx(report["sweep_img_per_s"] / report["limit_img_per_s"])
    assert report["sweep"]["trials"] == 2 and report["sweep"]["trial_epochs"] == 2
    # decoding happens once, in the driver, before any trial starts
    assert report["decodes"] == {"driver": 16, "in_trials": 0, "images": 16, "trials": 2}
    assert set(report["targets"]) <= set(report["definitions"])
    assert {"cpu_count", "torch", "platform", "load_at_phase_start"} <= set(report["machine"])
    assert isinstance(report["warnings"], list)
    assert str(out) in proc.stdout.splitlines()[-1]


def test_gpu_benchmark_runs_the_trainable_alone(tmp_path):
    # The GPU machine has torch and torchvision only: the script must not need Ray, MLflow,
    # Optuna or scikit-learn. Here it runs on the CPU, where the CUDA options stay off.
    script = f"""
import sys
sys.argv = ["gpu_bench.py", "--out", {str(tmp_path / 'gpu.json')!r}, "--device", "cpu", "--models",
            "resnet18", "--image-size", "16", "--images", "64", "--batch-size", "16", "--epochs", "2",
            "--pack", "2", "--work-dir", {str(tmp_path / 'work')!r}]
sys.path.insert(0, {str(ROOT)!r})
from benchmarks import gpu_bench
code = gpu_bench.main()
assert not {{"ray", "mlflow", "optuna", "sklearn"}} & set(sys.modules), "imported a sweep-only package"
sys.exit(code)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["train_images"] == 64
    trial = report["models"]["resnet18"]["defaults"]
    assert trial["img_per_s"] > 0 and len(trial["epoch_img_per_s"]) == 2
    assert (trial["amp_dtype"], trial["channels_last"], trial["pin_memory"]) == (None, False, False)
    packing = report["packing"]
    trials = packing["per_trial"]
    assert len(trials) == 2 and all(t["steady_images"] == 64 for t in trials)
    # the packed trials' steady epochs began together, after both had finished the first
    assert max(t["steady_start"] for t in trials) - min(t["steady_start"] for t in trials) < 1.0
    span = max(t["steady_end"] for t in trials) - min(t["steady_start"] for t in trials)
    assert packing["packed_img_per_s"] == pytest.approx(128 / span)


def test_a_failing_packed_trial_stops_the_gpu_benchmark_instead_of_hanging(tmp_path):
    from benchmarks import gpu_bench

    images = gpu_bench.make_images(tmp_path / "images", 8)
    handle = DataHandle(scan(images), 16, str(tmp_path / "cache"))
    cfg = TrialConfig(model="no_such_model", weights="none", image_size=16, max_epochs=2)
    with pytest.raises(RuntimeError, match="2 of 2 packed trials failed(.|\n)*no_such_model"):
        gpu_bench.packed(cfg, handle, "cpu", 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_gpu_benchmark_without_cuda_says_so(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--out", str(tmp_path / "g.json")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "sees no CUDA device" in run.stderr
