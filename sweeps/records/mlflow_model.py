"""A sweep's best model as an MLflow Model: a pyfunc that classifies image files.

``mlflow.pyfunc.load_model("runs:/<parent run>/model")`` (or ``models:/NAME@champion``, or
``mlflow models serve``) takes a pandas DataFrame with one column, ``image``: each cell the
bytes of an image file (PNG, JPEG, ... whatever PIL reads), or, when the model is loaded in
Python, a path to one. Over HTTP the bytes travel base64-encoded (the column is typed
``binary``, so MLflow's scoring server decodes them). The answer is a DataFrame with one row
per image: ``prediction`` (the class name), ``probability`` (its softmax probability) and
``probabilities`` (every class name with its probability).

The model decodes and normalises each image with the very code the sweep validated with
(``trainables.data.decode_for``, then ``Batches``' centre crop and normalisation), so it
predicts what ``sweeps/tools/predict.py`` predicts and what the sweep scored. This module and
every project module it imports (``SHIPPED``) travel inside the model (``code/``), so it loads
on a host without the project.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from torch import nn

from sweeps.records.format import ARTIFACT_PATH  # noqa: F401 - runs:/<parent run id>/model
from trainables.data import decode_for
from trainables.pipeline import Batches, decode_size

COLUMN = "image"
# What the model's code/ folder holds: this module and what it imports of the project.
SHIPPED = ("sweeps/__init__.py", "sweeps/records/__init__.py", "sweeps/records/format.py",
           "sweeps/records/mlflow_model.py", "trainables/__init__.py", "trainables/data.py",
           "trainables/geometry.py", "trainables/node_cache.py", "trainables/pipeline.py", "trainables/splits.py")
ROOT = Path(__file__).resolve().parents[2]


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """The pyfunc: a torchvision classifier with the sweep's validation preprocessing."""

    def load_context(self, context) -> None:
        self.meta = json.loads(Path(context.artifacts["meta"]).read_text())
        state = torch.load(context.artifacts["state_dict"], map_location="cpu", weights_only=True)
        self.model = build(self.meta, state)

    # A DataFrame hint is one MLflow takes no schema from: the declared signature (``signature()``)
    # stays in charge, so the scoring server accepts dataframe_split and decodes the base64 bytes.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame) or COLUMN not in model_input.columns:
            raise MlflowException.invalid_parameter_value(
                f"expected a DataFrame with a column {COLUMN!r} of image bytes or file paths")
        images = np.stack([decode_cell(cell, i, int(self.meta["image_size"]))
                           for i, cell in enumerate(model_input[COLUMN])]) if len(model_input) else None
        classes = list(self.meta["classes"])
        if images is None:
            return pd.DataFrame({"prediction": [], "probability": [], "probabilities": []})
        probs = probabilities(self.model, self.meta, images, val_batch_size(self.meta))
        best = probs.argmax(1)
        return pd.DataFrame({
            "prediction": [classes[i] for i in best.tolist()],
            "probability": probs.max(1).values.double().numpy(),
            "probabilities": [dict(zip(classes, row, strict=True)) for row in probs.double().tolist()]})


def build(meta: dict, state: dict) -> nn.Module:
    """The torchvision model ``meta`` names, with ``state`` loaded, in eval mode on the CPU."""
    from torchvision.models import get_model

    model = get_model(meta["model"], num_classes=len(meta["classes"]))
    model.load_state_dict(state)
    return model.eval()


def val_batch_size(meta: dict) -> int:
    """The batch size the sweep evaluated with (twice the training batch size)."""
    return int(meta["config"]["batch_size"]) * 2


