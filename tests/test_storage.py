"""sweeps/storage.py on a local folder and on a ``file://`` URI, through pyarrow as Ray Tune
uses it. (s3:// and gs:// take the same code path but need a bucket: not tested here.)
The multi-node check runs on a real two-node cluster in test_cluster.py."""

import json
from types import SimpleNamespace

import pyarrow.fs as pafs
import pytest

from sweeps import storage


@pytest.fixture(params=["path", "uri"])
def location(request, tmp_path):
    """The same folder, as a plain path or as a file:// URI."""
    folder = tmp_path / "store"
    return str(folder) if request.param == "path" else f"file://{folder}"


def test_open_storage_resolves_paths_and_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = storage.open_storage("results")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path.resolve() / "results")
    fs, path = storage.open_storage(f"file://{tmp_path}/results")
    assert isinstance(fs, pafs.LocalFileSystem) and path == f"{tmp_path}/results"


def test_join_keeps_a_uris_query_last():
    assert storage.join("/shared/sweeps/", "s1", "best") == "/shared/sweeps/s1/best"
    assert storage.join("s3://bucket/sweeps?region=eu-west-1", "s1", "sweep_summary.json") == \
        "s3://bucket/sweeps/s1/sweep_summary.json?region=eu-west-1"
    assert storage.join("/data/a?b", "c") == "/data/a?b/c"  # a '?' in a plain path is just a name


def test_write_read_and_replace_text(location, tmp_path):
    target = storage.join(location, "s1", "sweep_summary.json")
    assert not storage.exists(target)
    storage.write_text(target, '{"name": "s1"}')
    storage.write_text(target, '{"name": "s1", "best": null}')
    assert storage.exists(target)
    assert storage.read_text(target) == '{"name": "s1", "best": null}'
    # Only the file itself: no temporary file left beside it.
    assert [p.name for p in (tmp_path / "store" / "s1").iterdir()] == ["sweep_summary.json"]


def test_upload_dir_keeps_the_layout(location, tmp_path):
    local = tmp_path / "local"
    (local / "best").mkdir(parents=True)
    (local / "best" / "model.pt").write_bytes(b"\x00weights")
    (local / "sweep_summary.json").write_text("{}")
    storage.upload_dir(local, storage.join(location, "s1"))
    out = tmp_path / "store" / "s1"
    assert (out / "best" / "model.pt").read_bytes() == b"\x00weights"
    assert (out / "sweep_summary.json").read_text() == "{}"


def test_sweep_folder_on_a_path_is_the_folder_itself(tmp_path):
    folder = storage.SweepFolder(str(tmp_path / "sweeps" / "s1"))
    assert not folder.remote and folder.local == tmp_path / "sweeps" / "s1" and folder.local.is_dir()
    assert folder.location("best", "model.pt") == str(tmp_path / "sweeps" / "s1" / "best" / "model.pt")
    (folder.local / "sweep_summary.json").write_text("{}")
    folder.publish()  # nothing to copy
    assert [p.name for p in folder.local.iterdir()] == ["sweep_summary.json"]


def test_sweep_folder_on_a_uri_is_written_locally_then_published(tmp_path):
    uri = f"file://{tmp_path}/bucket/s1"
    folder = storage.SweepFolder(uri)
    assert folder.remote and not str(folder.local).startswith(str(tmp_path / "bucket"))
    assert folder.location("sweep_summary.json") == f"{uri}/sweep_summary.json"
    (folder.local / "best").mkdir()
    (folder.local / "best" / "meta.json").write_text('{"val_acc": 0.9}')
    (folder.local / "sweep_summary.json").write_text('{"name": "s1"}')
    assert not storage.exists(folder.location("sweep_summary.json"))
    folder.publish()
    assert storage.read_text(folder.location("sweep_summary.json")) == '{"name": "s1"}'
    assert storage.read_text(folder.location("best", "meta.json")) == '{"val_acc": 0.9}'


def _plan(root: str, weights: str):
    return SimpleNamespace(data=SimpleNamespace(dataset=SimpleNamespace(root=root)),
                           space=SimpleNamespace(config=lambda: SimpleNamespace(weights=weights)))


def test_trial_inputs_are_the_dataset_and_a_weights_file():
    assert storage.trial_inputs(_plan("/shared/data/flowers", "imagenet")) == \
        {"/shared/data/flowers": "the dataset (--data)"}
    assert storage.trial_inputs(_plan("/shared/data/flowers", "/shared/w/r50.pt")) == {
        "/shared/data/flowers": "the dataset (--data)",
        "/shared/w/r50.pt": "the pretrained weights (--weights)"}


def test_a_node_reports_the_paths_it_cannot_see(tmp_path):
    (tmp_path / "here").mkdir()
    assert storage._missing([str(tmp_path / "here"), str(tmp_path / "gone")]) == [str(tmp_path / "gone")]


@pytest.mark.slow
def test_a_sweep_writes_its_summary_and_best_model_through_a_storage_uri(tmp_path, cache_dir):
    from conftest import run_sweep

    uri = f"file://{tmp_path}/store"
    proc = run_sweep(["--space", "smoke", "--trials", "2", "--max-epochs", "1", "--name", "via-uri",
                      "--storage", uri, "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    printed = proc.stdout.strip().splitlines()[-1]
    assert printed == f"{uri}/via-uri/sweep_summary.json"
    summary = json.loads(storage.read_text(printed))
    assert sum(summary["trials"].values()) == 2
    assert summary["best"]["checkpoint"] == f"{uri}/via-uri/best/model.pt"
    assert storage.exists(summary["best"]["checkpoint"])
    assert len(list((tmp_path / "store" / "via-uri").glob("trial_*/checkpoint_*"))) >= 2
