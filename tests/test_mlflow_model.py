"""sweeps/records/mlflow_model.py: the best model as an MLflow Model. Loaded with
``mlflow.pyfunc.load_model("runs:/<parent>/model")`` it predicts, from image bytes or file
paths, the classes and probabilities sweeps/tools/predict.py writes for the same images."""

import csv
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from torchvision.models import get_model

from sweeps.records import best_model, mlflow_model
from sweeps.records.tracking import TAG_ROLE, TAG_SWEEP
from sweeps.records.writer import Writer
from sweeps.tools import predict

from conftest import ROOT, write_image_folder

CLASSES = ["cat", "dog", "fox"]

pytestmark = pytest.mark.usefixtures("mlflow_env")


def tiny_best(folder: Path, seed: int = 0, val_acc: float = 0.5) -> Path:
    """``best/`` as a sweep writes it (model.pt, meta.json) for an untrained torchvision model."""
    torch.manual_seed(seed)
    model = get_model("resnet18", num_classes=len(CLASSES))
    with torch.no_grad():
        model.fc.weight.mul_(20)  # confident enough that images of other colours get other classes
    folder.mkdir(parents=True)
    torch.save(model.state_dict(), folder / "model.pt")
    meta = {"model": "resnet18", "classes": CLASSES, "image_size": 32, "mean": [0.4, 0.5, 0.6],
            "std": [0.2, 0.25, 0.3], "config": {"batch_size": 2, "seed": seed}, "val_acc": val_acc, "epoch": 3}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


class Tracker:
    """What ``best_model.log_model`` needs of a SweepTracker: its writer, with the parent run."""

    def __init__(self, client, run_id: str):
        self.parent_id = run_id
        self.write = Writer(client)
        self.write.run_ids["parent"] = run_id


def logged_sweep(uri: str, root: Path, name: str, seed: int = 0, val_acc: float = 0.5) -> str:
    """A finished sweep's parent run as the sweep leaves it (best/ and the MLflow Model model/),
    written through the sweep's own writer; returns its run id."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny") or client.get_experiment(client.create_experiment("tiny"))
    run_id = client.create_run(exp.experiment_id, run_name=name, tags={TAG_SWEEP: name, TAG_ROLE: "parent"}).info.run_id
    best = tiny_best(root / "best", seed, val_acc)
    tracker = Tracker(client, run_id)
    assert best_model.log_model(tracker, best, root / "model")
    tracker.write("artifacts", "parent", local_dir=str(best), artifact_path="best")
    tracker.write("end", "parent", status="FINISHED")
    assert tracker.write.close() == []
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite store with one logged tiny sweep: (tracking URI, parent run id)."""
    root = tmp_path_factory.mktemp("pyfunc")
    uri = f"sqlite:///{root}/mlflow.db"
    return uri, logged_sweep(uri, root, "tiny-sweep")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    root = write_image_folder(tmp_path_factory.mktemp("imgs") / "images", classes=("a", "b", "c"), per_class=3)
    return sorted(p for p in root.rglob("*") if p.is_file())


def predict_csv(uri: str, run: str, images: list[Path], out: Path) -> dict[str, dict[str, float]]:
    """sweeps/tools/predict.py's answer for ``images`` (all in one folder tree): path -> class -> probability."""
    root = Path(*images[0].parts[:-2])
    assert predict.main(["--tracking-uri", uri, "--run", run, "--images", str(root), "--out", str(out),
                         "--top-k", str(len(CLASSES))]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    pairs = [("prediction", "probability")] + [(f"top{k}", f"top{k}_prob") for k in range(2, len(CLASSES) + 1)]
    return {r["path"]: {r[c]: float(r[p]) for c, p in pairs} for r in rows}


def assert_same(answer: pd.DataFrame, images: list[Path], expected: dict[str, dict[str, float]]) -> None:
    assert len(answer) == len(images) == len(expected)
    for path, (_, row) in zip(images, answer.iterrows(), strict=True):
        want = expected[str(path)]
        assert row["prediction"] == max(want, key=want.get)
        assert row["probability"] == pytest.approx(want[row["prediction"]], abs=1e-6)
        assert row["probabilities"] == pytest.approx(want, abs=1e-6)
        assert sum(row["probabilities"].values()) == pytest.approx(1, abs=1e-5)


@pytest.mark.slow
def test_pyfunc_predicts_what_predict_py_writes(store, images, tmp_path, monkeypatch):
    import mlflow.pyfunc

    uri, run_id = store
    expected = predict_csv(uri, run_id, images, tmp_path / "preds.csv")
    assert len({max(p, key=p.get) for p in expected.values()}) > 1  # the test can tell classes apart

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    by_bytes = model.predict(pd.DataFrame({"image": [p.read_bytes() for p in images]}))
    assert_same(by_bytes, images, expected)
    by_path = model.predict(pd.DataFrame({"image": [str(p) for p in images]}))
    assert_same(by_path, images, expected)


@pytest.mark.slow
def test_model_carries_signature_example_metadata_and_requirements(store, tmp_path):
    import mlflow.artifacts
    from mlflow.models import Model

    uri, run_id = store
    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model", dst_path=str(tmp_path),
                                                     tracking_uri=uri))
    from sweeps.records import registry

    # One artifact path, spelt in three modules so the pre-Ray checks need not import the pyfunc.
    assert mlflow_model.ARTIFACT_PATH == registry.ARTIFACT_PATH == best_model.MODEL_DIR == "model"
    info = Model.load(str(local / "MLmodel"))
    assert info.metadata["classes"] == CLASSES and info.metadata["image_size"] == 32
    assert info.signature.inputs.input_names() == ["image"]
    assert info.signature.inputs.input_types()[0].name == "binary"
    assert info.signature.outputs.input_names() == ["prediction", "probability", "probabilities"]
    example = json.loads((local / "serving_input_example.json").read_text())
    assert example["dataframe_split"]["columns"] == ["image"]
    requirements = (local / "requirements.txt").read_text().split()
    assert {r.split("==")[0].split(">=")[0] for r in requirements} >= {"mlflow", "torch", "torchvision", "pillow"}
    assert sorted(p.name for p in (local / "code").iterdir()) == ["sweeps", "trainables"]
    # The plain state_dict stays for torchvision users, beside the MLflow Model.
    best = Path(MlflowClient(uri).download_artifacts(run_id, "best", str(tmp_path / "b")))
    meta = json.loads((best / "meta.json").read_text())
    net = get_model(meta["model"], num_classes=len(meta["classes"]))
    net.load_state_dict(torch.load(best / "model.pt", weights_only=True))


