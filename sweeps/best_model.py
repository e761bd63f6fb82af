"""The best model of a finished sweep, as its parent MLflow run keeps it under ``best/``.

Shared by ``sweeps/export.py`` and ``sweeps/predict.py``: find the sweep's parent run
(by run id or sweep name), download ``best/model.pt`` and ``best/meta.json``, rebuild
the torchvision model from the registry, and preprocess images with the very code the
sweep evaluated with (``decode_for``, then ``Batches``' centre crop and normalisation), so
a prediction here is the prediction the sweep scored.
"""

from __future__ import annotations

import json
import os
import tempfile
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sweeps.plan import UsageError
from sweeps.tracking import TAG_ROLE, TAG_SWEEP, check_tracking_uri, redact
from trainables.data import Batches, decode_for, decode_size

BEST_DIR = "best"
BEST_FILES = ("model.pt", "meta.json")


@dataclass(frozen=True)
class BestModel:
    run_id: str
    sweep: str
    meta: dict  # best/meta.json: model, classes, image_size, mean, std, config, val_acc, epoch
    model: nn.Module  # in eval mode, on the CPU

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def val_batch_size(self) -> int:
        """The batch size the sweep evaluated with (twice the training batch size)."""
        return int(self.meta["config"]["batch_size"]) * 2

    def describe(self) -> str:
        return (f"{self.meta['model']} from sweep {self.sweep} (MLflow run {self.run_id}, "
                f"val_acc {self.meta['val_acc']:.4f} at epoch {self.meta.get('epoch', '?')})")

    def batches(self, images: np.ndarray, batch_size: int) -> Batches:
        """Normalised float batches of the centre ``image_size`` crop of decoded ``(N, D, D, 3)``
        uint8 images, made by the same class as the sweep's val batches (labels: unused zeros)."""
        return Batches(images, np.zeros(len(images), np.int64), batch_size, mean=self.meta["mean"],
                       std=self.meta["std"], shuffle=False, crop=self.image_size)


