import json

import numpy as np
import pytest
import torch
from PIL import Image

from trainables import data as data_mod
from trainables.data import DataError, DataHandle, decode_image, scan
from trainables.pipeline import Batches


def test_scan_splits_one_folder_stratified_and_seeded(image_folder):
    ds = scan(image_folder, val_fraction=0.5, seed=1)
    assert ds.classes == ("cat", "dog")
    assert len(ds.train) == len(ds.val) == 6
    assert sorted(ds.val.labels) == [0, 0, 0, 1, 1, 1]  # stratified
    assert scan(image_folder, val_fraction=0.5, seed=1) == ds  # seeded
    assert scan(image_folder, val_fraction=0.5, seed=2).val != ds.val


def test_a_remembered_split_is_scikit_learns_and_a_damaged_one_is_made_again(image_folder, tmp_path, monkeypatch):
    from sklearn.model_selection import train_test_split

    monkeypatch.setenv("FTSWEEP_CACHE", str(tmp_path / "cache"))
    fresh = scan(image_folder, val_fraction=0.25, seed=3)
    pairs = sorted(zip(fresh.train.paths + fresh.val.paths, fresh.train.labels + fresh.val.labels, strict=True))
    paths, labels = [p for p, _ in pairs], [y for _, y in pairs]
    tr_p, va_p, _, _ = train_test_split(paths, labels, test_size=0.25, stratify=labels, random_state=3)
    assert (fresh.train.paths, fresh.val.paths) == (tuple(tr_p), tuple(va_p))
    [kept] = (tmp_path / "cache" / "splits").iterdir()
    train, val = json.loads(kept.read_text())
    kept.write_text(json.dumps([train[::-1], val]))  # another valid answer: read from the file
    assert scan(image_folder, val_fraction=0.25, seed=3).train.paths == fresh.train.paths[::-1]
    # an index twice, cut short, not a split, an index that is not an integer: split again
    for damage in ("[[0, 1], [1]]", "[[0, 1]", "{}", json.dumps([[float(train[0]), *train[1:]], val])):
        kept.write_text(damage)
        assert scan(image_folder, val_fraction=0.25, seed=3) == fresh


def test_scan_uses_train_and_val_folders_and_ignores_hidden_files(tmp_path):
    from conftest import write_image_folder

    write_image_folder(tmp_path / "train", per_class=4)
    write_image_folder(tmp_path / "val", per_class=2, seed=1)
    (tmp_path / "train" / "cat" / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / "train" / "cat" / "._0.jpg").write_bytes(b"\0\1")
    ds = scan(tmp_path)
    assert (len(ds.train), len(ds.val)) == (8, 4)
    assert not any("/." in p for p in ds.train.paths)


def test_train_and_val_classes_must_match(tmp_path):
    from conftest import write_image_folder

    write_image_folder(tmp_path / "train", classes=("a", "b", "c"), per_class=2)
    write_image_folder(tmp_path / "val", classes=("a", "b"), per_class=2)
    with pytest.raises(DataError, match=r"class 'c' is in train but not in val"):
        scan(tmp_path)


def test_one_class_is_not_a_classification_task(tmp_path):
    from conftest import write_image_folder

    write_image_folder(tmp_path, classes=("only",), per_class=4)
    with pytest.raises(DataError, match="at least two class"):
        scan(tmp_path)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "RGB", "LA"])
