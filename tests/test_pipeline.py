"""trainables/pipeline.py: the host gathers, the device crops, augments and normalises."""

import threading

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from trainables import train as train_module
from trainables.config import TrialConfig
from trainables.data import DataHandle, decode_for, scan
from trainables.pipeline import Batches, DeviceStage, crop_params, crop_size, decode_size, prefetch, resized_crops
from trainables.train import Step, TrialDiverged, run_trial

from conftest import collect

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def per_image(img_hwc: torch.Tensor, top, left, h, w, flip, size, normalize=True) -> torch.Tensor:
    """torchvision's own per-image transforms, on a float image."""
    x = TF.resized_crop(img_hwc.permute(2, 0, 1).float(), top, left, h, w, [size, size], antialias=True)
    if flip:
        x = TF.horizontal_flip(x)
    return TF.normalize(x / 255, list(MEAN), list(STD)) if normalize else x


@pytest.mark.parametrize(("side", "size"), [(37, 32), (64, 24), (18, 16)])
def test_batched_device_augmentation_equals_torchvisions_per_image_transforms(side, size):
    # crops smaller than ``size`` are upscaled, larger ones downscaled (antialiased)
    images = torch.randint(0, 256, (24, side, side, 3), dtype=torch.uint8)
    crops = crop_params(24, side, 1.0, True, torch.Generator().manual_seed(0))
    assert crops[:, 4].min() == 0 and crops[:, 4].max() == 1  # some flipped, some not
    assert len({tuple(c[2:4]) for c in crops}) > 10  # the crop boxes differ per image
    assert ((crops[:, 0] + crops[:, 2] <= side) & (crops[:, 1] + crops[:, 3] <= side)).all()
    out = DeviceStage(size, MEAN, STD)(images, crops)
    expected = torch.stack([per_image(img, *c, size) for img, c in zip(images, crops.tolist(), strict=True)])
    assert out.shape == (24, 3, size, size) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    # the batched path a GPU takes, here on the CPU (pixels, before normalising)
    batched = resized_crops(images.permute(0, 3, 1, 2).float(), torch.as_tensor(crops), size)
    pixels = torch.stack([per_image(img, *c, size, normalize=False)
                          for img, c in zip(images, crops.tolist(), strict=True)])
    torch.testing.assert_close(batched, pixels, atol=2e-3, rtol=1e-5)


def test_validation_takes_torchvisions_centre_crop():
    images = torch.randint(0, 256, (5, 37, 37, 3), dtype=torch.uint8)
    out = DeviceStage(32, MEAN, STD)(images)
    expected = TF.normalize(TF.center_crop(images.permute(0, 3, 1, 2).float() / 255, [32, 32]), list(MEAN), list(STD))
    torch.testing.assert_close(out, expected)


def test_crop_params_sample_torchvisions_scale_and_ratio_range():
    crops = crop_params(4000, 64, 1.0, False, torch.Generator().manual_seed(1))
    area = crops[:, 2] * crops[:, 3] / 64**2
    assert area.min() >= 0.06 and area.max() <= 1.0 and (crops[:, 4] == 0).all()
    assert np.median(area) == pytest.approx(0.54, abs=0.1)  # uniform in [0.08, 1], rejections aside
    mild = crop_params(1000, 64, 0.1, True, torch.Generator().manual_seed(1))
    assert (mild[:, 2] * mild[:, 3] / 64**2).min() >= 0.89


def test_decode_size_has_a_unique_inverse():
    assert decode_size(224) == 256 and all(crop_size(decode_size(s)) == s for s in range(1, 2000))


def test_prefetch_keeps_order_propagates_errors_and_stops_when_abandoned():
    assert list(prefetch(iter(range(50)), 2)) == list(range(50))

    def broken():
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(prefetch(broken()))
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    before = threading.active_count()
    it = prefetch(endless(), 2)
    assert next(it) == 0
    it.close()  # the epoch loop was left early
    assert threading.active_count() == before
    assert len(produced) <= 5  # bounded: it ran at most the queue's depth ahead


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """40 generated JPEGs in 4 classes, one of them a class of one image."""
    pytest.importorskip("skimage")
    from benchmarks.bench_pipeline import make_photo_folder

    root = tmp_path_factory.mktemp("photos")
    folder = make_photo_folder(root / "train", [13, 13, 13, 1], classes=4)
    make_photo_folder(root / "val", [2, 2, 2, 1], classes=4, seed=1)
    assert folder.parent == root
    return DataHandle(scan(root), 24, str(root / "cache"))


def test_a_last_batch_of_one_and_a_class_of_one_image(photos):
    x, y = photos.arrays("train")
    assert len(y) == 40 and x.shape[1:] == (decode_size(24),) * 2 + (3,) and (y == 3).sum() == 1
    for strength in (0.0, 1.0):
        batches = Batches(x, y, 13, mean=MEAN, std=STD, shuffle=True, augment_strength=strength,
                          generator=torch.Generator().manual_seed(0), crop=24)
        got = list(batches)
        assert [len(b[1]) for b in got] == [13, 13, 13, 1] and len(batches) == 4
        assert all(b[0].shape[1:] == (3, 24, 24) for b in got)
        assert sorted(torch.cat([b[1] for b in got]).tolist()) == sorted(y.tolist())


