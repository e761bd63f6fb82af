"""Load and validate a search space: one YAML file per ``--space`` name.

A space is data::

    description: what the sweep is for
    trials: 12                 # number of trials (--trials overrides)
    seed: 0                    # seeds TPE and every trial (--seed overrides)
    search:                    # what Optuna's TPE chooses
      lr: {type: loguniform, low: 1.0e-4, high: 0.1}
      decay_power: {type: uniform, low: 0.5, high: 3.0}
      frozen_depth: {type: int, low: 0, high: 4}
      optimizer: {type: choice, values: [sgd, adamw]}
    fixed:                     # any other trial config key (trainables.config.TrialConfig)
      max_epochs: 6
    scheduler: {type: asha, grace_period: 1, reduction_factor: 3}
    tpe: {n_startup_trials: 4}

``scheduler`` is one of ``SCHEDULERS`` with its options; without it, ASHA with the ``asha``
section's settings (the older spelling of ``scheduler: {type: asha, ...}``).

Every problem is reported with the file and the key, before anything starts.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from trainables.config import TrialConfig, coerce

SPACES_DIR = Path(__file__).resolve().parent
DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")
TOP_KEYS = {"description", "trials", "seed", "search", "fixed", "asha", "scheduler", "tpe"}
ASHA_KEYS = {"grace_period": int, "reduction_factor": float}
# type -> its options and their defaults: ASHA stops trials at rungs; promotion pauses them
# there and resumes the promoted ones; top_k trains every trial to one rung, then the best k
# to the end (sweeps/tune/schedulers.py).
SCHEDULERS = {
    "asha": {"grace_period": 1, "reduction_factor": 3.0},
    "promotion": {"grace_period": 1, "reduction_factor": 3.0},
    "top_k": {"k": 3, "rung": 1},
}
TPE_KEYS = {"n_startup_trials": int}
# Values a key may never take, whether searched or fixed.
_POSITIVE = {"lr", "batch_size", "max_epochs", "image_size"}
_NON_NEGATIVE = {"momentum", "weight_decay", "l1", "label_smoothing", "decay_power",
                 "frozen_depth", "dropout", "augment_strength", "prune_amount",
                 "recovery_epochs", "patience"}
_UNIT_INTERVAL = {"dropout", "label_smoothing", "augment_strength", "prune_amount", "momentum"}
_CHOICES = {"optimizer": ("sgd", "adamw")}


class SpaceError(ValueError):
    """A space file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    low: float | None = None
    high: float | None = None
    values: tuple = ()

    def sample(self, rng: random.Random):
        if self.type == "choice":
            return rng.choice(self.values)
        if self.type == "int":
            return rng.randint(int(self.low), int(self.high))
        if self.type == "loguniform":
            return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        return rng.uniform(self.low, self.high)

    def bounds(self) -> list:
        return list(self.values) if self.type == "choice" else [self.low, self.high]


@dataclass(frozen=True)
class Space:
    name: str
    path: Path
    description: str = ""
    trials: int = 1
    seed: int = 0
    search: dict[str, Param] = field(default_factory=dict)
    fixed: dict = field(default_factory=dict)
    grace_period: int = 1
    reduction_factor: float = 3.0
    n_startup_trials: int = 4
    scheduler: dict = field(default_factory=lambda: {"type": "asha", **SCHEDULERS["asha"]})

    def config(self, sampled: dict | None = None) -> TrialConfig:
        """The full trial config for one set of sampled values."""
        return TrialConfig.from_dict({**self.fixed, "seed": self.seed, **(sampled or {})})

    def sample(self, rng: random.Random) -> TrialConfig:
        return self.config({k: p.sample(rng) for k, p in self.search.items()})

    def override(self, **fixed) -> Space:
        """Fix more keys (``--set``, ``--max-epochs``): a searched key given a value leaves
        the search and is fixed at it."""
        checked = _check_values(self.path, "override", fixed)
        return replace(self, fixed={**self.fixed, **checked},
                       search={k: p for k, p in self.search.items() if k not in checked})

    @property
    def max_epochs(self) -> int:
        return self.config().max_epochs


def resolve(space: str) -> Path:
    """``--space`` is a name in ``search_spaces/`` or a path to a YAML file."""
    as_path = Path(space)
    if as_path.suffix in (".yaml", ".yml") or as_path.exists():
        if as_path.is_dir():
            raise SpaceError(f"--space {as_path}: a folder, not a space file")
        if not as_path.is_file():
            raise SpaceError(f"space file not found: {as_path}")
        return as_path
    named = SPACES_DIR / f"{space}.yaml"
    if not named.is_file():
        raise SpaceError(f"unknown space {space!r}; available: {', '.join(available())} "
                         "(or pass a path to a YAML file)")
    return named


