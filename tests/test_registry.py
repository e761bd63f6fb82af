"""sweeps/records/registry.py: --register makes the best model a version of a registered model; the
alias champion moves only to a better val_acc on the same data. With a sqlite store and a
real mlflow server; a store without a registry stops the sweep before it starts."""

import json

import pytest
from mlflow.tracking import MlflowClient
from test_mlflow_model import logged_sweep, predict_csv

from sweeps.records import registry
from sweeps.run import main as run_main
from sweeps.tools import export, predict

from conftest import run_sweep, write_image_folder

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("mlflow_env")]


def champion_moves_only_to_better_on_the_same_data(uri, tmp_path, capsys):
    """Four sweeps registered in turn: the champion follows val_acc on one fingerprint."""
    sweeps = [("s1", "fp-a", 0.50), ("s2", "fp-a", 0.40), ("s3", "fp-a", 0.70), ("s4", "fp-b", 0.99)]
    runs = {}
    for i, (name, fingerprint, acc) in enumerate(sweeps):
        runs[name] = logged_sweep(uri, tmp_path / name, name, seed=i, val_acc=acc)
        capsys.readouterr()
        registry.register(uri, "digits", runs[name], fingerprint, acc, name)
        said = capsys.readouterr().out
        assert f"Registered the best model as digits version {i + 1} (models:/digits/{i + 1})" in said
        if name == "s1":
            assert "champion -> digits version 1: the model had no champion" in said
        elif name == "s2":
            assert "champion stays digits version 1: val_acc 0.4000 does not beat its 0.5000 on the same data" in said
        elif name == "s3":
            assert "champion moved from digits version 1 to version 3: val_acc 0.7000 beats 0.5000" in said
        else:
            assert "champion stays digits version 3: it was trained on other data (dataset fingerprint fp-a" in said
    client = MlflowClient(uri, registry_uri=uri)
    assert int(client.get_model_version_by_alias("digits", "champion").version) == 3
    v3 = client.get_model_version("digits", "3")
    assert v3.tags == {"parent_run_id": runs["s3"], "dataset_fingerprint": "fp-a", "val_acc": "0.7",
                       "sweep": "s3"}
    assert v3.run_id == runs["s3"]
    return runs