def test_every_image_mode_becomes_rgb_at_the_requested_size(tmp_path, mode):
    path = tmp_path / "x.png"
    Image.new("RGB", (40, 30), (10, 200, 30)).convert(mode).save(path)
    out = decode_image(str(path), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8


def test_palette_transparency_goes_through_rgba(tmp_path):
    img = Image.new("P", (8, 8), 0)
    img.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    img.info["transparency"] = 0
    img.save(tmp_path / "t.png", transparency=0)
    assert decode_image(str(tmp_path / "t.png"), 8)[0, 0].tolist() == [255, 0, 0]


def test_cache_decodes_each_image_once_however_many_readers(image_folder, tmp_path):
    ds = scan(image_folder, val_fraction=0.5)
    before = data_mod.DECODE_COUNT
    handle = DataHandle(ds, 12, str(tmp_path / "cache"))
    for _ in range(5):  # five trials reading the data
        x, y = handle.arrays("train")
        assert x.shape == (6, 14, 14, 3) and len(y) == 6  # decoded at 12 / 0.875: room to crop
    assert data_mod.DECODE_COUNT - before == len(ds)
    # A new image size is a new cache; the old one stays valid.
    DataHandle(ds, 10, str(tmp_path / "cache")).ensure()
    assert data_mod.DECODE_COUNT - before == 2 * len(ds)
    assert handle.ensure() == handle.path


def test_batches_normalise_and_augment_only_when_asked(image_folder, tmp_path):
    handle = DataHandle(scan(image_folder, val_fraction=0.5), 16, str(tmp_path / "c"))
    x, y = handle.arrays("train")
    plain = Batches(x, y, 4, mean=(0.5,) * 3, std=(0.5,) * 3, shuffle=False)
    first, labels = next(iter(plain))
    assert first.shape == (4, 3, 16, 16) and first.dtype == torch.float32
    assert x.shape[1] == 18  # decoded at 16 / 0.875; validation takes the centre 16 px
    expected = (torch.from_numpy(np.array(x[:4, 1:17, 1:17])).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(first, expected)
    assert labels.tolist() == list(y[:4])
    augmented = Batches(x, y, 4, mean=(0.5,) * 3, std=(0.5,) * 3, shuffle=False, augment_strength=1.0,
                        generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(next(iter(augmented))[0], first)
    assert len(plain) == 2


def test_shuffle_is_seeded(image_folder, tmp_path):
    handle = DataHandle(scan(image_folder, val_fraction=0.5), 8, str(tmp_path / "c"))
    x, y = handle.arrays("train")

    def order(seed):
        g = torch.Generator().manual_seed(seed)
        return [b[1].tolist() for b in Batches(x, y, 2, mean=(0,) * 3, std=(1,) * 3, shuffle=True, generator=g)]

    assert order(3) == order(3)


def test_a_truncated_or_corrupt_cache_is_rebuilt_with_a_message_naming_it(image_folder, tmp_path, capsys):
    handle = DataHandle(scan(image_folder, val_fraction=0.5), 16, str(tmp_path / "cache"))
    good = np.array(handle.arrays("train")[0])
    before = data_mod.DECODE_COUNT
    damaged = handle.path / "train_x.npy"
    damaged.write_bytes(damaged.read_bytes()[:-100])  # a copy or a disk that stopped short
    x, _ = handle.arrays("train")
    err = capsys.readouterr().err
    assert f"{damaged} is truncated or corrupt" in err and "rebuilding" in err
    assert np.array_equal(x, good) and data_mod.DECODE_COUNT - before == len(handle.dataset)
    (handle.path / "meta.json").write_text('{"classes": [')
    assert handle.prepare(skip_bad=False) == handle
    assert "meta.json is corrupt" in capsys.readouterr().err
    (handle.path / "val_y.npy").write_bytes(b"\x93NUMPY garbage")
    assert np.array_equal(handle.arrays("train")[0], good)
    assert "val_y.npy is unreadable or corrupt" in capsys.readouterr().err
    assert data_mod.cache_problem(handle.path) is None


def test_a_cache_folder_that_cannot_be_written_is_named(image_folder, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    handle = DataHandle(scan(image_folder, val_fraction=0.5), 16, str(blocker / "decoded"))
    with pytest.raises(DataError, match=f"cache folder {blocker / 'decoded'} cannot be written"):
        handle.prepare(skip_bad=False)
    from sweeps.run import main

    monkeypatch.setenv("FTSWEEP_CACHE", str(blocker))
    monkeypatch.chdir(tmp_path)
    assert main(["--space", "smoke", "--data", str(image_folder), "--weights", "none",
                 "--image-size", "16"]) == 2
    assert f"cache folder {blocker / 'decoded'} cannot be written" in capsys.readouterr().err
