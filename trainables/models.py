"""Models by torchvision registry name: build with a fresh head, view as stages, freeze.

``build_model`` returns the torchvision model itself with its classification head
replaced in place, so its ``state_dict()`` loads strictly into
``torchvision.models.get_model(name, num_classes=...)``. ``stages`` gives a view of
that same model as a list of blocks in forward order, which is what ``frozen_depth``
counts and what the feature cache runs piecewise.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import get_model, get_model_weights

from trainables.zoo import ModelError, check_model_name, classification_models  # noqa: F401 - also ours

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Per socket operation, not for the whole file: a live download still finishes, a dead
# network fails in seconds instead of hanging a trial.
DOWNLOAD_TIMEOUT_S = 10

# Model -> why build_model refuses it. Aux heads change the train-mode output and, with
# ImageNet weights, the state_dict keys; squeezenet's head is a convolution.
_UNSUPPORTED = {
    "googlenet": "auxiliary heads",
    "inception_v3": "auxiliary heads",
    "squeezenet1_0": "no nn.Linear head",
    "squeezenet1_1": "no nn.Linear head",
}


# ---------------------------------------------------------------------------- build


def build_model(name: str, num_classes: int, weights: str) -> nn.Module:
    """The torchvision model ``name`` with ``weights`` and a fresh ``num_classes`` head.

    ``weights`` is "imagenet" (torchvision's DEFAULT weights), "none" (random init) or
    the path of a torchvision-format state_dict whose head may have any class count.
    """
    check_model_name(name)
    if name in _UNSUPPORTED:
        raise ModelError(
            f"model {name!r} is not supported ({_UNSUPPORTED[name]}); pick another model"
        )
    if weights == "imagenet":
        model = _imagenet_model(name)
    else:
        model = get_model(name, weights=None)
    head_name, head = _head(model)
    if weights not in ("imagenet", "none"):
        _load_state_dict_file(model, Path(weights), head_name)
    fresh = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
    parent, _, attr = head_name.rpartition(".")
    setattr(model.get_submodule(parent), attr, fresh)
    return model


def _head(model: nn.Module) -> tuple[str, nn.Linear]:
    """The classification head: the last ``nn.Linear`` in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]


def imagenet_file(name: str) -> Path:
    """Where torch.hub.load_state_dict_from_url keeps ``name``'s ImageNet weights."""
    url = get_model_weights(name).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _imagenet_model(name: str) -> nn.Module:
    weights = get_model_weights(name).DEFAULT
    cached = imagenet_file(name)  # named in the message
    timeout = None if cached.exists() else DOWNLOAD_TIMEOUT_S
    try:
        with _socket_timeout(timeout):
            return get_model(name, weights=weights)
    except OSError as err:  # URLError, timeouts, refused connections, unwritable cache
        raise ModelError(
            f"ImageNet weights for {name!r} are not in the torch hub cache ({cached}) and "
            f"downloading them failed: {err}. Put the file there, or use `--weights PATH` "
            "(a torchvision state_dict) or `--weights none` (random init)."
        ) from err


@contextlib.contextmanager
def _socket_timeout(seconds: float | None):
    previous = socket.getdefaulttimeout()
    if seconds is not None:
        socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _load_state_dict_file(model: nn.Module, path: Path, head_name: str) -> None:
    """Load every non-head tensor of the state_dict at ``path``; the head is replaced anyway."""
    if path.is_dir():
        raise ModelError(f"weights file {str(path)!r} is a folder; --weights takes a state_dict file "
                         "(torch.save(model.state_dict(), PATH)), 'imagenet' or 'none'")
    if not path.is_file():
        raise ModelError(
            f"weights file {str(path)!r} does not exist (or use 'imagenet' / 'none')"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle and zip errors have no common base class
        raise ModelError(
            f"weights file {str(path)!r} is not a torch state_dict: {err}"
        ) from err
    if not isinstance(state, dict) or not all(
        isinstance(v, Tensor) for v in state.values()
    ):
        raise ModelError(
            f"weights file {str(path)!r} is not a flat state_dict of tensors "
            "(for a training checkpoint, save its model state_dict alone)"
        )
    expected = {
        k: v for k, v in model.state_dict().items() if not k.startswith(head_name + ".")
    }
    given = {k: v for k, v in state.items() if not k.startswith(head_name + ".")}
    missing = sorted(expected.keys() - given.keys())
    unexpected = sorted(given.keys() - expected.keys())
    mismatched = sorted(
        f"{k} {tuple(given[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected.keys() & given.keys()
        if given[k].shape != expected[k].shape
    )
    problems = [
        f"{label} ({len(keys)}): {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", mismatched),
        )
        if keys
    ]
    if problems:
        raise ModelError(
            f"weights file {str(path)!r} does not fit {type(model).__name__}: "
            + "; ".join(problems)
        )
    model.load_state_dict(given, strict=False)


# --------------------------------------------------------------------------- stages


@dataclass
class Staged:
    """A view of a model as ``stages -> pool -> head``; all modules are the model's own."""

    stages: list[nn.Module]  # in forward order; composed they are the feature extractor
    pool: nn.Module  # everything between the last stage and the head
    head: nn.Module  # the final classification layer

    def forward_stages(
        self, x: Tensor, start: int = 0, end: int | None = None
    ) -> Tensor:
        for stage in self.stages[start:end]:
            x = stage(x)
        return x

    def forward_head(
        self, feats: Tensor, dropout: float = 0.0, training: bool = False
    ) -> Tensor:
        return self.head(F.dropout(self.pool(feats), p=dropout, training=training))

    def forward(
        self, x: Tensor, dropout: float = 0.0, training: bool = False
    ) -> Tensor:
        return self.forward_head(self.forward_stages(x), dropout, training)