@pytest.mark.slow
def test_a_non_image_is_an_invalid_input_naming_its_row(store, images):
    import mlflow.pyfunc

    uri, run_id = store
    local = MlflowClient(uri).download_artifacts(run_id, "model", str(images[0].parents[2] / "dl"))
    model = mlflow.pyfunc.load_model(local)
    for bad, says in [(b"not an image", "row 1: 12 bytes is not a readable image"), (3.5, "row 1: image must be")]:
        with pytest.raises(MlflowException) as e:
            model.unwrap_python_model().predict(None, pd.DataFrame({"image": [images[0].read_bytes(), bad]}))
        assert e.value.error_code == "INVALID_PARAMETER_VALUE" and says in e.value.message
    with pytest.raises(MlflowException, match="image"):
        model.predict(pd.DataFrame({"picture": [images[0].read_bytes()]}))


def test_probabilities_are_the_softmax_of_the_sweeps_val_batches():
    """``probabilities`` crops and normalises as the sweep's val batches do (Batches)."""
    from trainables.pipeline import Batches

    torch.manual_seed(0)
    net = get_model("resnet18", num_classes=3).eval()
    meta = {"classes": CLASSES, "image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}
    images = np.random.default_rng(0).integers(0, 256, (5, 37, 37, 3), dtype=np.uint8)
    x, _ = next(iter(Batches(images, np.zeros(5, np.int64), 5, mean=meta["mean"], std=meta["std"],
                             shuffle=False, crop=32)))
    assert x.shape == (5, 3, 32, 32)
    with torch.no_grad():
        want = torch.softmax(net(x), 1)
    torch.testing.assert_close(mlflow_model.probabilities(net, meta, images, 2), want)


def test_the_model_loads_and_predicts_where_the_project_cannot_be_imported(tmp_path, images):
    """A serving host has MLflow, torch and torchvision but not this project: the model's
    code/ must hold everything it imports. ``python -S`` skips the site hooks (this
    checkout's editable install among them); only site-packages goes on the path."""
    import subprocess
    import sys
    import sysconfig

    from sweeps.records import mlflow_model

    best = tiny_best(tmp_path / "best")
    saved = mlflow_model.save(best, tmp_path / "model")
    code = ("import sys, sysconfig\n"
            f"sys.path[:] = [p for p in sys.path if p and not p.startswith({str(ROOT)!r})]\n"
            f"sys.path.append({sysconfig.get_paths()['purelib']!r})\n"
            "import importlib.util\n"
            "assert importlib.util.find_spec('trainables') is None and importlib.util.find_spec('sweeps') is None\n"
            "import mlflow.pyfunc, pandas as pd\n"
            f"model = mlflow.pyfunc.load_model({str(saved)!r})\n"
            f"out = model.predict(pd.DataFrame({{'image': {[str(p) for p in images[:3]]!r}}}))\n"
            "print(list(out['prediction']))")
    proc = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(c in CLASSES for c in eval(proc.stdout.strip().splitlines()[-1]))


def test_predict_writes_names_that_are_not_utf8_escaped(store, tmp_path):
    uri, run_id = store
    folder = write_image_folder(tmp_path / "imgs", classes=("a",), per_class=2)
    first = sorted((folder / "a").iterdir())[0]
    os.rename(first, os.path.join(os.fsencode(folder / "a"), b"caf\xe9" + os.fsencode(first.suffix)))
    out = tmp_path / "preds.csv"
    assert predict.main(["--tracking-uri", uri, "--run", run_id, "--images", str(folder), "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out, encoding="utf-8")))
    assert len(rows) == 2 and any(r["path"].endswith(f"caf\\xe9{first.suffix}") for r in rows)
