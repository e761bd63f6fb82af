"""Export a sweep's best model for serving:
``python sweeps/tools/export.py --run RUN_ID_OR_SWEEP_OR_MODEL_URI --format torchscript|onnx --out FILE``.

The model is loaded through MLflow: the sweep's MLflow Model (``runs:/<parent run>/model``)
or a registered version (``models:/NAME@champion``, ``models:/NAME/VERSION``).

The exported model takes what the sweep's model took: float32 ``(N, 3, S, S)`` images,
decoded and normalised as ``best/meta.json`` says, and returns class logits. That meta
(model, classes, image_size, mean, std, val_acc, run) travels inside the file: as the
TorchScript extra file ``meta.json``, or as the ONNX metadata entry ``ftsweep.meta``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sweeps.errors import UsageError  # noqa: E402
from sweeps.records.best_model import add_run_arguments  # noqa: E402

FORMATS = ("torchscript", "onnx")
META_KEY = "ftsweep.meta"
EPILOG = """The model's input is float32 (N, 3, S, S), as the sweep validated: the image's short
side resized to round(S / 0.875) (bilinear), its centre S x S crop, normalised with the
embedded mean and std (on a 0-1 pixel scale); the embedded "preprocessing" says the same.
Its output is one logit per class, in the order of the embedded classes.

examples:
  python sweeps/tools/export.py --run smoke-20260101-120000 --out best.pt
  python sweeps/tools/export.py --tracking-uri http://mlflow:5000 --run 3f2c... --format onnx --out best.onnx
  python sweeps/tools/export.py --run models:/digits@champion --out champion.onnx

ONNX export needs the onnx package: pip install -e ".[onnx]"
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sweeps/tools/export.py", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export the best model of a sweep (the MLflow Model of its parent run, or a "
                    "registered version of it) as TorchScript or ONNX, with its classes and "
                    "preprocessing embedded.")
    add_run_arguments(p)
    p.add_argument("--format", choices=FORMATS,
                   help="torchscript (torch.jit.load, LibTorch) or onnx (ONNX Runtime, TensorRT, ...); "
                        "default: onnx when --out ends in .onnx, else torchscript")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="file to write; its folder is created if needed")
    return p


def export_torchscript(model, meta: dict, out: Path) -> None:
    import torch

    # TorchScript is deprecated in favour of torch.export, but it is what LibTorch and
    # many serving stacks load; the warning would only confuse the person exporting.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(model)
        torch.jit.save(scripted, str(out), _extra_files={"meta.json": json.dumps(meta)})


ONNX_MISSING = 'ONNX export needs the onnx package, which is not installed: pip install -e ".[onnx]"'


def check_onnx() -> None:
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise UsageError(ONNX_MISSING) from None


def export_onnx(model, example, meta: dict, out: Path) -> str:
    """Write the ONNX file, embed the meta and run the checker. Returns a note on what was checked."""
    import onnx
    import torch

    # dynamo=False: the torch.export-based exporter needs onnxscript, which torch does not
    # install; the TorchScript-based one is built in and handles torchvision classifiers.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (example,), str(out), dynamo=False,
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    proto = onnx.load(str(out))
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(out))
    return f"passed onnx.checker (onnx {onnx.__version__})"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out).expanduser()
    fmt = args.format or ("onnx" if out.suffix.lower() == ".onnx" else "torchscript")
    try:
        if out.is_dir():
            raise UsageError(f"--out {args.out} is a folder; name a file")
        if fmt == "onnx":
            check_onnx()
        from sweeps.records.best_model import load_best

        best = load_best(args.tracking_uri, args.run)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import torch

    from trainables.data import decode_size

    meta = {**best.meta, "run_id": best.run_id, "sweep": best.sweep, "model_uri": best.uri,
            "preprocessing": {"resize_short_side": decode_size(best.image_size), "interpolation": "bilinear",
                              "center_crop": best.image_size, "mean": best.meta["mean"], "std": best.meta["std"]}}
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written next to the target and renamed: a reader never sees half a model.
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        note = ""
        if fmt == "torchscript":
            export_torchscript(best.model, meta, tmp)
        else:
            example = torch.zeros(1, 3, best.image_size, best.image_size)
            note = export_onnx(best.model, example, meta, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"Exported {best.describe()} as {fmt}" + (f"; {note}" if note else ""))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