def available() -> list[str]:
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def load_space(space: str) -> Space:
    path = resolve(space)
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise SpaceError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    _check_keys(path, "", raw, TOP_KEYS)
    search = {name: _param(path, name, spec) for name, spec in (raw.get("search") or {}).items()}
    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise SpaceError(f"{path}: 'fixed' must be a mapping")
    _check_keys(path, "fixed.", fixed, TrialConfig.keys())
    both = sorted(set(search) & set(fixed))
    if both:
        raise SpaceError(f"{path}: {', '.join(both)} is both searched and fixed")
    fixed = _check_values(path, "fixed", fixed)
    asha = _section(path, raw, "asha", ASHA_KEYS)
    scheduler = _scheduler(path, raw, asha)
    tpe = _section(path, raw, "tpe", TPE_KEYS)
    space = Space(
        name=path.stem, path=path, description=str(raw.get("description", "")).strip(),
        trials=_positive_int(path, "trials", raw.get("trials", 1)),
        seed=_int(path, "seed", raw.get("seed", 0)),
        search=search, fixed=fixed,
        grace_period=scheduler.get("grace_period", 1),
        reduction_factor=scheduler.get("reduction_factor", 3.0),
        n_startup_trials=tpe.get("n_startup_trials", 4),
        scheduler=scheduler,
    )
    return space


def _scheduler(path: Path, raw: dict, asha: dict) -> dict:
    """The ``scheduler`` section with its defaults filled in, or ASHA from the ``asha`` one."""
    if "scheduler" not in raw:
        settings = {"type": "asha", **SCHEDULERS["asha"], **asha}
    else:
        if "asha" in raw:
            raise SpaceError(f"{path}: both 'asha' and 'scheduler' given; write the ASHA settings as "
                             "scheduler: {type: asha, grace_period: ..., reduction_factor: ...}")
        section = raw["scheduler"]
        if not isinstance(section, dict) or "type" not in section:
            raise SpaceError(f"{path}: 'scheduler' must be a mapping with 'type' (one of {', '.join(SCHEDULERS)})")
        kind = section["type"]
        if kind not in SCHEDULERS:
            raise SpaceError(f"{path}: scheduler.type: unknown scheduler {kind!r} (one of {', '.join(SCHEDULERS)})")
        options = SCHEDULERS[kind]
        _check_keys(path, "scheduler.", section, {"type", *options})
        settings = {"type": kind, **options}
        for key, value in section.items():
            if key == "type":
                continue
            kind_of = type(options[key])
            if isinstance(value, bool) or not isinstance(value, int | float) or (
                    kind_of is int and value != int(value)):
                raise SpaceError(f"{path}: scheduler.{key} must be {'an integer' if kind_of is int else 'a number'}, "
                                 f"got {value!r}")
            settings[key] = kind_of(value)
    if "scheduler" not in raw and (settings["grace_period"] < 1 or settings["reduction_factor"] <= 1):
        raise SpaceError(f"{path}: asha needs grace_period >= 1 and reduction_factor > 1")
    for key in ("grace_period", "k", "rung"):
        if key in settings and settings[key] < 1:
            raise SpaceError(f"{path}: scheduler.{key} must be >= 1, got {settings[key]}")
    factor = settings.get("reduction_factor")
    if factor is not None and not (math.isfinite(factor) and factor > 1):
        raise SpaceError(f"{path}: scheduler.reduction_factor must be > 1, got {factor}")
    return settings


MAX_FILE_BYTES = 1 << 20
MAX_VALUES = 10_000  # a space has a few dozen; aliases (&a / *a) must not multiply them


