import pytest

from trainables import features
from trainables.config import TrialConfig
from trainables.data import DataHandle, scan
from trainables.train import run_trial


@pytest.fixture
def handle(tmp_path):
    from conftest import write_image_folder

    folder = write_image_folder(tmp_path / "images", per_class=16)
    return DataHandle(scan(folder, val_fraction=0.5), 32, str(tmp_path / "cache" / "decoded"))


def trial(handle, **kw):
    cfg = TrialConfig(**{**dict(model="resnet18", weights="none", image_size=32, lr=0.01, batch_size=8,
                                max_epochs=2, frozen_depth=4, seed=0), **kw})
    seen = []
    run_trial(cfg, handle, lambda m, _: seen.append(m), threads=1)
    return seen


@pytest.mark.parametrize("depth, epochs", [(1, 1), (3, 2), (4, 2), (5, 2)])
def test_cached_and_uncached_trials_give_the_same_losses(handle, depth, epochs):
    # Shallow prefixes leave a deep suffix that trains in BatchNorm train mode on batches of
    # 4, which amplifies the ~1e-7 differences between convolution kernels chosen for
    # different batch sizes (about 1e-3 after two epochs); the features themselves agree to
    # 1e-5, as the next test shows.
    cached = trial(handle, frozen_depth=depth, max_epochs=epochs)
    plain = trial(handle, frozen_depth=depth, max_epochs=epochs, feature_cache=False)
    assert cached[0]["cached_stages"] == depth and plain[0]["cached_stages"] == 0
    for a, b in zip(cached, plain, strict=False):
        for key in ("train_loss", "val_loss", "val_acc"):
            assert a[key] == pytest.approx(b[key], rel=3e-3, abs=1e-4), key


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
def test_cached_features_are_the_frozen_prefix_outputs(handle, depth):
    import torch

    from trainables.models import build_model, stages
    from trainables.pipeline import Batches

    cfg = TrialConfig(model="resnet18", weights="none", image_size=32, frozen_depth=depth)
    torch.manual_seed(0)
    staged = stages(build_model("resnet18", 2, "none").eval(), "resnet18")
    cached = features.prefix_features(cfg, handle, staged, torch.device("cpu"))
    x, y = handle.arrays("val")
    batch, _ = next(iter(Batches(x, y, 5, mean=handle.mean, std=handle.std, shuffle=False)))
    with torch.no_grad():
        live = staged.forward_stages(batch, end=depth)
    torch.testing.assert_close(torch.from_numpy(cached["val"][:5].copy()), live, rtol=1e-5, atol=1e-5)


def test_features_are_computed_once_and_shared(handle, tmp_path):
    trial(handle, max_epochs=1)
    built = list((tmp_path / "cache" / "features").glob("*/meta.json"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    trial(handle, max_epochs=1, lr=0.01, seed=0)  # another trial, same prefix: reused
    assert [p.stat().st_mtime_ns for p in (tmp_path / "cache" / "features").glob("*/meta.json")] == [stamp]
    trial(handle, max_epochs=1, frozen_depth=3)  # another prefix: its own cache
    assert len(list((tmp_path / "cache" / "features").glob("*/meta.json"))) == 2


def test_random_augmentation_or_nothing_frozen_runs_uncached(handle):
    assert trial(handle, max_epochs=1, augment_strength=0.5)[0]["cached_stages"] == 0
    assert trial(handle, max_epochs=1, frozen_depth=0)[0]["cached_stages"] == 0


def test_a_cache_that_would_be_too_big_is_skipped_with_a_message(handle, monkeypatch, capsys):
    monkeypatch.setattr(features, "MAX_BYTES", 1000)
    assert trial(handle, max_epochs=1)[0]["cached_stages"] == 0
    assert "training this trial uncached" in capsys.readouterr().out


def test_key_separates_what_changes_the_prefix(handle):
    base = TrialConfig(model="resnet18", weights="none", frozen_depth=2)
    keys = {features.cache_key(c, handle) for c in [
        base, TrialConfig(**{**base.to_dict(), "frozen_depth": 3}),
        TrialConfig(**{**base.to_dict(), "seed": 1}), TrialConfig(**{**base.to_dict(), "model": "resnet34"})]}
    assert len(keys) == 4
    assert features.cache_key(TrialConfig(**{**base.to_dict(), "lr": 0.5}), handle) == features.cache_key(base, handle)
