"""The trial config: every key a trial understands, its type and its default.

A search space (``search_spaces/*.yaml``) may search or fix any of these keys and
nothing else; the loader rejects unknown keys by name. The defaults are the classic
fine-tuning recipe, so a space only states what it changes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class TrialConfig:
    # model
    model: str = "resnet18"
    weights: str = "imagenet"  # "imagenet" | "none" | path to a torchvision state_dict
    image_size: int = 224
    frozen_depth: int = 0  # leading stages frozen; see trainables.models.stages()
    dropout: float = 0.0  # dropout on the pooled features, before the head
    # optimisation
    optimizer: str = "sgd"  # "sgd" | "adamw"
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 0.0  # L2
    l1: float = 0.0  # L1 penalty on the trainable weights
    label_smoothing: float = 0.0
    decay_power: float = 1.0  # lr_t = lr * (1 - t/T) ** decay_power, T = max_epochs * steps
    batch_size: int = 32
    max_epochs: int = 10
    patience: int = 0  # early stopping on val_acc; 0 = off
    # data
    augment_strength: float = 0.0  # 0 = no augmentation; 1 = RandomResizedCrop(scale=(0.08, 1))
    hflip: bool = True  # random horizontal flip when augment_strength > 0
    # pruning after fine-tuning
    prune_amount: float = 0.0  # fraction of prunable weights zeroed by global magnitude
    recovery_epochs: int = 0  # fine-tuning epochs after pruning
    # speed
    feature_cache: bool = True  # reuse the frozen prefix's outputs when nothing random precedes them
    amp: bool = True  # mixed precision on CUDA
    channels_last: bool = True  # on CUDA
    pin_memory: bool = True  # on CUDA: page-locked batches, copied without blocking
    seed: int = 0

    @classmethod
    def keys(cls) -> dict[str, type]:
        return {f.name: _TYPES[f.type] for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, values: dict) -> TrialConfig:
        known = cls.keys()
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise KeyError(f"unknown trial config key(s): {', '.join(unknown)}")
        return cls(**{k: coerce(k, v) for k, v in values.items()})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def total_epochs(self) -> int:
        return self.max_epochs + (self.recovery_epochs if self.prune_amount > 0 else 0)


_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def coerce(key: str, value):
    """Convert ``value`` to the type of config ``key`` (YAML reads ``1e-4`` as a string)."""
    want = TrialConfig.keys()[key]
    if want is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"{key}: expected true/false, got {value!r}")
    if want is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(float(value)) if isinstance(value, str) else int(value)
        except ValueError:
            raise ValueError(f"{key}: expected an integer, got {value!r}") from None
    if want is float:
        if isinstance(value, bool):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: expected a number, got {value!r}") from None
    return str(value)