def _read_yaml(path: Path):
    """The file's YAML, or a SpaceError naming it: not text, too big, malformed, or a
    "billion laughs" whose nested aliases would expand to more than ``MAX_VALUES``."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise SpaceError(f"{path}: {path.stat().st_size} bytes; a space file is a few hundred")
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise SpaceError(f"{path}: not a text file (not UTF-8); a space file is YAML") from None
    except OSError as e:
        raise SpaceError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    try:
        raw = yaml.safe_load(text)  # an alias is one shared object here, not a copy
    except yaml.YAMLError as e:
        raise SpaceError(f"{path}: malformed YAML: {e}") from None
    except RecursionError:
        raise SpaceError(f"{path}: malformed YAML: nested too deeply") from None
    count, stack = 0, [raw]
    while stack:  # counts what a reader walking the file would see, up to the cap
        node = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise SpaceError(f"{path}: more than {MAX_VALUES} values once its YAML aliases are "
                             "expanded (nested or self-referencing aliases); write the values out")
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return raw


def _check_keys(path: Path, prefix: str, mapping: dict, allowed) -> None:
    unknown = sorted(set(mapping) - set(allowed))
    if unknown:
        raise SpaceError(f"{path}: unknown key {prefix}{unknown[0]!s}"
                         f" (allowed: {', '.join(sorted(allowed))})")


def _section(path: Path, raw: dict, name: str, keys: dict) -> dict:
    section = raw.get(name) or {}
    if not isinstance(section, dict):
        raise SpaceError(f"{path}: '{name}' must be a mapping")
    _check_keys(path, f"{name}.", section, keys)
    try:
        return {k: keys[k](v) for k, v in section.items()}
    except (TypeError, ValueError):
        raise SpaceError(f"{path}: {name}: values must be numbers") from None


def _int(path: Path, key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpaceError(f"{path}: {key} must be an integer, got {value!r}")
    return value


def _positive_int(path: Path, key: str, value) -> int:
    if _int(path, key, value) < 1:
        raise SpaceError(f"{path}: {key} must be >= 1, got {value}")
    return value


def _param(path: Path, name: str, spec) -> Param:
    where = f"{path}: search.{name}"
    if name not in TrialConfig.keys():
        raise SpaceError(f"{path}: unknown key search.{name} "
                         f"(allowed: {', '.join(TrialConfig.keys())})")
    if not isinstance(spec, dict) or "type" not in spec:
        raise SpaceError(f"{where}: expected a mapping with 'type' (one of {', '.join(DISTRIBUTIONS)})")
    kind = spec["type"]
    if kind not in DISTRIBUTIONS:
        raise SpaceError(f"{where}: unknown distribution {kind!r} (one of {', '.join(DISTRIBUTIONS)})")
    allowed = {"type", "values"} if kind == "choice" else {"type", "low", "high"}
    _check_keys(path, f"search.{name}.", spec, allowed)
    try:
        if kind == "choice":
            values = tuple(coerce(name, v) for v in spec.get("values") or ())
            if not values:
                raise SpaceError(f"{where}: choice needs a non-empty 'values' list")
            for v in values:
                _check_values(path, f"search.{name}", {name: v})
            return Param(name, kind, values=values)
        if "low" not in spec or "high" not in spec:
            raise SpaceError(f"{where}: {kind} needs 'low' and 'high'")
        if kind == "int" and TrialConfig.keys()[name] is not int:
            raise SpaceError(f"{where}: 'int' distribution for a non-integer key")
        if kind in ("uniform", "loguniform") and TrialConfig.keys()[name] is int:
            raise SpaceError(f"{where}: {kind} draws fractional values, but {name} is an integer key; "
                             f"use 'int' (low..high) or 'choice' (e.g. values: [16, 32, 64])")
        low, high = coerce(name, spec["low"]), coerce(name, spec["high"])
    except (ValueError, OverflowError) as e:  # int(float("1e999")) overflows
        raise SpaceError(f"{where}: {e}") from None
    if TrialConfig.keys()[name] not in (int, float):
        raise SpaceError(f"{where}: {kind} needs a numeric key; use 'choice'")
    if low > high:
        raise SpaceError(f"{where}: reversed bounds (low {low} > high {high})")
    if kind == "loguniform" and low <= 0:
        raise SpaceError(f"{where}: loguniform needs low > 0, got {low}")
    _check_values(path, f"search.{name}", {name: low})
    _check_values(path, f"search.{name}", {name: high})
    return Param(name, kind, low=low, high=high)


def _check_values(path: Path, where: str, values: dict) -> dict:
    """Coerce each value to its key's type and reject values no trial can use."""
    out = {}
    for key, value in values.items():
        if key not in TrialConfig.keys():
            raise SpaceError(f"{path}: {where}: unknown trial config key {key!r} "
                             f"(allowed: {', '.join(TrialConfig.keys())})")
        try:
            value = coerce(key, value)
        except ValueError as e:
            raise SpaceError(f"{path}: {where}: {e}") from None
        except OverflowError:  # int(float("1e999"))
            raise SpaceError(f"{path}: {where}: {key}: expected an integer, got {value!r}") from None
        if isinstance(value, float) and not math.isfinite(value):  # .nan, .inf, 1e999
            raise SpaceError(f"{path}: {where}: {key} must be a finite number, got {value}")
        if key in _POSITIVE and value <= 0:
            raise SpaceError(f"{path}: {where}: {key} must be > 0, got {value}")
        if key in _NON_NEGATIVE and value < 0:
            raise SpaceError(f"{path}: {where}: {key} must be >= 0, got {value}")
        if key in _UNIT_INTERVAL and value > 1:
            raise SpaceError(f"{path}: {where}: {key} must be at most 1, got {value}")
        if key in _CHOICES and value not in _CHOICES[key]:
            raise SpaceError(f"{path}: {where}: {key} must be one of {', '.join(_CHOICES[key])}, "
                             f"got {value!r}")
        out[key] = value
    return out
