"""Turn the command line into a checked sweep plan, before any trial, run or cluster starts.

Everything a user can get wrong is found here and reported as a ``UsageError`` naming
the culprit; ``run.py`` turns it into exit code 2.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from search_spaces.loader import Space, SpaceError, load_space
from sweeps.cli import parse_sets
from sweeps.errors import UsageError
from sweeps.results import storage
from trainables import demo, node_cache
from trainables.config import TrialConfig, coerce
from trainables.zoo import check_model_name

if TYPE_CHECKING:
    from sweeps.records.warm_start import WarmStart
    from trainables.data import DataHandle

# The checks that come before Ray starts import nothing heavy: Ray's start overlaps with
# importing torch, torchvision and MLflow for the slower checks (sweeps/run.py).


@dataclass(frozen=True)
class Plan:
    space: Space
    data: DataHandle
    name: str
    storage: str  # absolute path or URI that Ray Tune writes under
    tracking_uri: str
    experiment: str
    dataset_label: str
    resources: dict
    max_concurrent: int | None
    trials: int
    time_budget: float | None
    max_failures: int
    resume: bool
    ray_address: str | None
    warm_start: WarmStart | None = None  # an earlier sweep's trials, for TPE's history
    split_seed: int = 0  # the stratified train/val split's seed (--split-seed), not the search's
    val_fraction: float = 0.2
    inputs: dict = field(default_factory=dict)  # sweeps.plan.inputs.sweep_inputs, on the parent run
    max_acc_drop: float | None = None  # name the smallest model within this of the best val_acc
    keep_checkpoints: int = 1  # after the sweep: the best checkpoint of this many best trials
    register: str | None = None  # --register: the registered model the best model becomes a version of

    @property
    def sweep_dir(self) -> str:
        """The sweep's folder: a path, or a URI that keeps the storage URI's query
        (``s3://bucket/sweeps/NAME?endpoint_override=...``)."""
        return storage.join(self.storage, self.name)

    @property
    def total_epochs(self) -> int:
        """The most epochs a trial can run, ASHA's max_t: a searched max_epochs,
        recovery_epochs or prune_amount counts at its largest value, not its default."""
        longest = {k: max(p.values) if p.type == "choice" else p.high
                   for k, p in self.space.search.items()
                   if k in ("max_epochs", "recovery_epochs", "prune_amount")}
        return self.space.config(longest).total_epochs

    @property
    def is_local(self) -> bool:
        return "://" not in self.storage


def prepare(args, log=print, checked: Callable[[], None] | None = None) -> Plan:
    """The checked plan, or a ``UsageError``. ``checked`` is called once the quick checks
    have passed (the space, the flags, the model's name, the resources, the tracking server,
    the listing of the user's data folder), before the slower ones (decoding every image,
    the model's weights, the MLflow store)."""
    try:
        return _prepare(args, log, checked or (lambda: None))
    except (SpaceError, ValueError) as e:  # DataError and ModelError are ValueErrors
        raise UsageError(str(e)) from None


def _prepare(args, log, checked: Callable[[], None]) -> Plan:
    from sweeps.plan.uris import check_tracking_uri

    _check_flags(args)
    space = load_space(args.space)
    is_demo = args.data is None
    flags = {"model": args.model, "image_size": args.image_size, "max_epochs": args.max_epochs}
    fixed = {**parse_sets(args.set), **{k: v for k, v in flags.items() if v is not None}}
    model = fixed["model"] = fixed.get("model") or space.fixed.get("model", "resnet18")
    check_model_name(model)
    fixed.setdefault("image_size", demo.IMAGE_SIZE if is_demo else space.config().image_size)
    # --set seed=N is --seed N: the space's seed, for TPE and every trial
    seed = _seed(args.seed, fixed.pop("seed", None), space)
    space = replace(space.override(**fixed), seed=seed)
    _check_pruning(space)
    max_acc_drop = _max_acc_drop(args, space)
    _check_resources(args)
    _check_storage(args.storage)
    check_tracking_uri(args.tracking_uri)
    if getattr(args, "register", None) is not None:
        from sweeps.records.registry import check_registry

        check_registry(args.tracking_uri, args.register)
    from trainables.data import DataHandle, scan

    # The user's folder is listed before Ray starts: its report names every problem at once.
    root = None if is_demo else Path(args.data).expanduser()
    dataset = None if is_demo else scan(root, val_fraction=args.val_fraction, seed=args.split_seed)
    checked()

    from sweeps.plan import model_check
    from sweeps.plan.inputs import sweep_inputs

    _check_frozen_depth(space, model)
    _check_gpus(args)
    cfg = space.config()
    if is_demo:
        root = demo.transfer_folder()
        dataset = scan(root, val_fraction=args.val_fraction, seed=args.split_seed)
    weights = args.weights or fixed.get("weights") or ("demo" if is_demo else cfg.weights)
    if weights == "demo":
        weights = str(demo.pretrained_backbone(model, cfg.image_size, log=log))
    # Fail now, not in every trial, when the weights are missing or do not fit the model,
    # or the model does not take this image size (ViT's patch grid is fixed).
    mean, std = model_check.check(model, len(dataset.classes), weights, cfg.image_size)
    space = space.override(weights=weights)
    storage = args.storage if "://" in args.storage else str(Path(args.storage).resolve())
    label = "digits5-9" if is_demo else root.name
    name, experiment = _sweep_name(args, space, storage), args.experiment or f"ftsweep-{label}"
    inputs = sweep_inputs(space, dataset.fingerprint, args.split_seed, args.val_fraction)
    trials = _check_sweep_name(args, storage, name, experiment, inputs) or args.trials or space.trials
    start = _warm_start(args, space, dataset.fingerprint, log) if args.warm_start else None

    # Decoding is the validation pass: every image is read once, here, before anything starts.
    data = DataHandle(dataset, cfg.image_size, str(node_cache.cache_root() / "decoded"), mean, std)
    data = data.prepare(skip_bad=args.skip_bad_images)
    if data.dataset.skipped:
        log(f"Skipping {len(data.dataset.skipped)} bad file(s) (--skip-bad-images); "
            "their list is logged with the sweep as skipped_files.txt")
    return Plan(
        space=space, data=data, name=name, storage=storage,
        tracking_uri=args.tracking_uri, experiment=experiment,
        dataset_label=label,
        resources={"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial},
        max_concurrent=args.max_concurrent, trials=trials,
        time_budget=args.time_budget, max_failures=args.max_failures, resume=args.resume,
        ray_address=args.ray_address or os.environ.get("RAY_ADDRESS"), warm_start=start,
        max_acc_drop=max_acc_drop, split_seed=args.split_seed, val_fraction=args.val_fraction,
        inputs=inputs, keep_checkpoints=args.keep_checkpoints, register=getattr(args, "register", None))


def _check_sweep_name(args, storage: str, name: str, experiment: str, inputs: dict) -> int | None:
    """A name is one sweep. Without --resume, an existing sweep of this name (its MLflow
    parent run, or its folder) stops us; with it, the resumed command must describe the
    same sweep. Returns the trial count a resumed sweep started with."""
    from sweeps.plan.inputs import recorded_inputs
    from sweeps.records.format import find_parent_run
    from sweeps.records.tracking import client as tracking_client

    # A sqlite store that does not exist yet holds no earlier sweep: looking must not create it.
    uri = args.tracking_uri
    new_store = uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).expanduser().exists()
    client = None if new_store else tracking_client(uri)  # an existing store may be new to MLflow still
    exp = client.get_experiment_by_name(experiment) if client else None
    parent = find_parent_run(client, name, exp.experiment_id) if exp else None
    if not args.resume:
        folder = Path(storage) / name if "://" not in storage else None
        if parent is None and not (folder and folder.exists()):
            return None
        where = (f"MLflow parent run {parent.info.run_id} in experiment {experiment}" if parent
                 else f"folder {folder}")
        raise UsageError(f"--name {name}: a sweep of this name exists already ({where}). "
                         f"Add --resume to continue it, or pass another --name for a new sweep")
    was = recorded_inputs(parent) if parent else None
    if parent is None:  # another --data folder name means another default --experiment
        parent = find_parent_run(client, name) if client else None
        if parent is None:
            return None
        was = {**(recorded_inputs(parent) or {}),
               "experiment": client.get_experiment(parent.info.experiment_id).name}
        inputs = {**inputs, "experiment": experiment}
    if was is not None:  # None: a sweep from before its inputs were recorded
        _check_same_sweep(name, parent, was, inputs)
    return _resumed_trials(name, parent, args.trials)


def _check_same_sweep(name: str, parent, was: dict, inputs: dict) -> None:
    """--resume continues the sweep only on the inputs it started with."""
    from sweeps.plan.inputs import input_changes

    changes = input_changes(was, inputs)
    if changes:
        raise UsageError(f"--resume: sweep {name} (MLflow run {parent.info.run_id}) started on other "
                         "inputs; resuming would continue its trials on these:\n  " + "\n  ".join(changes)
                         + "\nRun the command it started with, or start a new sweep with another --name")


def _resumed_trials(name: str, parent, asked: int | None) -> int | None:
    """The trial count a resumed sweep started with (its MLflow parent run says; Ray Tune
    restores it whatever --trials says). A different --trials is an error, not ignored."""
    logged = parent.data.params.get("trials")
    if logged is None:
        return None
    if asked is not None and asked != int(logged):
        raise UsageError(f"--resume continues sweep {name} with the {logged} trials it started with, "
                         f"not --trials {asked}; for more trials start a new sweep with --warm-start {name}")
    return int(logged)


def _seed(flag: int | None, set_value, space: Space) -> int:
    """The sweep's seed: --seed, or --set seed=N, or the space's."""
    if set_value is not None:
        set_value = coerce("seed", set_value)  # ValueError: prepare() makes it a UsageError
        if flag is not None and flag != set_value:
            raise UsageError(f"--seed {flag} and --set seed={set_value} disagree; give one of them")
    return flag if flag is not None else set_value if set_value is not None else space.seed


def _check_frozen_depth(space: Space, model: str) -> None:
    param = space.search.get("frozen_depth")
    deepest = int(param.high if param and param.type != "choice"
                  else max(param.values) if param else space.config().frozen_depth)
    if deepest == 0:
        return
    from sweeps.plan.model_check import stages as num_stages

    stages = num_stages(model)
    if deepest > stages:
        raise UsageError(f"{space.path}: frozen_depth goes up to {deepest}, but {model} has "
                         f"{stages} stages (frozen_depth 0..{stages})")


def _prunes(space: Space) -> bool:
    param = space.search.get("prune_amount")
    if param is not None:
        return (max(param.values) if param.type == "choice" else param.high) > 0
    return space.config().prune_amount > 0


def _check_pruning(space: Space) -> None:
    param = space.search.get("recovery_epochs")
    fewest = (min(param.values) if param.type == "choice" else param.low) if param else \
        space.config().recovery_epochs
    if _prunes(space) and fewest < 1:
        raise UsageError(f"{space.path}: prune_amount > 0 needs recovery_epochs >= 1 (got {fewest}): "
                         "the pruned model is fine-tuned and measured in the recovery epochs")


def _max_acc_drop(args, space: Space) -> float | None:
    """--max-acc-drop, else 0.01 for a space that prunes, else None (not asked for)."""
    if args.max_acc_drop is None:
        return 0.01 if _prunes(space) else None
    if not 0 <= args.max_acc_drop <= 1:
        raise UsageError(f"--max-acc-drop must be between 0 and 1 (a val_acc difference), "
                         f"got {args.max_acc_drop}")
    return args.max_acc_drop


def _warm_start(args, space: Space, fingerprint: str, log) -> WarmStart:
    from dashboards.frame import SweepNotFound
    from sweeps.records.warm_start import earlier_trials

    if not space.search:
        raise UsageError(f"--warm-start {args.warm_start}: space {space.name} searches nothing, "
                         "so there is no search to warm-start")
    try:
        return earlier_trials(args.tracking_uri, args.warm_start, space, fingerprint, log=log)
    except SweepNotFound as e:
        raise UsageError(f"--warm-start: {e}") from None


def _check_flags(args) -> None:
    """Numbers no sweep can use, refused naming the flag before the space is even read."""
    def refuse(flag: str, value, rule: str):
        raise UsageError(f"{flag} must be {rule}, got {value}")

    for flag in ("space", "data", "model", "weights", "experiment", "name", "storage", "tracking_uri",
                 "warm_start", "ray_address"):  # '' would silently mean the default, or '.'
        value = getattr(args, flag, None)
        if value is not None and not value.strip():
            refuse(f"--{flag.replace('_', '-')}", repr(value), "a non-empty value")
    _check_tracking_scheme(args.tracking_uri)

    for flag, value in (("--cpus-per-trial", args.cpus_per_trial), ("--gpus-per-trial", args.gpus_per_trial),
                        ("--time-budget", args.time_budget), ("--val-fraction", args.val_fraction),
                        ("--max-acc-drop", args.max_acc_drop)):
        if value is not None and not math.isfinite(value):
            refuse(flag, value, "a finite number")
    if args.time_budget is not None and args.time_budget <= 0:
        refuse("--time-budget", args.time_budget, "> 0 seconds")
    if not 0 < args.val_fraction < 1:
        refuse("--val-fraction", args.val_fraction, "between 0 and 1 (exclusive)")
    for flag, value, low in (("--max-epochs", args.max_epochs, 1), ("--image-size", args.image_size, 1),
                             ("--max-concurrent", args.max_concurrent, 1), ("--max-failures", args.max_failures, -1)):
        if value is not None and value < low:
            refuse(flag, value, f">= {low}")
    for flag, value in (("--seed", args.seed), ("--split-seed", args.split_seed)):
        if value is not None and not 0 <= value < 2**32:  # what numpy's and sklearn's seeds take
            refuse(flag, value, "between 0 and 2**32 - 1")
    for key, value in parse_sets(args.set).items():
        if key not in TrialConfig.keys():
            continue  # unknown keys are named, with the allowed ones, by the space's check
        try:
            coerced = coerce(key, value)
        except (ValueError, OverflowError) as e:  # int("1e999") overflows
            raise UsageError(f"--set {key}={value}: {e}") from None
        if isinstance(coerced, float) and not math.isfinite(coerced):
            raise UsageError(f"--set {key}={value}: {key} must be a finite number")


def _check_storage(where: str) -> None:
    """A local --storage must be a folder, or one we can create; nothing is created here."""
    if "://" in where:
        return
    path = Path(where).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise UsageError(f"--storage {where}: {path} is a file, not a folder")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"--storage {where}: cannot create it, {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--storage {where}: {existing} is not writable (permission denied)")


