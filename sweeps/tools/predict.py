"""Classify a folder of images with a sweep's best model:
``python sweeps/tools/predict.py --run RUN_ID_OR_SWEEP_OR_MODEL_URI --images DIR --out preds.csv``.

The model is the sweep's MLflow Model (``runs:/<parent run>/model``, or a registered version
such as ``models:/NAME@champion``). Images are decoded and normalised by the code the sweep
evaluated with, the code its pyfunc runs, so the model sees exactly what it saw during
validation and predicts what ``mlflow.pyfunc.load_model(...).predict`` does. Unreadable
files are listed on stderr and left out; the command fails only when nothing could be read.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sweeps.errors import UsageError  # noqa: E402
from sweeps.records.best_model import add_run_arguments  # noqa: E402
from trainables.data import IMAGE_EXTENSIONS, is_hidden, shown  # noqa: E402

EPILOG = """CSV columns: path, prediction (class name), probability (its softmax probability),
then top2, top2_prob, ... up to --top-k. Rows are in path order.

examples:
  python sweeps/tools/predict.py --run smoke-20260101-120000 --images ~/new_photos --out preds.csv
  python sweeps/tools/predict.py --tracking-uri http://mlflow:5000 --run 3f2c... --images DIR --out - --top-k 1
  python sweeps/tools/predict.py --run models:/digits@champion --images ~/new_photos --out preds.csv
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sweeps/tools/predict.py", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Classify every image under a folder with the best model of a sweep, "
                    "preprocessed exactly as the sweep evaluated it; write one CSV row per image.")
    add_run_arguments(p)
    p.add_argument("--images", required=True, metavar="DIR",
                   help=f"folder searched recursively for images ({' '.join(IMAGE_EXTENSIONS)}); "
                        "hidden files and folders are ignored")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="CSV file to write; - writes it to stdout")
    p.add_argument("--top-k", type=int, default=3, metavar="K",
                   help="also list the K most probable classes (capped at the class count; default 3)")
    p.add_argument("--batch-size", type=int, metavar="N",
                   help="images per forward pass (default: the sweep's val batch size)")
    p.add_argument("--device", default="cpu", metavar="DEVICE",
                   help="torch device, e.g. cpu or cuda (default cpu; always float32)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="N",
                   help="threads decoding images (default: every CPU)")
    return p


def find_images(root: Path) -> tuple[list[Path], list[Path]]:
    """Image files under ``root`` and, apart, the other files; hidden ones are neither."""
    images, others = [], []
    for p in sorted(root.rglob("*")):
        if any(is_hidden(Path(part)) for part in p.relative_to(root).parts) or p.is_dir():
            continue
        (images if p.suffix.lower() in IMAGE_EXTENSIONS else others).append(p)
    return images, others


def header(top_k: int) -> list[str]:
    return ["path", "prediction", "probability",
            *[c for k in range(2, top_k + 1) for c in (f"top{k}", f"top{k}_prob")]]


def classify(best, paths: list[Path], top_k: int, batch_size: int, device: str, workers: int):
    """CSV rows for the readable images, and ``(path, reason)`` for the others.

    Decodes one batch at a time, so memory does not grow with the folder."""
    from sweeps.records.best_model import decode_images
    from sweeps.records.mlflow_model import probabilities

    rows, unreadable = [], []
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(paths), batch_size):
            images, read, bad = decode_images(paths[start:start + batch_size], best.image_size, pool)
            unreadable += bad
            if not read:
                continue
            probs = probabilities(best.model, best.meta, images, batch_size, device)
            top_p, top_i = probs.topk(top_k, dim=1)
            for path, ps, idx in zip(read, top_p.tolist(), top_i.tolist(), strict=True):
                ranked = [(best.classes[i], f"{q:.6f}") for i, q in zip(idx, ps, strict=True)]
                rows.append([shown(str(path)), *[v for pair in ranked for v in pair]])  # UTF-8, \x escapes
    return rows, unreadable


def write_csv(out: str, top_k: int, rows: list) -> None:
    f = sys.stdout if out == "-" else open(out, "w", newline="")
    try:
        writer = csv.writer(f)
        writer.writerow(header(top_k))
        writer.writerows(rows)
    finally:
        if f is not sys.stdout:
            f.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.top_k < 1:
            raise UsageError(f"--top-k must be >= 1, got {args.top_k}")
        if args.batch_size is not None and args.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
        root = Path(args.images).expanduser()
        if not root.is_dir():
            raise UsageError(f"--images {args.images}: no such folder")
        if args.out != "-" and not Path(args.out).expanduser().resolve().parent.is_dir():
            raise UsageError(f"--out {args.out}: its folder does not exist")
        paths, others = find_images(root)
        if not paths:
            raise UsageError(f"--images {args.images}: no image files under it "
                             f"(looked for {' '.join(IMAGE_EXTENSIONS)}; found {len(others)} other files)")
        from sweeps.records.best_model import load_best

        best = load_best(args.tracking_uri, args.run)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    top_k = min(args.top_k, len(best.classes))
    print(f"Classifying {len(paths)} images with {best.describe()}", file=sys.stderr)
    if others:
        print(f"Ignoring {len(others)} files without an image extension under {root}", file=sys.stderr)
    rows, unreadable = classify(best, paths, top_k, args.batch_size or best.val_batch_size,
                                args.device, max(1, args.workers))
    for path, reason in unreadable:
        print(f"unreadable: {shown(str(path))}: {reason}", file=sys.stderr)
    if not rows:
        print(f"error: none of the {len(paths)} images under {root} could be read", file=sys.stderr)
        return 1
    write_csv(args.out, top_k, rows)
    skipped = f"; {len(unreadable)} unreadable images left out (listed above)" if unreadable else ""
    print(f"Wrote {len(rows)} predictions to {'stdout' if args.out == '-' else args.out}{skipped}",
          file=sys.stderr)
    if args.out != "-":
        print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
