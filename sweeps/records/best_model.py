"""The best model of a sweep: logged at the sweep's end as an MLflow Model, loaded back for
``sweeps/tools/predict.py`` and ``sweeps/tools/export.py``.

The sweep's parent run keeps it twice: ``best/model.pt`` (a plain torchvision state_dict)
with ``best/meta.json``, and the same weights as the MLflow Model ``model/`` (the pyfunc of
``sweeps/records/mlflow_model.py``, which preprocesses images as the sweep validated them). Readers
load the MLflow Model: by the sweep's parent run id or name (``runs:/<run>/model``), or by a
registry URI (``models:/NAME@champion``, ``models:/NAME/3``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import urllib.parse
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sweeps.errors import UsageError
from sweeps.plan.uris import check_tracking_uri, redact
from sweeps.records import format
from sweeps.records.format import ARTIFACT_PATH as MODEL_DIR
from sweeps.records.format import BEST_DIR, BEST_FILES, TAG_ROLE, TAG_SWEEP
from trainables.data import decode_for, decode_size

if TYPE_CHECKING:
    from torch import nn



@dataclass(frozen=True)
class BestModel:
    run_id: str
    sweep: str
    meta: dict  # best/meta.json: model, classes, image_size, mean, std, config, val_acc, epoch
    model: nn.Module  # in eval mode, on the CPU
    uri: str = ""  # the MLflow Model it was loaded from: runs:/<run>/model or models:/...

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

    def batches(self, images: np.ndarray, batch_size: int):
        """The batches the MLflow Model's pyfunc feeds its model (``mlflow_model.val_batches``)."""
        from sweeps.records.mlflow_model import val_batches

        return val_batches(self.meta, images, batch_size)

    def describe(self) -> str:
        return (f"{self.meta['model']} from sweep {self.sweep} ({self.uri}, "
                f"val_acc {self.meta['val_acc']:.4f} at epoch {self.meta.get('epoch', '?')})")


def log_model(tracker, best_dir: Path, out: Path) -> bool:
    """Save the MLflow Model of the checkpoint in ``best_dir`` to ``out`` and queue its upload to
    the sweep's parent run as ``model/``. A model that cannot be saved is reported, not fatal:
    ``best/`` is logged either way. Returns whether it was queued."""
    from sweeps.records import mlflow_model

    try:
        # MLflow suggests type hints and models-from-code; the pyfunc declares its signature.
        with warnings.catch_warnings(), _quiet("mlflow.pyfunc", "mlflow.models"):
            warnings.simplefilter("ignore", UserWarning)
            mlflow_model.save(best_dir, out)
    except Exception as e:  # any failure of MLflow or the model: the checkpoint stays what counts
        print(f"WARNING: the best model could not be saved as an MLflow Model ({type(e).__name__}: {e}); "
              f"{BEST_DIR}/ is logged without it")
        return False
    tracker.write("artifacts", "parent", local_dir=str(out), artifact_path=mlflow_model.ARTIFACT_PATH)
    print(f"Best model logged as an MLflow Model: runs:/{tracker.parent_id}/{mlflow_model.ARTIFACT_PATH}")
    return True


class _quiet:
    """Raise the given loggers to ERROR for a while: saving logs notes meant for MLflow's own
    users (INFO lines, a warning that cloudpickle runs code when loading, which any pickled
    PythonModel does)."""

    def __init__(self, *names: str):
        self.loggers = [logging.getLogger(n) for n in names]

    def __enter__(self):
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(logging.ERROR)
        # and no progress bars while it checks the input example
        self.bar = os.environ.get(BAR)
        os.environ[BAR] = "false"

    def __exit__(self, *exc):
        for lg, level in zip(self.loggers, self.levels, strict=True):
            lg.setLevel(level)
        if self.bar is None:
            os.environ.pop(BAR, None)
        else:
            os.environ[BAR] = self.bar


BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