# Tracking stores every MLflow has (the rest are asked of MLflow's registry of stores)
COMMON_STORES = {"", "file", "sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks"}


def _check_tracking_scheme(uri: str) -> None:
    """A scheme MLflow has no store for (``foo://``) fails here, not in a traceback later.
    The usual ones pass without importing MLflow (a second, before Ray can start)."""
    import urllib.parse

    from sweeps.plan.uris import redact

    scheme = urllib.parse.urlsplit(uri).scheme
    if scheme in COMMON_STORES:
        return
    try:
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry

        known = set(_tracking_store_registry._registry)
    except (ImportError, AttributeError):  # a private registry: if it moves, skip this check
        return
    if scheme not in known and len(scheme) > 1:  # one letter: a Windows drive
        raise UsageError(f"--tracking-uri {redact(uri)}: MLflow has no tracking store for "
                         f"'{scheme}://' (one of: {', '.join(sorted(k for k in known if k))})")


def _check_ray_answers(address: str, timeout: float = 5.0) -> None:
    """A Ray address where nothing listens fails now, in seconds, naming it: ``ray.init``
    would wait for it without end."""
    import socket
    import urllib.parse

    if address in ("auto", "local"):
        return  # Ray finds (or refuses) these itself, at once
    url = urllib.parse.urlsplit(address if "://" in address else f"gcs://{address}")
    try:
        port = url.port or (10001 if url.scheme == "ray" else 6379)
    except ValueError:
        raise UsageError(f"--ray-address {address}: not HOST:PORT or ray://HOST:PORT") from None
    if not url.hostname:
        raise UsageError(f"--ray-address {address}: not HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as e:
        raise UsageError(f"--ray-address {address}: no Ray cluster answers at {url.hostname}:{port} ({e}); "
                         "start it (ray start --head) or pass the address its head printed") from None


def _check_resources(args) -> None:
    if args.cpus_per_trial <= 0:
        raise UsageError(f"--cpus-per-trial must be > 0, got {args.cpus_per_trial}")
    if args.gpus_per_trial < 0:
        raise UsageError(f"--gpus-per-trial must be >= 0, got {args.gpus_per_trial}")
    if args.ray_address or os.environ.get("RAY_ADDRESS"):
        _check_ray_answers(args.ray_address or os.environ["RAY_ADDRESS"])  # its nodes: run.check_cluster
    else:
        from ray._private.utils import get_num_cpus  # the CPUs a local Ray declares

        if args.cpus_per_trial > get_num_cpus():
            raise UsageError(f"--cpus-per-trial {args.cpus_per_trial}: this machine has {get_num_cpus()} "
                             "CPUs; no trial could ever start")
    if args.keep_checkpoints < 0:
        raise UsageError(f"--keep-checkpoints must be >= 0, got {args.keep_checkpoints}")
    if args.trials is not None and args.trials < 1:
        raise UsageError(f"--trials must be >= 1, got {args.trials}")


def _check_gpus(args) -> None:
    """On this machine, --gpus-per-trial needs that many CUDA GPUs (a cluster's are counted
    when it is joined)."""
    if args.gpus_per_trial <= 0 or args.ray_address or os.environ.get("RAY_ADDRESS"):
        return
    import torch

    if not torch.cuda.is_available():
        raise UsageError(f"--gpus-per-trial {args.gpus_per_trial}: this machine has no "
                         "CUDA GPU (torch.cuda.is_available() is False)")
    if args.gpus_per_trial > torch.cuda.device_count():
        raise UsageError(f"--gpus-per-trial {args.gpus_per_trial}: this machine has "
                         f"{torch.cuda.device_count()} GPU(s); no trial could ever start")


def _sweep_name(args, space: Space, storage: str) -> str:
    if args.name:
        if not re.fullmatch(r"[\w.-]+", args.name):
            raise UsageError(f"--name {args.name!r}: use letters, digits, '.', '-' and '_'")
        return args.name
    if args.resume:
        if "://" in storage:
            raise UsageError("--resume on remote storage needs --name")
        found = sorted(Path(storage).glob(f"{space.name}-*"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise UsageError(f"--resume: no sweep of space {space.name!r} under {storage}")
        return found[-1].name
    return f"{space.name}-{dt.datetime.now():%Y%m%d-%H%M%S}"