def test_prediction_preprocesses_exactly_as_validation(photos):
    from concurrent.futures import ThreadPoolExecutor

    from sweeps.records.best_model import BestModel, decode_images

    x, y = photos.arrays("val")
    cfg = TrialConfig(model="resnet18", weights="none", image_size=24, batch_size=4, seed=0, frozen_depth=0)
    _, val, _ = train_module.make_batches(cfg, photos, None, None, torch.device("cpu"), None)
    val_x = torch.cat([b for b, _ in val])
    best = BestModel("run", "sweep", {"mean": list(MEAN), "std": list(STD), "image_size": 24,
                                      "config": cfg.to_dict()}, None)
    with ThreadPoolExecutor(2) as pool:
        images, _, _ = decode_images(list(photos.dataset.val.paths), 24, pool)
    pred_x = torch.cat([b for b, _ in best.batches(images, 3)])
    assert torch.equal(pred_x, val_x)
    assert np.array_equal(decode_for(photos.dataset.val.paths[0], 24), x[0])


@pytest.fixture
def handle(image_folder, tmp_path):
    return DataHandle(scan(image_folder, val_fraction=0.5), 16, str(tmp_path / "cache"))


def tiny(**kw):
    base = dict(model="resnet18", weights="none", image_size=16, lr=0.01, batch_size=4, max_epochs=2,
                decay_power=2.0, seed=0, augment_strength=0.8)
    return TrialConfig(**{**base, **kw})


def test_seeded_augmented_runs_repeat_whatever_the_loader_threads_timing(handle):
    a, b, c = [], [], []
    run_trial(tiny(), handle, collect(a), threads=1)
    run_trial(tiny(), handle, collect(b), threads=1)  # the draws are made before the thread starts
    run_trial(tiny(seed=1), handle, collect(c), threads=1)
    assert [(m["train_loss"], m["val_acc"]) for m in a] == [(m["train_loss"], m["val_acc"]) for m in b]
    assert a[0]["train_loss"] != pytest.approx(c[0]["train_loss"], rel=1e-5)


def test_an_augmented_trial_resumes_bit_for_bit(handle, tmp_path):
    straight, resumed = [], []
    run_trial(tiny(max_epochs=3), handle, collect(straight, tmp_path), threads=1)
    run_trial(tiny(max_epochs=3), handle, collect(resumed), resume_from=tmp_path / "epoch1.pt", threads=1)
    for a, b in zip(straight[1:], resumed, strict=True):
        assert (a["train_loss"], a["val_acc"]) == (b["train_loss"], b["val_acc"])


def test_a_nan_loss_stops_the_trial_with_its_reason(handle):
    seen = []
    metrics = run_trial(tiny(lr=1e12, decay_power=0.0, max_epochs=3), handle, collect(seen), threads=1)
    assert metrics["diverged"] == 1 and metrics["epoch"] == 1
    assert metrics["stop_reason"].startswith("training loss became nan")
    assert seen == [metrics]


def make_step(optimizer="sgd"):
    from trainables.models import build_model, stages

    torch.manual_seed(0)
    model = build_model("resnet18", 2, "none")
    cfg = tiny(optimizer=optimizer)
    opt = train_module.make_optimizer(cfg, list(model.parameters()))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0)
    return Step(model, stages(model, "resnet18"), cfg, opt, sched, torch.device("cpu"))


def test_a_nan_in_the_middle_of_an_epoch_is_caught_at_its_end():
    step = make_step()
    good = (torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 0, 1]))
    bad = (torch.full((4, 3, 16, 16), float("nan")), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(TrialDiverged, match="training loss became nan"):
        step.train_epoch([good, bad, good])


class SyncCounter:
    """Counts, on the calling thread, every way a tensor's value reaches Python."""

    NAMES = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")

    def __init__(self, monkeypatch):
        self.count, main = 0, threading.get_ident()
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(t, *args, _original=original, **kw):
                if threading.get_ident() == main:
                    self.count += 1
                return _original(t, *args, **kw)

            monkeypatch.setattr(torch.Tensor, name, counted)


def syncs_per_epoch(handle, monkeypatch, batches: int) -> tuple[int, int, int]:
    """Value reads on the loop's thread in one training epoch and one evaluation of
    ``batches`` batches, and the calls of ``train._read``."""
    step = make_step()
    x, y = handle.arrays("train")
    x, y = np.concatenate([x] * 6)[: 4 * batches], np.concatenate([y] * 6)[: 4 * batches]
    train = Batches(x, y, 4, mean=MEAN, std=STD, shuffle=True, augment_strength=0.8,
                    generator=torch.Generator().manual_seed(0), crop=16)
    val = Batches(x, y, 4, mean=MEAN, std=STD, shuffle=False, crop=16)
    reads = []
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "_read", lambda *v: reads.append(v) or [float(0)] * len(v))
        counter = SyncCounter(patch)
        step.train_epoch(train)
        in_training, counter.count = counter.count, 0
        train_module.evaluate(step, val)
        return in_training, counter.count, len(reads)


def test_the_loop_reads_from_the_device_once_per_epoch(handle, monkeypatch):
    # The host's once-per-epoch draws (shuffle order, crop boxes) read CPU tensors too;
    # what must not happen is a read per step: the counts may not grow with the steps.
    few, many = syncs_per_epoch(handle, monkeypatch, 3), syncs_per_epoch(handle, monkeypatch, 9)
    assert few == many
    assert few[2] == 2  # train._read: the summed training loss; evaluation's loss and accuracy