def load_best(tracking_uri: str, run: str) -> BestModel:
    """The best model of the sweep whose parent run id or sweep name is ``run``.

    Raises UsageError, naming what is wrong, for an unreachable tracking store, an
    unknown run or sweep, a trial's run, or a run without ``best/`` artifacts.
    """
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient
    from torchvision.models import get_model

    check_store(tracking_uri)
    # Fail in seconds when the server goes away mid-way, not after MLflow's minutes of back-off.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client = MlflowClient(tracking_uri)
    found = find_parent_run(client, tracking_uri, run)
    run_id = found.info.run_id
    with tempfile.TemporaryDirectory(prefix="ftsweep-best-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=BEST_DIR, dst_path=tmp, tracking_uri=tracking_uri))
        meta = json.loads((local / "meta.json").read_text())
        state = torch.load(local / "model.pt", map_location="cpu", weights_only=True)
    model = get_model(meta["model"], num_classes=len(meta["classes"]))
    model.load_state_dict(state)
    return BestModel(run_id, found.data.tags.get(TAG_SWEEP, run_id), meta, model.eval())


def check_store(uri: str) -> None:
    """The tracking store must be reachable and, when it is local, already exist: MLflow
    would otherwise create an empty database and report the run as unknown."""
    check_tracking_uri(uri)
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme == "sqlite":
        path = Path(uri.removeprefix("sqlite:///")).expanduser()
    elif parts.scheme in ("", "file"):
        path = Path(parts.path).expanduser()
    else:
        return
    if not path.exists():
        raise UsageError(f"--tracking-uri {uri}: {path} does not exist; "
                         "pass the tracking URI the sweep logged to")


def find_parent_run(client, tracking_uri: str, run: str):
    """The sweep's parent run: ``run`` is its run id or its sweep name (tag ftsweep.sweep)."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.get_run(run)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise UsageError(f"MLflow at {redact(tracking_uri)}: {e.message}") from None
        found = _parent_by_sweep_name(client, tracking_uri, run)
    info, tags = found.info, found.data.tags
    if info.lifecycle_stage == "deleted":
        raise UsageError(f"run {info.run_id} is deleted in {redact(tracking_uri)}")
    if tags.get(TAG_ROLE) == "trial":
        parent = tags.get("mlflow.parentRunId", "?")
        raise UsageError(f"run {info.run_id} is a trial of sweep {tags.get(TAG_SWEEP, '?')}; "
                         f"pass the sweep's run {parent} (or --run {tags.get(TAG_SWEEP, parent)})")
    present = {Path(f.path).name for f in client.list_artifacts(info.run_id, BEST_DIR)}
    missing = [f for f in BEST_FILES if f not in present]
    if missing:
        raise UsageError(f"run {info.run_id} (status {info.status}) has no {BEST_DIR}/"
                         f"{' or '.join(missing)} artifact: it is not a sweep's run, the sweep "
                         "has not finished, or none of its trials produced a result")
    return found


def _parent_by_sweep_name(client, tracking_uri: str, name: str):
    runs = []
    if "'" not in name:  # MLflow's filter strings cannot escape a quote; no sweep is named so
        experiments = _experiment_names(client)
        runs = client.search_runs(
            list(experiments), f"tags.`{TAG_SWEEP}` = '{name}' and tags.`{TAG_ROLE}` = 'parent'",
            max_results=20) if experiments else []
    if not runs:
        raise UsageError(f"no run with id {name!r} and no sweep named {name!r} in "
                         f"{redact(tracking_uri)}")
    if len(runs) > 1:
        listed = ", ".join(f"{r.info.run_id} (experiment {experiments[r.info.experiment_id]})"
                           for r in runs)
        raise UsageError(f"sweep name {name!r} is ambiguous: runs {listed}; pass a run id")
    return runs[0]


def _experiment_names(client) -> dict[str, str]:
    names, token = {}, None
    while True:
        page = client.search_experiments(page_token=token)
        names.update((e.experiment_id, e.name) for e in page)
        token = page.token
        if not token:
            return names


def predict_logits(best: BestModel, images: np.ndarray, batch_size: int,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Float32 logits of decoded uint8 images, computed as the sweep's evaluation does."""
    model = best.model.to(device)
    out = []
    with torch.inference_mode():
        for x, _ in best.batches(images, batch_size):
            out.append(model(x.to(device)).float().cpu())
    return torch.cat(out) if out else torch.empty(0, len(best.classes))



def decode_images(paths: Sequence[str | Path], image_size: int, pool: ThreadPoolExecutor):
    """Decode ``paths`` as the sweep's uint8 cache did, on ``pool``'s threads (PIL releases
    the GIL). Returns the ``(N, H, W, 3)`` images, the paths they came from, and
    ``(path, reason)`` for every file that could not be read, which is left out."""
    def read(path):
        try:
            return decode_for(str(path), image_size)
        # PIL raises OSError, ValueError, SyntaxError or DecompressionBombError depending on
        # the format and the damage; any of them makes one file unreadable, not the run.
        except Exception as e:
            return f"{type(e).__name__}: {e}"

    images, read_paths, unreadable = [], [], []
    for path, out in zip(paths, pool.map(read, paths), strict=True):
        if isinstance(out, str):
            unreadable.append((path, out))
        else:
            images.append(out)
            read_paths.append(path)
    side = decode_size(image_size)
    stacked = np.stack(images) if images else np.empty((0, side, side, 3), np.uint8)
    return stacked, read_paths, unreadable


def add_run_arguments(p) -> None:
    """--tracking-uri and --run, shared by every command that reads a sweep's best model."""
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db", metavar="URI",
                   help="MLflow tracking URI the sweep logged to (default sqlite:///mlflow.db)")
    p.add_argument("--run", required=True, metavar="RUN_ID|SWEEP",
                   help="the sweep's parent MLflow run id (printed by sweeps/run.py, parent_run_id "
                        "in sweep_summary.json) or the sweep's name")
