"""What a sweep's results depend on, recorded on its parent run and compared on ``--resume``;
and its data as an MLflow dataset input."""

from __future__ import annotations

import json

from sweeps.records.format import TAG_INPUTS


def sweep_inputs(space, fingerprint: str, split_seed: int, val_fraction: float) -> dict[str, str]:
    """Everything a sweep's results depend on, as text: the space and its searched ranges,
    every fixed trial setting (model, weights, image size, max_epochs, --set values, the
    trials' seed), the dataset's content and how it was split. Recorded on the parent run
    (TAG_INPUTS); ``--resume`` compares it with the resumed command's."""
    inputs = {"space": space.name, "dataset_fingerprint": fingerprint,
              "split_seed": str(split_seed), "val_fraction": str(val_fraction)}
    inputs.update({k: str(v) for k, v in space.config().to_dict().items() if k not in space.search})
    inputs.update({f"search.{k}": f"{p.type}{p.bounds()}" for k, p in space.search.items()})
    return inputs


def dataset_input(plan) -> dict:
    """The sweep's data as an MLflow dataset input (a ``"inputs"`` write): named after the
    data, its source the data folder, its digest the dataset fingerprint, its profile the
    train/val counts. Logged on the parent and every trial run, it fills the UI's Dataset
    column and its dataset filter."""
    data = plan.data.dataset
    profile = {"train_images": len(data.train), "val_images": len(data.val), "classes": len(data.classes),
               "image_size": plan.data.image_size}
    # MLflow's LocalArtifactDatasetSource, as its to_json() writes it (resolving a folder to it
    # warns that two source classes claim local paths)
    return {"dataset": {"name": plan.dataset_label, "digest": data.fingerprint, "source_type": "local",
                        "source": json.dumps({"uri": str(data.root)}), "profile": json.dumps(profile)},
            "tags": {"mlflow.data.context": "training"}}


def recorded_inputs(parent) -> dict[str, str] | None:
    """What a parent run recorded with ``sweep_inputs``; None for a sweep from before."""
    text = parent.data.tags.get(TAG_INPUTS)
    return json.loads(text) or None if text else None


def input_changes(was: dict[str, str], now: dict[str, str]) -> list[str]:
    """Each input that differs, as ``key: was → now``."""
    return [f"{k}: {was.get(k, '(not set)')} → {now.get(k, '(not set)')}"
            for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
