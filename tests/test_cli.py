"""Bad input stops the sweep before anything starts: exit 2, a message naming the culprit,
no MLflow run, no Ray."""

import subprocess

import pytest
import ray

from sweeps.cli import build_parser
from sweeps.run import main

from conftest import RUN, free_port

FLAGS = ["--space", "--data", "--model", "--weights", "--image-size", "--trials", "--max-epochs",
         "--cpus-per-trial", "--gpus-per-trial", "--max-concurrent", "--seed", "--tracking-uri",
         "--experiment", "--storage", "--name", "--resume", "--time-budget", "--set",
         "--val-fraction", "--split-seed", "--skip-bad-images", "--max-failures", "--ray-address"]


def test_help_documents_every_flag():
    out = subprocess.run([*RUN, "--help"], capture_output=True, text=True, check=True).stdout
    for flag in FLAGS:
        assert flag in out
    for action in build_parser()._actions:
        assert action.help, action.option_strings


@pytest.fixture
def in_tmp(tmp_path, monkeypatch, cache_dir):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def fails(argv, capsys, *culprits):
    assert main(argv) == 2
    err = capsys.readouterr().err
    for c in culprits:
        assert c in err, err
    assert not ray.is_initialized()
    return err


def test_unknown_space(in_tmp, capsys):
    fails(["--space", "lr_dekay"], capsys, "unknown space 'lr_dekay'", "lr_decay")


def test_malformed_space_file(in_tmp, capsys):
    (in_tmp / "bad.yaml").write_text("search:\n  lr: {type: loguniform, low: 0.1, high: 0.001}\n")
    fails(["--space", str(in_tmp / "bad.yaml")], capsys, "bad.yaml", "search.lr", "reversed bounds")


def test_unknown_model_suggests_close_matches(in_tmp, capsys):
    fails(["--space", "smoke", "--model", "resnet181"], capsys, "resnet181", "resnet18")


def test_frozen_depth_beyond_the_models_stages(in_tmp, capsys):
    (in_tmp / "deep.yaml").write_text("search:\n  frozen_depth: {type: int, low: 0, high: 9}\n")
    fails(["--space", str(in_tmp / "deep.yaml")], capsys, "frozen_depth goes up to 9", "resnet18 has 5 stages")


def test_non_positive_learning_rate_via_set(in_tmp, capsys):
    fails(["--space", "seed_recipe", "--set", "lr=0"], capsys, "lr must be > 0")


def test_set_unknown_key(in_tmp, capsys):
    fails(["--space", "seed_recipe", "--set", "epochs=3"], capsys, "unknown trial config key 'epochs'")


def test_gpus_on_a_machine_without_one(in_tmp, capsys):
    fails(["--space", "smoke", "--gpus-per-trial", "0.5"], capsys, "--gpus-per-trial 0.5", "no CUDA GPU")


def test_more_cpus_per_trial_than_the_machine_has(in_tmp, capsys):
    """Ray would wait forever for a node that fits the trial; refuse before anything starts."""
    from ray._private.utils import get_num_cpus

    too_many = str(get_num_cpus() + 1)
    fails(["--space", "smoke", "--cpus-per-trial", too_many], capsys, f"--cpus-per-trial {too_many}",
          "no trial could ever start")
    assert not (in_tmp / "mlflow.db").exists()


def test_unreachable_tracking_server(in_tmp, capsys):
    uri = f"http://127.0.0.1:{free_port()}"
    fails(["--space", "smoke", "--tracking-uri", uri], capsys, uri, "unreachable")


def test_missing_data_folder(in_tmp, capsys):
    fails(["--space", "smoke", "--data", str(in_tmp / "nope")], capsys, "nope")


def test_weights_file_that_does_not_fit(in_tmp, capsys, image_folder):
    import torch
    import torchvision

    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), in_tmp / "w.pt")
    fails(["--space", "smoke", "--data", str(image_folder), "--weights", str(in_tmp / "w.pt")],
          capsys, "w.pt", "unexpected")


def test_nothing_was_logged(in_tmp, capsys):
    fails(["--space", "smoke", "--model", "nosuchnet"], capsys, "nosuchnet")
    assert not (in_tmp / "mlflow.db").exists()
    assert not (in_tmp / "sweep_results").exists()


def test_running_as_a_script_exits_2(in_tmp):
    proc = subprocess.run([*RUN, "--space", "nope"], capture_output=True, text=True, cwd=in_tmp)
    assert proc.returncode == 2 and "unknown space 'nope'" in proc.stderr


def test_image_size_the_model_cannot_take(in_tmp, capsys, image_folder):
    fails(["--space", "smoke", "--data", str(image_folder), "--weights", "none", "--model", "vit_b_32",
           "--image-size", "32"], capsys, "vit_b_32 does not accept 32x32 images")


def test_a_ray_address_where_nothing_listens_exits_2_naming_it(tmp_path, capsys):
    port = free_port()
    code = main(["--space", "smoke", "--ray-address", f"127.0.0.1:{port}", "--tracking-uri",
                 f"sqlite:///{tmp_path}/m.db", "--storage", str(tmp_path / "s")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"--ray-address 127.0.0.1:{port}: no Ray cluster answers" in err
    assert not (tmp_path / "m.db").exists()  # nothing logged