def test_registry_with_sqlite(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    runs = champion_moves_only_to_better_on_the_same_data(uri, tmp_path, capsys)

    # predict and export load a registered version through MLflow, as they load a sweep's run.
    images = sorted(p for p in write_image_folder(tmp_path / "imgs", classes=("a", "b")).rglob("*") if p.is_file())
    by_alias = predict_csv(uri, "models:/digits@champion", images, tmp_path / "alias.csv")
    assert by_alias == predict_csv(uri, runs["s3"], images, tmp_path / "run.csv")
    assert by_alias != predict_csv(uri, "models:/digits/1", images, tmp_path / "v1.csv")
    assert "digits@champion" in capsys.readouterr().err
    out = tmp_path / "champion.pt"
    assert export.main(["--tracking-uri", uri, "--run", "models:/digits/3", "--out", str(out)]) == 0
    assert out.stat().st_size > 0

    for missing in ["models:/digits@nobody", "models:/digits/9", "models:/nothing@champion", "models:/x"]:
        for main, extra in [(predict.main, ["--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "p.csv")]),
                            (export.main, ["--out", str(tmp_path / "e.pt")])]:
            assert main(["--tracking-uri", uri, "--run", missing, *extra]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"error: {missing}"), err
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "e.pt").exists()


def test_registry_with_an_mlflow_server(mlflow_server, tmp_path, capsys):
    registry.check_registry(mlflow_server, "digits")
    runs = champion_moves_only_to_better_on_the_same_data(mlflow_server, tmp_path, capsys)
    images = sorted(p for p in write_image_folder(tmp_path / "imgs", classes=("a", "b")).rglob("*") if p.is_file())
    assert (predict_csv(mlflow_server, "models:/digits@champion", images, tmp_path / "a.csv")
            == predict_csv(mlflow_server, runs["s3"], images, tmp_path / "r.csv"))


def test_a_store_without_registry_exits_2_before_training(tmp_path, capsys):
    store = tmp_path / "mlruns"
    code = run_main(["--space", "smoke", "--tracking-uri", f"file://{store}", "--register", "digits",
                     "--storage", str(tmp_path / "results")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"error: --register digits: the tracking store file://{store} has no usable Model Registry" in err
    assert not (tmp_path / "results").exists()
    for bad in ["", "a/b", "a@b"]:
        assert run_main(["--space", "smoke", "--tracking-uri", f"sqlite:///{tmp_path}/x.db", "--register", bad,
                         "--storage", str(tmp_path / "results")]) == 2
        assert "--register" in capsys.readouterr().err
    assert not (tmp_path / "x.db").exists()


@pytest.mark.parametrize("store", ["sqlite", "server"])
def test_a_sweep_registers_its_best_model_and_logs_its_dataset(store, image_folder, cache_dir, tmp_path, request):
    """The whole path: a real sweep with --register; its runs carry the dataset input."""
    uri = request.getfixturevalue("mlflow_server") if store == "server" else f"sqlite:///{tmp_path}/mlflow.db"
    name = f"swept-{store}"  # the server is shared by the session's tests
    proc = run_sweep(["--space", "smoke", "--data", str(image_folder), "--weights", "none", "--image-size", "16",
                      "--trials", "2", "--max-epochs", "1", "--name", f"reg-test-{store}", "--tracking-uri", uri,
                      "--storage", str(tmp_path / "results"), "--register", name], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(open(proc.stdout.strip().splitlines()[-1]).read())
    assert f"Registered the best model as {name} version 1 (models:/{name}/1)" in proc.stdout
    assert f"champion -> {name} version 1: the model had no champion" in proc.stdout
    assert summary["registered"] == {"name": name, "version": 1, "champion": 1, "alias_moved": True,
                                     "reason": "the model had no champion"}
    client = MlflowClient(uri, registry_uri=uri)
    version = client.get_model_version_by_alias(name, "champion")
    parent = client.get_run(summary["parent_run_id"])
    fingerprint = parent.data.tags["dataset_fingerprint"]
    assert version.tags["parent_run_id"] == parent.info.run_id
    assert version.tags["dataset_fingerprint"] == fingerprint
    assert float(version.tags["val_acc"]) == pytest.approx(summary["best"]["val_acc"])

    # The dataset input: on the parent and on each trial, its digest the dataset fingerprint.
    trials = client.search_runs([summary["experiment_id"]], "tags.`ftsweep.role` = 'trial'")
    assert len(trials) == 2
    for run in [parent, *trials]:
        (given,) = client.get_run(run.info.run_id).inputs.dataset_inputs
        d = given.dataset
        assert (d.name, d.digest, d.source_type) == ("images", fingerprint, "local")
        assert json.loads(d.source)["uri"] == str(image_folder)
        profile = json.loads(d.profile)
        assert profile["train_images"] == int(parent.data.params["train_images"]) > 0
        assert profile["val_images"] == int(parent.data.params["val_images"]) > 0
        assert {t.key: t.value for t in given.tags} == {"mlflow.data.context": "training"}
    found = client.search_runs([summary["experiment_id"]], f"dataset.digest = '{fingerprint}'")
    assert len(found) == 3


def test_a_finished_sweep_is_registered_afterwards_by_the_same_rules(tmp_path, capsys):
    """``ftsweep register --run SWEEP NAME``: a version per sweep, the champion only on a better
    val_acc on the same data; a sweep still running, or an unknown one, exits 2."""
    from sweeps.command import main as ftsweep

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    for i, (name, acc) in enumerate([("first", 0.6), ("worse", 0.5)]):
        run_id = logged_sweep(uri, tmp_path / name, name, seed=i, val_acc=acc)
        client.log_metric(run_id, "best_val_acc", acc)
        client.set_tag(run_id, "dataset_fingerprint", "fp")
        assert ftsweep(["register", "--tracking-uri", uri, "--run", name, "digits"]) == 0
    said = capsys.readouterr().out
    assert "champion -> digits version 1" in said and "champion stays digits version 1" in said
    running = client.create_run(client.get_experiment_by_name("tiny").experiment_id,
                                tags={"ftsweep.sweep": "open", "ftsweep.role": "parent"}).info.run_id
    assert ftsweep(["register", "--tracking-uri", uri, "--run", running, "digits"]) == 2
    assert ftsweep(["register", "--tracking-uri", uri, "--run", "nosuch", "digits"]) == 2
    assert "no sweep named 'nosuch'" in capsys.readouterr().err
