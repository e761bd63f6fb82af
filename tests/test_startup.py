"""What the sweep's start-up leaves out or overlaps: the driver imports no torch on a warm
cache (its model checks are remembered), and Tune's trial actors start on workers Ray
prestarted with the trial's modules already imported."""

import json
import subprocess
import sys
import time

import pytest
import torch

from sweeps.errors import UsageError
from sweeps.plan import model_check
from tests.conftest import write_image_folder

DRIVER = """
import sys
from sweeps.cli import build_parser
from sweeps.plan.prepare import prepare
plan = prepare(build_parser().parse_args(sys.argv[1:]), log=lambda *a: None)
import sweeps.tune.driver, sweeps.run, sweeps.results.summary, sweeps.results.retention
import sweeps.records.best_model, sweeps.records.registry
print({"torch": "torch" in sys.modules, "sklearn": "sklearn" in sys.modules, "mean": plan.data.mean,
       "std": plan.data.std, "val": plan.data.dataset.val.paths})
"""


def test_a_warm_start_imports_no_torch_or_sklearn_in_the_driver(tmp_path, monkeypatch):
    """The first sweep checks the model with torch and splits the data with scikit-learn, and
    keeps both answers; the next one, on the same inputs, plans and starts its trials
    without importing either, and splits the data the same way."""
    monkeypatch.setenv("FTSWEEP_CACHE", str(tmp_path / "cache"))
    data = write_image_folder(tmp_path / "data", per_class=4)
    argv = ["--space", "smoke", "--data", str(data), "--weights", "none", "--image-size", "32",
            "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--storage", str(tmp_path / "s")]

    def driver() -> dict:
        out = subprocess.run([sys.executable, "-c", DRIVER, *argv], capture_output=True, text=True,
                             cwd=tmp_path, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return eval(out.stdout.strip().splitlines()[-1])  # noqa: S307 - our own dict

    cold, warm = driver(), driver()
    assert cold["torch"] and not warm["torch"]
    assert cold["sklearn"] and not warm["sklearn"]
    assert warm["mean"] == cold["mean"] and warm["std"] == cold["std"] and warm["val"] == cold["val"]
    assert len(json.loads((tmp_path / "cache" / "checks" / "models.json").read_text())) == 2  # stages, check


def test_a_failed_model_check_is_not_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("FTSWEEP_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match=r"vit_b_16 does not accept 64x64 images \(--image-size\)"):
        model_check.check("vit_b_16", 3, "none", 64)
    assert not (tmp_path / "checks" / "models.json").exists()
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert model_check.check("resnet18", 3, "none", 64) == imagenet
    assert len(json.loads((tmp_path / "checks" / "models.json").read_text())) == 1


def test_a_changed_weights_file_is_checked_again(tmp_path, monkeypatch):
    """The weights file is part of the question: replaced by one that no longer fits the
    model, the check fails again instead of answering from memory."""
    from trainables.models import build_model

    monkeypatch.setenv("FTSWEEP_CACHE", str(tmp_path))
    weights = tmp_path / "w.pt"
    torch.save(build_model("resnet18", 3, "none").state_dict(), weights)
    model_check.check("resnet18", 3, str(weights), 32)
    torch.save({"conv1.weight": torch.zeros(1)}, weights)
    with pytest.raises(ValueError, match="w.pt"):
        model_check.check("resnet18", 3, str(weights), 32)


def test_a_remembered_imagenet_check_holds_only_while_its_weights_file_does(tmp_path, monkeypatch):
    """ImageNet weights come from torch's hub folder: once the file the check loaded is
    gone, the check runs again (and, offline, fails) instead of answering from memory."""
    from trainables.models import build_model, imagenet_file

    monkeypatch.setenv("FTSWEEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    file = imagenet_file("resnet18")
    file.parent.mkdir(parents=True)
    torch.save(build_model("resnet18", 1000, "none").state_dict(), file)  # stands in for the download
    model_check.check("resnet18", 3, "imagenet", 32)
    file.unlink()
    monkeypatch.setattr("torch.hub.download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(ValueError, match="offline"):
        model_check.check("resnet18", 3, "imagenet", 32)


def test_a_too_small_image_size_still_stops_the_sweep_before_it_starts(tmp_path, monkeypatch):
    from sweeps.cli import build_parser
    from sweeps.plan.prepare import prepare

    monkeypatch.setenv("FTSWEEP_CACHE", str(tmp_path / "cache"))
    data = write_image_folder(tmp_path / "data", per_class=3)
    args = build_parser().parse_args([
        "--space", "smoke", "--data", str(data), "--weights", "none", "--model", "vit_b_16",
        "--image-size", "64", "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--storage", str(tmp_path / "s")])
    for _ in range(2):  # the second time too: a failure is never remembered
        with pytest.raises(UsageError, match=r"vit_b_16 does not accept 64x64 images"):
            prepare(args, log=lambda *a: None)


@pytest.mark.slow
def test_trial_actors_start_on_prestarted_workers_with_the_trial_modules_imported():
    """With ``lanes``, a local Ray prestarts that many workers, which import the trial's
    modules; Tune's trial actors (made by Tune's own class cache, without the runtime env
    Tune would add) start on exactly those workers."""
    import psutil
    import ray
    from ray.tune.execution.class_cache import _ActorClassCache

    import sweeps.tune.driver  # noqa: F401 - drops Tune's runtime env for trial actors
    from sweeps.tune.ray_session import init_ray

    class Probe:
        def where(self):
            import os
            import sys

            return os.getpid(), "trainables.train" in sys.modules and "torch" in sys.modules

    started = time.time() - 1
    init_ray(None, num_cpus=2, lanes=2)
    try:
        idle: set[int] = set()
        deadline = time.time() + 120
        while len(idle) < 2 and time.time() < deadline:  # the prestarted workers, still unused
            time.sleep(0.5)
            idle = {p.pid for p in psutil.process_iter(["cmdline", "create_time"])
                    if " ".join(p.info["cmdline"] or []).strip() == "ray::IDLE" and p.info["create_time"] > started}
        actor = _ActorClassCache().get(Probe)
        handles = [actor.options(num_cpus=1).remote() for _ in range(2)]
        places = ray.get([h.where.remote() for h in handles], timeout=120)
    finally:
        ray.shutdown()
    assert {pid for pid, _ in places} <= idle and len({pid for pid, _ in places}) == 2
    assert all(imported for _, imported in places)


@pytest.mark.parametrize("cores, cpus, lanes, at_raylet_start", [
    (2, None, 2, True),  # every core a lane: the workers start with the raylet
    (16, 16, 16, True),
    (16, 16, 4, False),  # 4 GPU trials on a 16-core node: 16 workers would import torch for nothing
    (2, None, 1, False),  # --cpus-per-trial 2, or --trials 1
    (4, 2, 2, True),  # a Ray declaring fewer CPUs than the cores starts as many workers as CPUs
])
def test_the_raylet_prestarts_workers_only_when_each_one_gets_a_trial(monkeypatch, cores, cpus, lanes,
                                                                       at_raylet_start):
    """The raylet, told to prestart, starts one worker per CPU it declares (at most one per
    core); Ray otherwise prestarts ``lanes`` of them when the driver connects."""
    from sweeps.tune import ray_session

    monkeypatch.setattr("os.cpu_count", lambda: cores)
    monkeypatch.setattr("ray._private.utils.get_num_cpus", lambda *a, **k: cores)
    settings = ray_session.prestart(lanes, cpus)
    assert settings["num_workers_soft_limit"] == lanes
    assert settings["preload_python_modules"] == list(ray_session.TRIAL_MODULES)
    assert settings.get("enable_worker_prestart", False) == at_raylet_start
