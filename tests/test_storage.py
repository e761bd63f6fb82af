"""sweeps/results/storage.py on a local folder, on a ``file://`` URI, on an ``s3://`` bucket (a moto
S3 server on 127.0.0.1) and on a ``gs://`` bucket (gcp-storage-emulator on 127.0.0.1), through
pyarrow as Ray Tune uses it. The multi-node check runs on a real two-node cluster in
test_cluster.py."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from types import SimpleNamespace

import pyarrow.fs as pafs
import pytest

from sweeps.plan.prepare import Plan
from sweeps.results import storage

from conftest import RUN, free_port, run_sweep, stop_group, wait_http

# Dummy credentials for the moto server; the sweep's driver passes them on to the local Ray
# it starts, so its trials upload their checkpoints with them too.
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


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


def test_a_sweep_under_a_uri_with_a_query_keeps_the_query_last():
    uri = "s3://bucket/sweeps?endpoint_override=127.0.0.1:9000&scheme=http"
    plan = SimpleNamespace(storage=uri, name="nightly")
    assert Plan.sweep_dir.fget(plan) == "s3://bucket/sweeps/nightly?endpoint_override=127.0.0.1:9000&scheme=http"
    assert Plan.sweep_dir.fget(SimpleNamespace(storage="/shared/sweeps/", name="nightly")) == "/shared/sweeps/nightly"
    folder = storage.SweepFolder(Plan.sweep_dir.fget(plan))
    assert folder.remote and folder.location("best", "model.pt") == \
        "s3://bucket/sweeps/nightly/best/model.pt?endpoint_override=127.0.0.1:9000&scheme=http"


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
    # both trials ended: what stays is the best trial's best checkpoint (--keep-checkpoints 1)
    kept = list((tmp_path / "store" / "via-uri").glob("trial_*/checkpoint_*"))
    assert len(kept) == summary["checkpoints"]["kept"] == 1 and summary["checkpoints"]["freed"] >= 1


@pytest.fixture
def s3_bucket(tmp_path):
    """A moto S3 server on 127.0.0.1, in its own process group, with an empty bucket
    ``sweeps``: yields the ``--storage`` URI of a folder in it and a boto3 client."""
    import boto3

    port = free_port()
    log = open(tmp_path / "moto.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, **S3_ENV}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(endpoint, proc=proc)
        client = boto3.client("s3", endpoint_url=endpoint, region_name=S3_ENV["AWS_DEFAULT_REGION"],
                              aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"])
        client.create_bucket(Bucket="sweeps")
        yield f"s3://sweeps/results?endpoint_override=127.0.0.1:{port}&scheme=http", client
    finally:
        stop_group(proc)
        log.close()


def _keys(client, prefix: str) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket="sweeps", Prefix=prefix)
    return {obj["Key"] for page in pages for obj in page.get("Contents", [])}


@pytest.mark.slow
def test_a_sweep_killed_and_resumed_on_s3_keeps_summary_checkpoints_and_best_model_in_the_bucket(
        s3_bucket, tmp_path, cache_dir):
    import io

    import torch
    from mlflow.tracking import MlflowClient

    uri, s3 = s3_bucket
    # enough trials that some are left when the first ends, with every lane busy at once
    trials, tracking = 6, f"sqlite:///{tmp_path}/mlflow.db"
    # One epoch per trial keeps it short; a record older than a trial's checkpoints is tested
    # in test_promotion_sweeps (a killed promotion sweep) and test_restored.
    args = ["--space", "smoke", "--trials", str(trials), "--max-epochs", "1", "--name", "on-s3",
            "--storage", uri, "--tracking-uri", tracking]
    driver = subprocess.Popen([*RUN, *args], cwd=tmp_path, env={**os.environ, **S3_ENV},
                              stdout=open(tmp_path / "first.log", "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    client = MlflowClient(tracking)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and driver.poll() is None and not _ended_trials(client):
            time.sleep(0.5)
        assert driver.poll() is None, "the sweep finished (or failed) before it could be killed:\n" + \
            (tmp_path / "first.log").read_text()[-3000:]
        os.kill(driver.pid, signal.SIGKILL)  # no cleanup: only what already is in the bucket survives
        driver.wait()
    finally:
        stop_group(driver)  # and the local Ray it started
    parent = _runs(client, "parent")[0].info.run_id
    assert not _keys(s3, "results/on-s3/sweep_summary.json")  # written at the end only

    again = run_sweep([*args, "--resume"], tmp_path, env=S3_ENV)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    printed = again.stdout.strip().splitlines()[-1]
    assert printed == storage.join(uri, "on-s3", "sweep_summary.json")

    keys = _keys(s3, "results/on-s3/")
    summary = json.loads(s3.get_object(Bucket="sweeps", Key="results/on-s3/sweep_summary.json")["Body"].read())
    assert summary["parent_run_id"] == parent and sum(summary["trials"].values()) == trials
    assert summary["best"]["checkpoint"] == storage.join(uri, "on-s3", "best", "model.pt")
    meta = json.loads(s3.get_object(Bucket="sweeps", Key="results/on-s3/best/meta.json")["Body"].read())
    assert meta["val_acc"] == summary["best"]["val_acc"]
    model = s3.get_object(Bucket="sweeps", Key="results/on-s3/best/model.pt")["Body"].read()
    assert "fc.weight" in torch.load(io.BytesIO(model), weights_only=True)
    # Every trial of the sweep is counted once; every one ended, so what stays in the bucket
    # is the best trial's best checkpoint (--keep-checkpoints 1), the rest freed.
    trial_ids = {r.data.tags["ftsweep.trial_id"] for r in _runs(client, "trial")}
    assert len(trial_ids) == trials
    for trial_id in trial_ids:  # the results resume and ASHA's replay read came back from the bucket
        assert f"results/on-s3/trial_{trial_id}/result.json" in keys, (trial_id, sorted(keys))
    kept = {k.rsplit("/", 1)[0] for k in keys if "/checkpoint_" in k and k.endswith("/checkpoint.pt")}
    assert len(kept) == summary["checkpoints"]["kept"] == 1, sorted(keys)
    best_run = summary["best"]["run_id"]
    best_trial = next(r.data.tags["ftsweep.trial_id"] for r in _runs(client, "trial") if r.info.run_id == best_run)
    assert next(iter(kept)).startswith(f"results/on-s3/trial_{best_trial}/checkpoint_")


def _runs(client, role: str) -> list:
    experiment = client.get_experiment_by_name("ftsweep-digits5-9")
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id],
                              f"tags.`ftsweep.sweep` = 'on-s3' and tags.`ftsweep.role` = '{role}'")


def _ended_trials(client) -> list:
    return [r for r in _runs(client, "trial") if r.data.tags.get("outcome") != "running"]


@pytest.fixture
def gcs_bucket(tmp_path):
    """gcp-storage-emulator on 127.0.0.1, in its own process group, with an empty bucket
    ``sweeps``: yields the ``--storage`` URI of a folder in it and the emulator's JSON API URL.

    The URI's ``anonymous@`` makes pyarrow send no credentials (by default it asks Google's
    metadata server for a token, and retries for minutes when there is none)."""
    port = free_port()
    log = open(tmp_path / "gcs.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
                             "--port", str(port), "--in-memory", "--default-bucket", "sweeps"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{port}/storage/v1/b/sweeps"
    try:
        wait_http(api, proc=proc)
        query = f"endpoint_override=127.0.0.1:{port}&scheme=http&retry_limit_seconds=10"
        yield f"gs://anonymous@sweeps/results?{query}", api
    finally:
        stop_group(proc)
        log.close()


def _gcs_files(api: str, prefix: str) -> dict[str, bytes]:
    """The bucket's objects under ``prefix`` and their bytes, read through the emulator's JSON API,
    less the empty ``.../`` objects pyarrow writes as folders.

    (The emulator answers one request at a time, and pyarrow's copy_files out of a bucket asks for
    an object's metadata while its download is still open: a file of more than a socket buffer
    or two stalls there until the retry limit. So big files are read back this way.)"""
    with urllib.request.urlopen(f"{api}/o?prefix={urllib.parse.quote(prefix)}") as r:
        names = [item["name"] for item in json.load(r).get("items", [])]
    objects = {}
    for name in (n for n in names if not n.endswith("/")):
        with urllib.request.urlopen(f"{api}/o/{urllib.parse.quote(name, safe='')}?alt=media") as r:
            objects[name] = r.read()
    return objects


def test_storage_on_a_gcs_bucket(gcs_bucket):
    uri, api = gcs_bucket
    fs, path = storage.open_storage(uri)
    assert isinstance(fs, pafs.GcsFileSystem) and path == "sweeps/results"

    target = storage.join(uri, "s1", "sweep_summary.json")
    assert target == uri.replace("/results?", "/results/s1/sweep_summary.json?")
    assert not storage.exists(target)
    storage.write_text(target, '{"name": "s1"}')
    storage.write_text(target, '{"name": "s1", "best": null}')
    assert storage.exists(target) and not storage.exists(storage.join(uri, "s1", "other.json"))
    assert storage.read_text(target) == '{"name": "s1", "best": null}'
    assert _gcs_files(api, "results/") == {"results/s1/sweep_summary.json": b'{"name": "s1", "best": null}'}

    folder = storage.SweepFolder(storage.join(uri, "s2"))
    assert folder.remote
    assert folder.location("best", "model.pt") == uri.replace("/results?", "/results/s2/best/model.pt?")
    weights = os.urandom(5_000_000)  # a few MB, as checkpoints are: pyarrow uploads it in several chunks
    (folder.local / "best").mkdir()
    (folder.local / "best" / "model.pt").write_bytes(weights)
    (folder.local / "sweep_summary.json").write_text('{"name": "s2"}')
    assert not storage.exists(folder.location("sweep_summary.json"))
    folder.publish()
    assert storage.read_text(folder.location("sweep_summary.json")) == '{"name": "s2"}'
    assert storage.exists(folder.location("best", "model.pt"))
    assert _gcs_files(api, "results/s2/") == {"results/s2/sweep_summary.json": b'{"name": "s2"}',
                                              "results/s2/best/model.pt": weights}


@pytest.mark.slow
def test_a_restored_trial_on_s3_whose_recorded_checkpoint_is_gone_resumes_from_the_newer_one(
        s3_bucket, monkeypatch):
    """sweeps/tune/restored.py on the bucket: S3 has no folders, only keys under prefixes."""
    from ray import tune
    from ray.train._internal.session import _TrainingResult
    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment import Trial

    from sweeps.tune import restored

    uri, s3 = s3_bucket
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    tune.register_trainable("s3_fake", lambda config: None)
    storage = StorageContext(storage_path=uri, experiment_dir_name="sweep", trial_dir_name="trial_a")
    trial = Trial("s3_fake", config={"lr": 0.1}, trial_id="a", storage=storage,
                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val_acc",
                                                          checkpoint_score_order="max"))
    prefix = "results/sweep/trial_a"
    for i in (1, 2):
        s3.put_object(Bucket="sweeps", Key=f"{prefix}/checkpoint_00000{i}/checkpoint.pt", Body=b"x")
    first = {"val_acc": 0.5, "training_iteration": 2, "checkpoint_dir_name": "checkpoint_000001"}
    trial.on_checkpoint(_TrainingResult(
        tune.Checkpoint(f"{storage.trial_fs_path}/checkpoint_000001", filesystem=storage.storage_filesystem), first))
    trial.run_metadata.last_result = first
    s3.delete_object(Bucket="sweeps", Key=f"{prefix}/checkpoint_000001/checkpoint.pt")  # Tune deleted it
    s3.put_object(Bucket="sweeps", Key=f"{prefix}/result.json",
                  Body=(json.dumps(first) + "\n" + json.dumps({**first, "val_acc": 0.6, "training_iteration": 3,
                                                               "checkpoint_dir_name": "checkpoint_000002"})).encode())
    trial.set_status(Trial.PENDING)

    assert restored.catch_up_checkpoint(trial) == "checkpoint_000002"
    assert trial.checkpoint.path == f"{storage.trial_fs_path}/checkpoint_000002"
    assert trial.latest_checkpoint_result.metrics["training_iteration"] == 3
    assert f"{prefix}/checkpoint_000002/checkpoint.pt" in _keys(s3, prefix)
