"""Each regulariser the regularization space searches takes effect in a trial: weight decay,
the L1 penalty, label smoothing, dropout before the head, augmentation and patience.
Every comparison is two runs with the same seed that differ only in the one setting."""

import random
import shutil

import numpy as np
import pytest
import torch

from search_spaces.loader import load_space
from trainables.config import TrialConfig
from trainables.data import DataHandle, scan
from trainables.models import ModelError, build_model, stages
from trainables.pipeline import Batches
from trainables.train import CHECKPOINT_FILE, Step, run_trial

TRAINED = ("layer2", "layer3", "layer4", "fc")  # what frozen_depth=2 leaves to train in a resnet18


@pytest.fixture
def handle(image_folder, tmp_path):
    return DataHandle(scan(image_folder, val_fraction=0.5), 16, str(tmp_path / "cache"))


def tiny(**kw):
    base = dict(model="resnet18", weights="none", image_size=16, lr=0.05, batch_size=4, max_epochs=2,
                decay_power=1.0, frozen_depth=2, seed=0)
    return TrialConfig(**{**base, **kw})


def train(cfg, handle, tmp_path):
    """Run the trial; its per-epoch metrics and its last checkpoint's weights."""
    seen = []

    def report(metrics, ckpt_dir):
        seen.append(metrics)
        shutil.copy(ckpt_dir / CHECKPOINT_FILE, tmp_path / "last.pt")

    run_trial(cfg, handle, report, threads=1)
    return seen, torch.load(tmp_path / "last.pt", weights_only=True)["model"]


def trained_weights(state: dict) -> list[torch.Tensor]:
    return [v for k, v in state.items() if k.startswith(TRAINED) and v.ndim > 1]


def norm(state: dict, p: int) -> float:
    return sum(w.abs().pow(p).sum().item() for w in trained_weights(state)) ** (1 / p)


def test_weight_decay_shrinks_the_l2_norm(handle, tmp_path):
    # One batch of all 6 images: a last batch of 2 at 1x1 px in layer4 makes BatchNorm's
    # gradients explode, and then the norms compare chaos (this passed by luck before).
    _, plain = train(tiny(batch_size=6, max_epochs=4), handle, tmp_path)
    _, decayed = train(tiny(batch_size=6, max_epochs=4, weight_decay=0.5), handle, tmp_path)
    assert norm(decayed, 2) < 0.95 * norm(plain, 2)


def test_l1_penalty_shrinks_the_l1_norm_and_leaves_the_reported_loss_alone(handle, tmp_path):
    # one batch of all 6 images, as for weight decay: a last batch of 2 makes BatchNorm explode
    seen_plain, plain = train(tiny(batch_size=6, max_epochs=4), handle, tmp_path)
    seen_l1, penalised = train(tiny(batch_size=6, max_epochs=4, l1=2e-2), handle, tmp_path)
    assert norm(penalised, 1) < 0.95 * norm(plain, 1)
    # train_loss is the data term: the penalty (here ~2e-2 * 2e5) would swamp it
    assert seen_l1[0]["train_loss"] < 10 and seen_plain[0]["train_loss"] < 10


def test_label_smoothing_changes_the_training_loss_only(handle, tmp_path):
    # lr 0: the same parameters throughout, so the losses differ only by the smoothing
    hard, _ = train(tiny(lr=0.0), handle, tmp_path)
    soft, _ = train(tiny(lr=0.0, label_smoothing=0.3), handle, tmp_path)
    assert soft[0]["train_loss"] != pytest.approx(hard[0]["train_loss"], rel=1e-3)
    assert soft[0]["val_loss"] == pytest.approx(hard[0]["val_loss"], rel=1e-6)  # evaluation is unsmoothed
    _, a = train(tiny(), handle, tmp_path)
    _, b = train(tiny(label_smoothing=0.3), handle, tmp_path)
    assert not torch.equal(a["fc.weight"], b["fc.weight"])


def test_dropout_makes_training_logits_random_and_evaluation_deterministic(handle, tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet18", 2, "none").eval()
    x = torch.randn(4, 3, 16, 16)

    def logits(dropout, training):
        step = Step(model, stages(model, "resnet18"), tiny(dropout=dropout), None, None, torch.device("cpu"))
        with torch.no_grad():
            return step.logits(x, training)

    assert not torch.equal(logits(0.5, True), logits(0.5, True))
    assert torch.equal(logits(0.0, True), logits(0.0, True))
    assert torch.equal(logits(0.5, False), logits(0.0, False))
    with_dropout, _ = train(tiny(dropout=0.5), handle, tmp_path)
    without, _ = train(tiny(), handle, tmp_path)
    assert with_dropout[0]["train_loss"] != pytest.approx(without[0]["train_loss"], rel=1e-4)


def test_dropout_needs_a_staged_model(handle):
    with pytest.raises(ModelError, match="dropout before the head is not available for shufflenet"):
        run_trial(tiny(model="shufflenet_v2_x0_5", frozen_depth=0, dropout=0.2), handle, threads=1)


def test_augmentation_changes_the_batches_and_turns_the_feature_cache_off(handle, tmp_path):
    images, labels = handle.arrays("train")

    def first_batch(strength):
        torch.manual_seed(0)  # transforms.v2 draws from torch's global generator
        batches = Batches(images, labels, 4, mean=handle.mean, std=handle.std, shuffle=True,
                          augment_strength=strength, generator=torch.Generator().manual_seed(0))
        return next(iter(batches))

    (plain_x, plain_y), (again_x, _), (aug_x, aug_y) = first_batch(0.0), first_batch(0.0), first_batch(0.8)
    assert torch.equal(plain_x, again_x) and torch.equal(plain_y, aug_y)
    assert aug_x.shape == plain_x.shape and not torch.allclose(aug_x, plain_x)

    cached, _ = train(tiny(), handle, tmp_path)
    augmented, _ = train(tiny(augment_strength=0.8), handle, tmp_path)
    assert cached[0]["cached_stages"] == 2  # frozen prefix read from the feature cache
    assert augmented[0]["cached_stages"] == 0  # random crops: the prefix runs on every batch
    assert augmented[0]["train_loss"] != pytest.approx(cached[0]["train_loss"], rel=1e-4)


def test_patience_stops_a_trial_that_stopped_improving(handle, tmp_path):
    # Only the head trains (no BatchNorm statistics move) and lr 1e-9 barely moves it, so
    # val_acc never beats epoch 1.
    patient, _ = train(tiny(lr=1e-9, max_epochs=4, frozen_depth=5), handle, tmp_path)
    impatient, _ = train(tiny(lr=1e-9, max_epochs=4, frozen_depth=5, patience=1), handle, tmp_path)
    assert [m["epoch"] for m in patient] == [1, 2, 3, 4] and "early_stopped" not in patient[-1]
    assert [m["epoch"] for m in impatient] == [1, 2] and impatient[-1]["early_stopped"] == 1


def test_a_trial_of_the_regularization_space_runs_with_all_of_them_at_once(handle):
    space = load_space("regularization")
    assert {"weight_decay", "l1", "label_smoothing", "dropout", "augment_strength",
            "patience"} <= set(space.search)
    sampled = space.sample(random.Random(0)).to_dict()
    assert all(sampled[k] > 0 for k in ("weight_decay", "l1", "label_smoothing", "dropout",
                                        "augment_strength"))
    cfg = TrialConfig(**{**sampled, "weights": "none", "image_size": 16, "batch_size": 4, "max_epochs": 1})
    metrics = run_trial(cfg, handle, threads=1)
    assert np.isfinite(metrics["train_loss"]) and 0 <= metrics["val_acc"] <= 1
