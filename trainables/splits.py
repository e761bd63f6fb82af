"""The seeded stratified train/val split of a single-folder ImageFolder, remembered.

It is scikit-learn's ``train_test_split``, whose answer depends only on the labels (their
order and classes), the fraction, the seed and scikit-learn's version. The answer, as
indices, is kept under ``$FTSWEEP_CACHE/splits`` with those as its key, so a sweep over
the same data does not import scikit-learn (a CPU-second while its trials start).
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import version
from pathlib import Path

import numpy as np

from trainables.node_cache import cache_root, keep_in_cache


def stratified(labels, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of the train and the val images."""
    key = hashlib.sha256(np.asarray(labels, dtype=np.int64).tobytes())
    key.update(json.dumps([val_fraction, seed, version("scikit-learn")]).encode())
    path = cache_root() / "splits" / f"{key.hexdigest()[:32]}.json"
    kept = _read(path, len(labels))
    if kept is not None:
        return kept
    from sklearn.model_selection import train_test_split

    train, val = (a.tolist() for a in train_test_split(np.arange(len(labels)), test_size=val_fraction,
                                                        stratify=labels, random_state=seed))
    keep_in_cache(path, json.dumps([train, val]))
    return train, val


def _read(path: Path, n: int) -> tuple[list[int], list[int]] | None:
    """The kept split, if it is one of ``n`` images (every index once); else None."""
    try:
        train, val = json.loads(path.read_text())
    except (OSError, ValueError, TypeError):  # none yet, or damaged: split again
        return None
    if not all(type(i) is int for i in (*train, *val)) or sorted((*train, *val)) != list(range(n)):
        return None
    return train, val
