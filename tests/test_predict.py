"""sweeps/tools/predict.py against a real sweep: on the sweep's own val split it must score
exactly the val_acc the sweep logged, and bad input fails clearly."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sweeps.tools.predict import build_parser, main
from trainables import demo
from trainables.data import scan

from conftest import DEMO_SWEEP, ROOT, assert_help_documents_every_flag, free_port

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("mlflow_env")]
PREDICT = [sys.executable, str(ROOT / "sweeps" / "tools" / "predict.py")]


@pytest.fixture(scope="module")
def sweep(demo_sweep):
    """The shared smoke sweep on the digits demo, logged to sqlite: (summary, tracking URI)."""
    return demo_sweep


def val_tree(root: Path, seed: int) -> int:
    """The sweep's val split rebuilt as ``root/<class>/<file>`` symlinks; returns its size."""
    dataset = scan(demo.transfer_folder(), 0.2, seed)
    for path, label in zip(dataset.val.paths, dataset.val.labels, strict=True):
        folder = root / dataset.classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / Path(path).name).symlink_to(path)
    return len(dataset.val)


def test_val_accuracy_equals_the_logged_best(sweep, tmp_path):
    summary, uri = sweep
    n = val_tree(tmp_path / "val", summary["best"]["config"]["seed"])
    out = tmp_path / "preds.csv"
    proc = subprocess.run([*PREDICT, "--tracking-uri", uri, "--run", summary["parent_run_id"],
                           "--images", str(tmp_path / "val"), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out)

    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "prediction", "probability", "top2", "top2_prob", "top3", "top3_prob"]
    assert len(rows) == n
    correct = sum(Path(r["path"]).parent.name == r["prediction"] for r in rows)

    client = MlflowClient(uri)
    meta = json.loads(Path(client.download_artifacts(summary["parent_run_id"], "best/meta.json",
                                                     str(tmp_path))).read_text())
    assert correct / n == pytest.approx(meta["val_acc"], abs=1e-9)
    assert correct / n == pytest.approx(summary["best"]["val_acc"], abs=1e-9)
    assert correct / n == pytest.approx(
        client.get_run(summary["parent_run_id"]).data.metrics["best_val_acc"], abs=1e-9)
    for r in rows:
        probs = [float(r["probability"]), float(r["top2_prob"]), float(r["top3_prob"])]
        assert 1 >= probs[0] >= probs[1] >= probs[2] >= 0
        assert len({r["prediction"], r["top2"], r["top3"]}) == 3


def image_dir(root: Path, good: int = 2) -> Path:
    """``good`` digit PNGs, a corrupt PNG, a hidden corrupt PNG and a text file."""
    sources = sorted((demo.transfer_folder() / "7").glob("*.png"))[:good]
    (root / "sub").mkdir(parents=True)
    for src in sources:
        shutil.copy(src, root / "sub" / src.name)
    (root / "broken.png").write_bytes(b"not a png")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "also-broken.png").write_bytes(b"not a png")
    (root / ".DS_Store.png").write_bytes(b"junk")
    (root / "notes.txt").write_text("not an image")
    return root


def test_unreadable_files_are_listed_and_left_out(sweep, tmp_path, capsys):
    summary, uri = sweep
    images, out = image_dir(tmp_path / "in"), tmp_path / "preds.csv"
    assert main(["--tracking-uri", uri, "--run", DEMO_SWEEP, "--images", str(images),
                 "--out", str(out), "--top-k", "1"]) == 0
    err = capsys.readouterr().err
    assert f"unreadable: {images / 'broken.png'}" in err
    assert "hidden" not in err and "DS_Store" not in err
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["path"]).parent for r in rows] == [images / "sub"] * 2
    assert list(rows[0]) == ["path", "prediction", "probability"]


def test_nothing_readable_exits_1(sweep, tmp_path, capsys):
    summary, uri = sweep
    images, out = image_dir(tmp_path / "in", good=0), tmp_path / "preds.csv"
    assert main(["--tracking-uri", uri, "--run", summary["parent_run_id"], "--images", str(images),
                 "--out", str(out)]) == 1
    assert "none of the 1 images" in capsys.readouterr().err
    assert not out.exists()


def other_runs(uri: str, summary: dict) -> dict:
    client = MlflowClient(uri)
    trial = client.search_runs([summary["experiment_id"]], "tags.`ftsweep.role` = 'trial'")[0]
    bare = client.create_run(summary["experiment_id"]).info.run_id
    client.set_terminated(bare)
    return {"trial": trial.info.run_id, "bare": bare}