def _resnet(model) -> Staged:
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    stages = [stem, model.layer1, model.layer2, model.layer3, model.layer4]
    return Staged(stages, nn.Sequential(model.avgpool, nn.Flatten(1)), model.fc)


def _vgg(model) -> Staged:
    blocks, block = [], []
    for layer in model.features:
        block.append(layer)
        if isinstance(layer, nn.MaxPool2d):
            blocks.append(nn.Sequential(*block))
            block = []
    pool = nn.Sequential(model.avgpool, nn.Flatten(1), *model.classifier[:-1])
    return Staged(blocks, pool, model.classifier[-1])


def _features_classifier(model, *pool: nn.Module) -> Staged:
    """Families whose forward is ``features -> pool... -> classifier``."""
    pool = nn.Sequential(*pool, *model.classifier[:-1])
    return Staged(list(model.features.children()), pool, model.classifier[-1])


class _VitEmbedding(nn.Module):
    """What VisionTransformer.forward does before the encoder layers, as one stage."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.conv_proj = vit.conv_proj
        self.class_token = vit.class_token
        self.pos_embedding = vit.encoder.pos_embedding
        self.dropout = vit.encoder.dropout
        # A bound method is not a submodule, so the whole model's parameters don't
        # become this stage's; it keeps torchvision's patchify and image-size check.
        self.process_input = vit._process_input

    def forward(self, x: Tensor) -> Tensor:
        x = self.process_input(x)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.dropout(x + self.pos_embedding)


class _ClassToken(nn.Module):
    """The encoder's final norm, then the class token's features."""

    def __init__(self, ln: nn.Module):
        super().__init__()
        self.ln = ln

    def forward(self, x: Tensor) -> Tensor:
        return self.ln(x)[:, 0]


def _vit(model) -> Staged:
    stages = [_VitEmbedding(model), *model.encoder.layers.children()]
    heads = list(model.heads.children())
    return Staged(
        stages, nn.Sequential(_ClassToken(model.encoder.ln), *heads[:-1]), heads[-1]
    )


def _mobilenet_v2(model) -> Staged:
    # Its forward pools with F.adaptive_avg_pool2d, so there is no avgpool module.
    return _features_classifier(model, nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(1))


def _mobilenet_v3_efficientnet(model) -> Staged:
    return _features_classifier(model, model.avgpool, nn.Flatten(1))


def _convnext(model) -> Staged:
    return _features_classifier(model, model.avgpool)  # its classifier flattens


# name prefix -> staged view; each pool mirrors what the torchvision forward does
_FAMILIES: dict[tuple[str, ...], Callable[[nn.Module], Staged]] = {
    ("resnet", "resnext", "wide_resnet"): _resnet,
    ("vgg",): _vgg,
    ("mobilenet_v2",): _mobilenet_v2,
    ("mobilenet_v3", "efficientnet"): _mobilenet_v3_efficientnet,
    ("convnext",): _convnext,
    ("vit_",): _vit,
}


def _family(name: str) -> Callable[[nn.Module], Staged]:
    for prefixes, staged in _FAMILIES.items():
        if name.startswith(prefixes):
            return staged
    supported = ", ".join(p + "*" for prefixes in _FAMILIES for p in prefixes)
    raise ModelError(
        f"frozen_depth/staged execution is not supported for {name!r}; supported families: {supported}"
    )


def stages(model: nn.Module, name: str) -> Staged:
    """The staged view of a supported family; for any other model, the whole model as the
    head with no stages (it trains end to end: frozen_depth must be 0, no head dropout)."""
    try:
        family = _family(name)
    except ModelError:
        return Staged([], nn.Identity(), model)
    return family(model)


@functools.cache
def num_stages(name: str) -> int:
    check_model_name(name)
    _family(name)  # fail before building: some families cannot be built on meta
    # Shapes only: the meta device allocates nothing, so even vit_h_14 is instant.
    with torch.device("meta"):
        return len(stages(build_model(name, 10, "none"), name).stages)


def freeze(staged: Staged, frozen_depth: int) -> None:
    """Freeze exactly the first ``frozen_depth`` stages; pool and head are left alone."""
    n = len(staged.stages)
    if not 0 <= frozen_depth <= n:
        raise ModelError(
            f"frozen_depth={frozen_depth} is out of range: the model has {n} stages, "
            f"so frozen_depth must be in 0..{n} ({n} trains only the pool and head)"
        )
    for i, stage in enumerate(staged.stages):
        for p in stage.parameters():
            p.requires_grad_(i >= frozen_depth)


def set_train_mode(
    model: nn.Module, staged: Staged, frozen_depth: int, training: bool = True
) -> None:
    """``model.train(training)``, but frozen stages stay in eval mode.

    Frozen BatchNorm layers must not update their running statistics, and dropout in a
    frozen prefix would make its outputs (and the feature cache) nondeterministic.
    """
    model.train(training)
    for stage in staged.stages[:frozen_depth]:
        stage.eval()


def normalization(
    name: str, weights: str
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Input mean/std: the pretrained weights' own preprocessing, else ImageNet's."""
    if weights != "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    check_model_name(name)
    transforms = get_model_weights(name).DEFAULT.transforms()
    return tuple(transforms.mean), tuple(transforms.std)