def load_best(tracking_uri: str, run: str) -> BestModel:
    """The best model of the sweep whose parent run id or sweep name is ``run``, or of the
    registered model version ``run`` names (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``),
    loaded through MLflow.

    Raises UsageError, naming what is wrong, for an unreachable tracking store, an unknown
    run, sweep or model version, a trial's run, or a run without the MLflow Model.
    """
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from sweeps.records import mlflow_model

    check_store(tracking_uri)
    # Fail in seconds when the server goes away mid-way, not after MLflow's minutes of back-off.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    if run.startswith("models:/"):
        from sweeps.records.format import TAG_VERSION_SWEEP
        from sweeps.records.registry import model_version

        version = model_version(client, tracking_uri, run)
        run_id, uri = version.run_id, run
        sweep = version.tags.get(TAG_VERSION_SWEEP) or run
        # Where the version's files are, resolved by this client: MLflow's models:/ download
        # would ask the default registry (./mlflow.db), not --tracking-uri's.
        source = client.get_model_version_download_uri(version.name, version.version)
    else:
        found = find_parent_run(client, tracking_uri, run)
        run_id, uri = found.info.run_id, f"runs:/{found.info.run_id}/{MODEL_DIR}"
        source = uri
        sweep = found.data.tags.get(TAG_SWEEP, run_id)
        if not _has(client, run_id, MODEL_DIR, "MLmodel"):  # a sweep whose MLflow Model was not logged
            return _from_best_files(client, run_id, sweep)
    with tempfile.TemporaryDirectory(prefix="ftsweep-best-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=tracking_uri,
                                                        registry_uri=tracking_uri)
            classifier = mlflow_model.load(local)
        except MlflowException as e:
            raise UsageError(f"{uri}: cannot load it as an MLflow Model ({e.message})") from None
    if not isinstance(classifier, mlflow_model.ImageClassifier):
        raise UsageError(f"{uri} is not a sweep's model (its pyfunc is a {type(classifier).__name__})")
    return BestModel(run_id, sweep, classifier.meta, classifier.model, uri)


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
    """The sweep's parent run, which holds its best model: ``run`` is its run id or its sweep
    name (``format.find_parent_run``: by name, the newest). Any other run is named and refused."""
    from mlflow.exceptions import MlflowException

    try:
        found = format.find_parent_run(client, run)
        if found is None and format.RUN_ID.fullmatch(run):
            found = client.get_run(run)  # a trial's run, or not a sweep's at all: said below
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise UsageError(f"MLflow at {redact(tracking_uri)}: {e.message}") from None
        found = None
    if found is None:
        raise UsageError(f"no run with id {run!r} and no sweep named {run!r} in {redact(tracking_uri)}")
    info, tags = found.info, found.data.tags
    if info.lifecycle_stage == "deleted":
        raise UsageError(f"run {info.run_id} is deleted in {redact(tracking_uri)}")
    if tags.get(TAG_ROLE) == "trial":
        parent = tags.get("mlflow.parentRunId", "?")
        raise UsageError(f"run {info.run_id} is a trial of sweep {tags.get(TAG_SWEEP, '?')}; "
                         f"pass the sweep's run {parent} (or --run {tags.get(TAG_SWEEP, parent)})")
    if not (_has(client, info.run_id, MODEL_DIR, "MLmodel")
            or _has(client, info.run_id, BEST_DIR, *BEST_FILES)):
        raise UsageError(f"run {info.run_id} (status {info.status}) has no {MODEL_DIR}/ artifact (the "
                         "MLflow Model of the best trial): it is not a sweep's run, the sweep has not "
                         "finished, or none of its trials produced a result")
    return found


def _has(client, run_id: str, folder: str, *names: str) -> bool:
    present = {Path(f.path).name for f in client.list_artifacts(run_id, folder)}
    return set(names) <= present


def _from_best_files(client, run_id: str, sweep: str) -> BestModel:
    """The best model from the plain ``best/`` files (state_dict and meta.json), for a sweep
    whose MLflow Model is missing: saving it failed, or the sweep predates it."""
    import torch

    from sweeps.records import mlflow_model

    with tempfile.TemporaryDirectory(prefix="ftsweep-best-") as tmp:
        local = Path(client.download_artifacts(run_id, BEST_DIR, tmp))
        meta = json.loads((local / "meta.json").read_text())
        state = torch.load(local / "model.pt", map_location="cpu", weights_only=True)
    return BestModel(run_id, sweep, meta, mlflow_model.build(meta, state), f"runs:/{run_id}/{BEST_DIR}")


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
    p.add_argument("--run", required=True, metavar="RUN_ID|SWEEP|MODEL_URI",
                   help="the sweep's parent MLflow run id (printed by sweeps/run.py, parent_run_id "
                        "in sweep_summary.json), the sweep's name, or a registered model version: "
                        "models:/NAME@champion, models:/NAME/VERSION")
