"""A broken dataset is reported in full, with paths, before anything starts; or skipped."""

import pytest
import ray
from mlflow.tracking import MlflowClient

from sweeps.run import main
from trainables.data import DataError, DataHandle, scan

from conftest import write_image_folder


@pytest.fixture
def broken(tmp_path):
    root = write_image_folder(tmp_path / "pets", per_class=6)
    jpg = next((root / "cat").glob("*.jpg"))
    (root / "cat" / "truncated.jpg").write_bytes(jpg.read_bytes()[:200])  # a real, cut-off JPEG
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "dog" / "empty.png").write_bytes(b"")
    (root / "dog" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden: ignored
    return root


def test_every_problem_is_listed_with_its_path(broken, tmp_path):
    handle = DataHandle(scan(broken, val_fraction=0.3), 16, str(tmp_path / "cache"))
    with pytest.raises(DataError) as err:
        handle.prepare(skip_bad=False)
    msg = str(err.value)
    assert "3 problem(s)" in msg
    for name in ("truncated.jpg", "notes.txt: not an image", "empty.png"):
        assert name in msg
    assert ".DS_Store" not in msg and "--skip-bad-images" in msg
    assert not handle.path.exists()  # no half-built cache


def test_skip_bad_images_leaves_them_out(broken, tmp_path):
    ds = scan(broken, val_fraction=0.3)
    handle = DataHandle(ds, 16, str(tmp_path / "cache")).prepare(skip_bad=True)
    assert len(handle.dataset) == len(ds) - 2  # the two unreadable images; notes.txt was never one
    assert len(handle.dataset.skipped) == 3
    x, y = handle.arrays("train")
    assert len(x) == len(y) == len(handle.dataset.train)


def test_structural_and_file_problems_are_reported_in_one_pass(broken):
    """An empty class folder, a truncated JPEG, an empty PNG and a text file: one report
    names them all, before any decoding, so the user fixes everything at once."""
    (broken / "bird").mkdir()
    with pytest.raises(DataError) as err:
        scan(broken, val_fraction=0.3)
    msg = str(err.value)
    assert "4 problem(s)" in msg
    for problem in ("bird: empty class folder", "dog/notes.txt: not an image", "cat/truncated.jpg: unreadable image",
                    "dog/empty.png: unreadable image"):
        assert problem in msg, msg
    assert ".DS_Store" not in msg


def test_empty_class_and_missing_val_class_are_reported_together(tmp_path):
    write_image_folder(tmp_path / "train", classes=("a", "b", "c"), per_class=2)
    write_image_folder(tmp_path / "val", classes=("a", "b"), per_class=2)
    (tmp_path / "train" / "d").mkdir()
    (tmp_path / "val" / "d").mkdir()
    with pytest.raises(DataError) as err:
        scan(tmp_path)
    msg = str(err.value)
    assert "class 'c' is in train but not in val" in msg
    assert "train/d: empty class folder" in msg and "val/d: empty class folder" in msg


def test_the_cli_stops_with_exit_2_and_logs_nothing(broken, tmp_path, monkeypatch, capsys, cache_dir):
    monkeypatch.chdir(tmp_path)
    assert main(["--space", "smoke", "--data", str(broken), "--weights", "none"]) == 2
    err = capsys.readouterr().err
    assert "truncated.jpg" in err and "notes.txt" in err
    assert not (tmp_path / "mlflow.db").exists() and not ray.is_initialized()


@pytest.mark.slow
def test_a_sweep_with_skip_bad_images_runs_and_logs_the_list(broken, tmp_path, cache_dir):
    from conftest import run_sweep

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = run_sweep(["--space", "smoke", "--data", str(broken), "--weights", "none", "--image-size", "16",
                      "--trials", "1", "--max-epochs", "1", "--skip-bad-images", "--tracking-uri", uri,
                      "--storage", str(tmp_path / "results")], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    client = MlflowClient(uri)
    parent = client.search_runs([client.get_experiment_by_name("ftsweep-pets").experiment_id],
                                "tags.`ftsweep.role` = 'parent'")[0]
    local = client.download_artifacts(parent.info.run_id, "skipped_files.txt", str(tmp_path))
    listed = open(local).read()
    assert "truncated.jpg" in listed and "empty.png" in listed and "notes.txt" in listed


def test_links_that_lead_nowhere_and_names_that_are_not_utf8_are_bad_files(tmp_path):
    import os

    root = write_image_folder(tmp_path / "pets", per_class=6)
    (root / "cat" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (root / "cat" / "loop.png").symlink_to(root / "cat" / "loop.png")
    jpg = next((root / "dog").glob("*.jpg"))
    with open(os.path.join(os.fsencode(root / "dog"), b"caf\xe9.jpg"), "wb") as f:  # Latin-1, not UTF-8
        f.write(jpg.read_bytes())
    ds = scan(root, val_fraction=0.3)  # listed, not a traceback
    with pytest.raises(DataError) as err:
        DataHandle(ds, 16, str(tmp_path / "cache")).prepare(skip_bad=False)
    msg = str(err.value)
    assert "3 problem(s)" in msg, msg
    assert "gone.jpg: broken or looping symbolic link" in msg and "loop.png: broken or looping symbolic link" in msg
    assert "caf\\xe9.jpg: file name is not valid UTF-8" in msg
    msg.encode("utf-8")  # printable as it is
    kept = DataHandle(ds, 16, str(tmp_path / "cache")).prepare(skip_bad=True)
    assert len(kept.dataset) == 12 and len(kept.dataset.skipped) == 3