def test_bad_input_exits_2_naming_the_problem(sweep, tmp_path, capsys):
    summary, uri = sweep
    runs = other_runs(uri, summary)
    images = image_dir(tmp_path / "in")
    ok = ["--run", summary["parent_run_id"], "--images", str(images), "--out", str(tmp_path / "p.csv")]
    cases = [
        (["--tracking-uri", uri, *ok[:2], "--images", str(tmp_path / "missing"), *ok[4:]], "no such folder"),
        (["--tracking-uri", uri, *ok[:2], "--images", str(tmp_path), *ok[4:], "--top-k", "0"], "--top-k"),
        (["--tracking-uri", uri, "--run", "0" * 32, *ok[2:]], "no run with id"),
        (["--tracking-uri", uri, "--run", "no-such-sweep", *ok[2:]], "no sweep named 'no-such-sweep'"),
        (["--tracking-uri", uri, "--run", runs["trial"], *ok[2:]],
         f"is a trial of sweep {DEMO_SWEEP}; pass the sweep's run {summary['parent_run_id']}"),
        (["--tracking-uri", uri, "--run", runs["bare"], *ok[2:]], "has no model/ artifact (the MLflow Model"),
        (["--tracking-uri", uri, "--run", "models:/no-such-model@champion", *ok[2:]],
         "models:/no-such-model@champion does not exist"),
        (["--tracking-uri", f"http://127.0.0.1:{free_port()}", *ok], "unreachable"),
        (["--tracking-uri", f"sqlite:///{tmp_path}/other.db", *ok], "other.db does not exist"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (argv, err)
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "other.db").exists()


def test_the_sweeps_mlflow_model_predicts_what_predict_py_writes(sweep, tmp_path, monkeypatch):
    """mlflow.pyfunc.load_model("runs:/<parent>/model") on image bytes: the classes and
    probabilities sweeps/tools/predict.py writes for the same files."""
    import mlflow.pyfunc
    import pandas as pd

    summary, uri = sweep
    images = tmp_path / "digits"
    for digit in "56789":
        (images / digit).mkdir(parents=True)
        for src in sorted((demo.transfer_folder() / digit).glob("*.png"))[:2]:
            shutil.copy(src, images / digit / src.name)
    out = tmp_path / "preds.csv"
    assert main(["--tracking-uri", uri, "--run", summary["parent_run_id"], "--images", str(images),
                 "--out", str(out), "--top-k", "5"]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = mlflow.pyfunc.load_model(f"runs:/{summary['parent_run_id']}/model")
    answer = model.predict(pd.DataFrame({"image": [Path(r["path"]).read_bytes() for r in rows]}))
    assert len(answer) == len(rows) == 10
    for row, (_, got) in zip(rows, answer.iterrows(), strict=True):
        want = {row[c]: float(row[p]) for c, p in [("prediction", "probability"), *[(f"top{k}", f"top{k}_prob")
                                                                                     for k in range(2, 6)]]}
        assert got["prediction"] == row["prediction"]
        assert got["probabilities"] == pytest.approx(want, abs=1e-6)


def test_a_sweep_without_its_mlflow_model_predicts_from_its_best_files(sweep, tmp_path):
    """The plain best/ files (state_dict, meta.json) are enough: a sweep whose MLflow Model
    could not be saved, or that predates it, still predicts, the same as with it."""
    summary, uri = sweep
    client = MlflowClient(uri)
    parent = client.get_run(summary["parent_run_id"])
    bare = client.create_run(parent.info.experiment_id, run_name="no-model",
                             tags={"ftsweep.sweep": "no-model", "ftsweep.role": "parent"}).info.run_id
    client.log_artifacts(bare, client.download_artifacts(parent.info.run_id, "best", str(tmp_path)), "best")
    client.set_terminated(bare)
    images = image_dir(tmp_path / "images")
    outs = []
    for run in (summary["parent_run_id"], "no-model"):
        out = tmp_path / f"{run}.csv"
        assert main(["--tracking-uri", uri, "--run", run, "--images", str(images), "--out", str(out)]) == 0
        with open(out, newline="") as f:
            outs.append([{k: v for k, v in row.items() if k != "path"} for row in csv.DictReader(f)])
    assert outs[0] == outs[1] and outs[0]


def test_help_documents_every_flag(capsys):
    assert_help_documents_every_flag(main, build_parser, capsys)
