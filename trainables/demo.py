"""The embedded demo: a transfer task built from data that ships with scikit-learn.

A backbone is pretrained on handwritten digits 0-4 (once, then cached) and fine-tuned on
digits 5-9. Both tasks are written out as ordinary ImageFolder trees of 8x8 grayscale
PNGs, so the demo goes through exactly the code path a user's dataset does.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from trainables.config import TrialConfig
from trainables.node_cache import cache_root

PRETRAIN_DIGITS = range(0, 5)
TRANSFER_DIGITS = range(5, 10)
IMAGE_SIZE = 32
# Short and fixed: the backbone only has to be good enough to transfer from.
PRETRAIN = dict(weights="none", optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4,
                batch_size=64, max_epochs=8, decay_power=1.0, frozen_depth=0, seed=0)


def write_digits(root: Path, digits) -> Path:
    """Write sklearn's bundled digits as ``root/<digit>/<index>.png``; idempotent."""
    if (root / ".complete").exists():
        return root
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images * (255 / 16)).round().astype(np.uint8)
    for i, (img, label) in enumerate(zip(images, bunch.target, strict=False)):
        if label in digits:
            folder = root / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img, mode="L").save(folder / f"{i:04d}.png")
    (root / ".complete").touch()
    return root


def transfer_folder(cache: Path | None = None) -> Path:
    """The ImageFolder the demo sweep fine-tunes on (digits 5-9)."""
    return write_digits((cache or cache_root()) / "digits" / "5-9", TRANSFER_DIGITS)


def pretrained_backbone(model: str, image_size: int = IMAGE_SIZE, cache: Path | None = None,
                        log=print) -> Path:
    """A torchvision-format state_dict of ``model`` trained on digits 0-4, built on first use."""
    cache = cache or cache_root()
    out = cache / "backbones" / f"{model}-digits0-4-{image_size}px.pt"
    if out.exists():
        return out
    import torch

    from trainables.data import DataHandle, scan
    from trainables.train import run_trial

    log(f"Pretraining the demo backbone ({model} on digits 0-4, {image_size}px); "
        f"this happens once and is cached in {out}")
    folder = write_digits(cache / "digits" / "0-4", PRETRAIN_DIGITS)
    data = DataHandle(scan(folder, val_fraction=0.2, seed=0), image_size, str(cache / "decoded"))
    data.ensure()
    cfg = TrialConfig(model=model, image_size=image_size, **PRETRAIN)

    def keep_last(metrics: dict, ckpt_dir: Path) -> None:
        log(f"  pretrain epoch {metrics['epoch']}/{cfg.max_epochs}: "
            f"val_acc {metrics['val_acc']:.3f}")
        if metrics["epoch"] == cfg.max_epochs:
            state = torch.load(ckpt_dir / "checkpoint.pt", weights_only=True)["model"]
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".tmp")
            torch.save(state, tmp)
            os.replace(tmp, out)

    run_trial(cfg, data, keep_last, threads=os.cpu_count())
    return out


if __name__ == "__main__":  # python -m trainables.demo [model]: prepare the demo ahead of time
    print(transfer_folder())
    print(pretrained_backbone(sys.argv[1] if len(sys.argv) > 1 else "resnet18"))
