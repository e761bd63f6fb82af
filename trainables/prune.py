"""Global magnitude pruning after fine-tuning, with ``torch.nn.utils.prune``.

After ``max_epochs`` of fine-tuning, a trial with ``prune_amount > 0`` zeroes that
fraction of its prunable weights, those of smallest magnitude across all of them at once
(one global L1 threshold, so layers with many small weights lose more of them), then
fine-tunes for ``recovery_epochs``. ``prune`` reparametrises each pruned weight as
``weight_orig * weight_mask`` in a forward pre-hook, so the pruned weights stay zero
however the optimizer moves ``weight_orig`` during recovery.

Prunable: the weights of the conv and linear layers that train. Frozen stages are left
whole: the feature cache holds their outputs, which must not change. Biases and norm
layers are not pruned. A ViT's attention projections are not either: ``MultiheadAttention``
reads ``out_proj.weight`` without calling ``out_proj``, so its mask hook would never run.

``sparsity`` is measured over the prunable set (the zeros the pruning put there);
``nonzero_params`` counts the nonzero values of every parameter of the whole model,
frozen or not: the model's size as a sparse format or a compressor would see it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune

PRUNABLE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
Pruned = list[tuple[nn.Module, str]]  # (module, "weight") pairs, as prune.global_unstructured takes


def prunable(model: nn.Module) -> Pruned:
    """The trainable conv/linear weights, in module order."""
    attention = [name for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, PRUNABLE_LAYERS) or any(name.startswith(a + ".") for a in attention):
            continue
        weight = module.weight_orig if prune.is_pruned(module) else module.weight
        if weight.requires_grad:
            out.append((module, "weight"))
    return out


def prune_global(model: nn.Module, amount: float) -> Pruned:
    """Zero the ``amount`` fraction of the prunable weights with the smallest magnitude."""
    params = prunable(model)
    # global_unstructured flattens each weight with .view(-1), which a channels_last weight
    # (the default for trials on CUDA) refuses: prune in the default layout, then go back.
    # .to(memory_format=...) changes .data in place, so the optimizer keeps its parameters.
    channels_last = any(_channels_last(getattr(m, n)) for m, n in params)
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return params


def _channels_last(t: torch.Tensor) -> bool:
    return t.ndim == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def restore_masks(model: nn.Module) -> Pruned:
    """Re-apply the masks of a pruned model loaded from a plain state_dict.

    Checkpoints hold the weights with the masks folded in, so the mask is where the
    weights are zero (an unpruned weight that is exactly 0.0 stays zero from then on,
    which changes nothing the model computes).
    """
    params = prunable(model)
    for module, name in params:
        prune.custom_from_mask(module, name, mask=getattr(module, name) != 0)
    return params


def effective(module: nn.Module, name: str) -> torch.Tensor:
    """The weight the module computes with: ``orig * mask`` once pruned."""
    if hasattr(module, name + "_mask"):
        return getattr(module, name + "_orig") * getattr(module, name + "_mask")
    return getattr(module, name)


@torch.no_grad()
def sparsity(params: Pruned) -> float:
    """The fraction of zeros among the given weights."""
    total = sum(getattr(m, n).numel() for m, n in params)
    zeros = sum((effective(m, n) == 0).sum().item() for m, n in params)
    return zeros / max(total, 1)


@torch.no_grad()
def nonzero_params(model: nn.Module) -> int:
    """Nonzero values over every parameter of the model, pruned ones with their masks."""
    count = 0
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            value = effective(module, name.removesuffix("_orig")) if name.endswith("_orig") else param
            count += int(torch.count_nonzero(value))
    return count


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict with every mask folded into its weight, under the plain torchvision
    keys: what ``prune.remove`` would leave, without removing the masks recovery needs."""
    state = model.state_dict()
    out = {}
    for key, value in state.items():
        if key.endswith("_mask"):
            continue
        if key.endswith("_orig"):
            base = key.removesuffix("_orig")
            out[base] = value * state[base + "_mask"]
        else:
            out[key] = value
    return out
