"""The model checks a sweep makes before it starts, remembered once they passed.

Checking a model (does it build with these weights, take this image size, how many
stages has it, which mean and std does it expect) needs torch and torchvision: about 3.5
CPU-seconds of imports, spent while Ray prestarts the trials' workers, which import the
same modules. The answer depends only on what ``_key`` names: the model, the class count,
the image size, the weights file (path, size and modification time; for ImageNet weights,
the file torchvision loaded from torch's hub folder), the installed torch and torchvision,
and this project's model code. So a check that passed is kept in
``$FTSWEEP_CACHE/checks/models.json``, and a sweep that asks the same question again takes
the answer without importing torch. A check that failed is never kept. Should a kept
answer ever be wrong, the trial, which builds its model anyway, stops with the same error.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
from pathlib import Path

from trainables import node_cache

CODE = ("trainables.models", "trainables.zoo")  # the modules whose code decides the answers


def stages(model: str) -> int:
    """How many stages ``model`` has (frozen_depth 0..stages)."""

    def build() -> dict:
        from trainables.models import num_stages

        return {"stages": num_stages(model)}

    return _remembered(_key("stages", model), build)["stages"]


def check(model: str, num_classes: int, weights: str, image_size: int) -> tuple[tuple, tuple]:
    """Fail (``ModelError``) when ``model`` does not build with ``weights`` and a
    ``num_classes`` head, or does not take ``image_size`` pixels (ViT's patch grid is
    fixed); else its input (mean, std)."""

    def build() -> dict:
        import torch

        from trainables.models import ModelError, build_model, imagenet_file, normalization

        net = build_model(model, num_classes, weights)
        try:
            with torch.no_grad():
                net.eval()(torch.zeros(1, 3, image_size, image_size))
        except (RuntimeError, ValueError, AssertionError) as e:
            raise ModelError(f"{model} does not accept {image_size}x{image_size} images "
                             f"(--image-size): {e}") from None
        mean, std = normalization(model, "imagenet" if weights == "imagenet" else "none")
        # ImageNet weights: the very file torchvision loaded; the answer holds while it does
        used = _stat(imagenet_file(model)) if weights == "imagenet" else None
        return {"mean": list(mean), "std": list(std), "weights_file": used}

    def holds(facts: dict) -> bool:
        used = facts.get("weights_file")
        return used is None or _stat(Path(used[0])) == used

    key = _key("check", model, num_classes, image_size, _weights_id(weights))
    facts = _remembered(key, build, holds)
    return tuple(facts["mean"]), tuple(facts["std"])


def _remembered(key: str, build, holds=lambda facts: True) -> dict:
    path = node_cache.cache_root() / "checks" / "models.json"
    known = _read(path)
    if key in known and holds(known[key]):
        return known[key]
    facts = build()  # raises when the check fails: nothing is kept
    # Re-read (another sweep may have added its own), and forget the answers of other torch
    # versions or model code: they can never be asked again.
    current = list(_installed())
    known = {k: v for k, v in _read(path).items() if json.loads(k)[-2:] == current}
    node_cache.keep_in_cache(path, json.dumps({**known, key: facts}, indent=1, sort_keys=True))
    return facts


def _read(path: Path) -> dict:
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or damaged: check again
        return {}
    return known if isinstance(known, dict) else {}


def _key(*parts) -> str:
    return json.dumps([*parts, *_installed()])


@functools.cache
def _installed() -> tuple[list, str]:
    """The torch and torchvision versions, and a hash of the model code: read once."""
    versions = [importlib.metadata.version(d) for d in ("torch", "torchvision")]
    code = hashlib.sha256()
    for module in CODE:
        code.update(Path(importlib.util.find_spec(module).origin).read_bytes())
    return versions, code.hexdigest()[:16]


def _weights_id(weights: str) -> list:
    """What the weights are, down to the file (ImageNet weights: torch's hub folder, where
    torchvision looks for them; the answer names the file it loaded)."""
    if weights in ("none", "imagenet"):
        return [weights, str(_hub_dir()) if weights == "imagenet" else None]
    return ["file", _stat(Path(weights))]


def _stat(path: Path) -> list:
    path = path.resolve()
    try:
        st = path.stat()
    except OSError:
        return [str(path), None]
    return [str(path), st.st_size, st.st_mtime_ns]


def _hub_dir() -> Path:
    """``torch.hub.get_dir()``, without importing torch."""
    torch_home = os.path.expanduser(os.getenv("TORCH_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"),
                                                                         "torch")))
    return Path(torch_home) / "hub"
