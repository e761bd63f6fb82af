"""The frozen-prefix feature cache.

A trial that freezes the first k stages and applies no random transform before them
computes the same prefix outputs for every image in every epoch, and so does every other
trial with the same model, weights, k, image size and data. Those outputs are computed
once per node into a float32 ``.npy`` per split and memory-mapped; the trial then runs
only the trainable suffix. The frozen stages are in eval mode, so the cached outputs are
exactly what the uncached forward pass would compute.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from trainables.config import TrialConfig
from trainables.data import DataHandle
from trainables.pipeline import Batches

# The cache is skipped, with a message, when it would take more than this many bytes or
# more than a quarter of the free disk.
MAX_BYTES = 4 * 2**30


def applies(cfg: TrialConfig, staged) -> bool:
    """Whether the trial's inputs to its first trainable stage never change."""
    return (cfg.feature_cache and cfg.frozen_depth > 0 and cfg.augment_strength == 0
            and bool(staged.stages))


def cache_key(cfg: TrialConfig, data: DataHandle) -> str:
    weights = cfg.weights
    if weights == "none":
        weights = f"none-seed{cfg.seed}"  # a random prefix differs by seed
    elif Path(weights).is_file():
        st = Path(weights).stat()
        weights = f"{Path(weights).resolve()}:{st.st_size}:{st.st_mtime_ns}"
    raw = f"{cfg.model}|{weights}|{cfg.frozen_depth}|{data.key}|{data.mean}|{data.std}"
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def prefix_features(cfg: TrialConfig, data: DataHandle, staged, device,
                    log=print) -> dict[str, np.ndarray] | None:
    """Memory-mapped prefix outputs per split, built on first use; None when too big."""
    root = Path(data.cache_dir).parent / "features"
    path = root / cache_key(cfg, data)
    if not (path / "meta.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        with open(root / f"{path.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one builder per node; the others wait and reuse
            if not (path / "meta.json").exists() and not _build(cfg, data, staged, device, path, log):
                return None
    return {split: np.load(path / f"{split}.npy", mmap_mode="r") for split in ("train", "val")}


def _build(cfg, data, staged, device, path: Path, log) -> bool:
    k = cfg.frozen_depth
    images = {split: data.arrays(split)[0] for split in ("train", "val")}
    with torch.no_grad():
        probe = staged.forward_stages(next(iter(_batches(images["train"][:1], data, device)))[0], end=k)[0]
    shape = tuple(probe.shape)
    need = sum(len(x) for x in images.values()) * math.prod(shape) * 4
    limit = min(MAX_BYTES, shutil.disk_usage(path.parent).free // 4)
    if need > limit:
        log(f"feature cache for {cfg.model} frozen_depth={k} would take {need / 2**30:.1f} GiB "
            f"(limit {limit / 2**30:.1f} GiB): training this trial uncached")
        return False
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        for split, x in images.items():
            out = np.lib.format.open_memmap(tmp / f"{split}.npy", mode="w+", dtype=np.float32,
                                            shape=(len(x), *shape))
            i = 0
            with torch.no_grad():
                for batch, _ in _batches(x, data, device):
                    feats = staged.forward_stages(batch, end=k).float().cpu().numpy()
                    out[i:i + len(feats)] = feats
                    i += len(feats)
            out.flush()
            del out
        (tmp / "meta.json").write_text(json.dumps({"model": cfg.model, "frozen_depth": k,
                                                   "shape": shape, "bytes": need}))
        os.replace(tmp, path)
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _batches(x: np.ndarray, data: DataHandle, device="cpu"):
    """The images as validation sees them: the centre ``image_size`` crop, normalised."""
    labels = np.zeros(len(x), dtype=np.int64)
    return Batches(x, labels, 128, mean=data.mean, std=data.std, shuffle=False,
                   crop=data.image_size, device=device)