def decode_cell(cell, row: int, image_size: int) -> np.ndarray:
    """One ``image`` cell (bytes, or a path when called in Python) decoded as the sweep's cache
    was; anything else, or an unreadable image, is the caller's error naming the row."""
    if isinstance(cell, bytes | bytearray | memoryview):
        source, what = io.BytesIO(bytes(cell)), f"{len(cell)} bytes"
    elif isinstance(cell, str | os.PathLike):
        source, what = str(cell), f"file {cell}"
    else:
        raise MlflowException.invalid_parameter_value(
            f"row {row}: {COLUMN} must be image bytes (base64 in JSON) or a file path, got {type(cell).__name__}")
    try:
        return decode_for(source, image_size)
    # PIL raises OSError, ValueError, SyntaxError or DecompressionBombError depending on the
    # format and the damage: each means this row is not an image the model can read.
    except Exception as e:
        raise MlflowException.invalid_parameter_value(
            f"row {row}: {what} is not a readable image ({type(e).__name__}: {e})") from None


def probabilities(model: nn.Module, meta: dict, images: np.ndarray, batch_size: int,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Float32 softmax probabilities of decoded ``(N, D, D, 3)`` uint8 images, computed as the
    sweep's evaluation does: its ``Batches`` crop the centre ``image_size`` square and
    normalise with the sweep's mean and std."""
    model, out = model.to(device), []
    with torch.inference_mode():
        for x, _ in val_batches(meta, images, batch_size, device):
            out.append(torch.softmax(model(x).float(), dim=1).cpu())
    return torch.cat(out) if out else torch.empty(0, len(meta["classes"]))


def val_batches(meta: dict, images: np.ndarray, batch_size: int, device: torch.device | str = "cpu") -> Batches:
    """Normalised float batches of the centre ``image_size`` crop of decoded ``(N, D, D, 3)``
    uint8 images, made by the same class as the sweep's val batches (labels: unused zeros)."""
    return Batches(images, np.zeros(len(images), np.int64), batch_size, mean=meta["mean"], std=meta["std"],
                   shuffle=False, crop=int(meta["image_size"]), device=device)


def example_image(image_size: int) -> bytes:
    """A PNG to show the input form: a grey square of the size the model decodes to."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (decode_size(image_size),) * 2, (128, 128, 128)).save(buf, format="PNG")
    return buf.getvalue()


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, DataType, Map, Schema

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.binary, COLUMN)]),
        outputs=Schema([ColSpec(DataType.string, "prediction"), ColSpec(DataType.double, "probability"),
                        ColSpec(Map(DataType.double), "probabilities")]))


def requirements() -> list[str]:
    """What ``pip install`` needs to load and serve the model: the versions it was saved with."""
    from importlib.metadata import version

    pins = [f"{name}=={version(name).split('+')[0]}" for name in ("mlflow", "torch", "torchvision")]
    return [*pins, *(f"{name}>={version(name).split('+')[0]}" for name in ("numpy", "pandas", "pillow"))]


def save(best_dir: Path, out: Path) -> Path:
    """Write the MLflow Model of the checkpoint in ``best_dir`` (``model.pt``, ``meta.json``)
    to the folder ``out``, replacing what is there by renames (``storage.replace_dir``)."""
    meta = json.loads((best_dir / "meta.json").read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".mlflow-model-") as tmp:
        code = Path(tmp) / "code"
        for name in SHIPPED:
            (code / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, code / name)
        saved = Path(tmp) / "model"
        mlflow.pyfunc.save_model(
            saved, python_model=ImageClassifier(),
            artifacts={"state_dict": str(best_dir / "model.pt"), "meta": str(best_dir / "meta.json")},
            code_paths=[str(code / p) for p in sorted({n.split('/')[0] for n in SHIPPED})], signature=signature(),
            input_example=pd.DataFrame({COLUMN: [example_image(int(meta["image_size"]))]}),
            pip_requirements=requirements(),
            metadata={"classes": list(meta["classes"]), "image_size": int(meta["image_size"]),
                      "model": meta["model"], "val_acc": meta["val_acc"], "mean": meta["mean"],
                      "std": meta["std"], "decode_size": decode_size(int(meta["image_size"]))})
        from sweeps.results.storage import replace_dir  # at save time only: the served model ships without it

        replace_dir(saved, out)
    return out


def load(local_path: str | Path) -> ImageClassifier:
    """The pyfunc saved at ``local_path``, unwrapped: ``.model`` and ``.meta``."""
    return mlflow.pyfunc.load_model(str(local_path)).unwrap_python_model()
