"""The trainable alone on one GPU: ``python sweeps/gpu_bench.py --out gpu.json``.

No Ray, MLflow, Optuna or scikit-learn: ``run_trial`` runs in this process, and for packing
in several processes at once on the same device, as fractional ``--gpus-per-trial`` trials
would. The data are made here: ``--images`` synthetic training images (and an eighth as
many for validation) in 4 classes, random weights, nothing frozen, at ``--image-size``.
For each model: training images per second with the CUDA defaults (mixed precision,
channels_last, pinned memory) and with all three off, the median over epochs 2 and later
of the trial's own ``img_per_s`` (its training loop; the first epoch warms up). Then
``--pack`` trials of ``--pack-model`` at once against one: every trial waits for the others
after its first epoch, and the later epochs' training images of all of them are divided by
the wall time from that common start to the last one's end (validation included), the
same for the single trial.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from trainables.config import TrialConfig  # noqa: E402
from trainables.data import DataHandle, scan  # noqa: E402
from trainables.train import device_options, run_trial  # noqa: E402

OFF = {"amp": False, "channels_last": False, "pin_memory": False}
CLASSES = 4
PACK_TIMEOUT_S = 900  # a packed trial that neither reports nor exits by then has hung


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sweeps/gpu_bench.py", description=__doc__.split("\n\n")[1])
    p.add_argument("--out", required=True, metavar="FILE.json", help="where the figures go")
    p.add_argument("--models", default="resnet18,resnet50", help="comma-separated (default resnet18,resnet50)")
    p.add_argument("--image-size", type=int, default=224, metavar="N", help="pixels (default 224)")
    p.add_argument("--images", type=int, default=2048, metavar="N", help="training images (default 2048)")
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="default 64")
    p.add_argument("--epochs", type=int, default=4, metavar="N", help="per trial, at least 2 (default 4)")
    p.add_argument("--pack", type=int, default=4, metavar="N", help="trials at once on the device (default 4)")
    p.add_argument("--pack-model", default="resnet18", help="the model of the packed trials (default resnet18)")
    p.add_argument("--device", default="cuda", help="default cuda")
    p.add_argument("--work-dir", metavar="DIR", help="the images and their decoded cache (default: temporary)")
    return p


def make_images(root: Path, train: int, seed: int = 0) -> Path:
    """``root/{train,val}/<class>/*.png``: noise around a colour of each class, 64 px."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (CLASSES, 3))
    for split, n in (("train", train), ("val", max(CLASSES, train // 8))):
        for i in range(n):
            label = i % CLASSES
            pixels = np.clip(colours[label] + rng.normal(0, 40, (64, 64, 3)), 0, 255).astype(np.uint8)
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / f"{i:05d}.png")
    return root


def trial_config(args, model: str, **overrides) -> TrialConfig:
    return TrialConfig(model=model, weights="none", image_size=args.image_size, batch_size=args.batch_size,
                       max_epochs=args.epochs, lr=0.01, frozen_depth=0, **overrides)


def one_trial(cfg: TrialConfig, handle: DataHandle, device: str, threads: int, sync=None) -> dict:
    """Run one trial; its throughput, and the device memory it peaked at. With ``sync`` (a
    barrier) it waits for the other trials before its first epoch and after it."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    epochs: list[dict] = []
    ends: list[float] = []

    def report(metrics, _):
        epochs.append(metrics)
        if sync is not None and len(epochs) == 1:
            sync.wait()  # the steady epochs of every packed trial start together
        ends.append(time.time())

    if sync is not None:
        sync.wait()
    run_trial(cfg, handle, report, threads=threads, device=device)
    opts = device_options(cfg, dev)
    gib = 2.0 ** 30
    return {"img_per_s": statistics.median(m["img_per_s"] for m in epochs[1:]),
            "epoch_img_per_s": [m["img_per_s"] for m in epochs],
            "steady_start": ends[0], "steady_end": ends[-1],
            "steady_images": len(handle.dataset.train) * (len(epochs) - 1),
            "peak_allocated_gib": torch.cuda.max_memory_allocated(dev) / gib if dev.type == "cuda" else None,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(dev) / gib if dev.type == "cuda" else None,
            "amp_dtype": str(opts.amp_dtype).removeprefix("torch.") if opts.amp_dtype else None,
            "channels_last": opts.channels_last, "pin_memory": opts.pin_memory}


def wall_img_per_s(trials: list[dict]) -> float:
    """Training images of the steady epochs of all ``trials`` over their common wall time."""
    span = max(t["steady_end"] for t in trials) - min(t["steady_start"] for t in trials)
    return sum(t["steady_images"] for t in trials) / span


def _packed_worker(cfg, handle, device, threads, sync, results) -> None:
    try:
        results.put(one_trial(cfg, handle, device, threads, sync))
    except BaseException:
        sync.abort()  # the others stop waiting for this one
        results.put({"error": traceback.format_exc()})


def packed(cfg: TrialConfig, handle: DataHandle, device: str, n: int) -> list[dict]:
    """``n`` trials at once, each in its own process (CUDA needs spawned ones)."""
    ctx = mp.get_context("spawn")
    sync, results = ctx.Barrier(n, timeout=PACK_TIMEOUT_S), ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // n)
    procs = [ctx.Process(target=_packed_worker, args=(cfg, handle, device, threads, sync, results))
             for _ in range(n)]
    for p in procs:
        p.start()
    out: list[dict] = []
    deadline = time.monotonic() + PACK_TIMEOUT_S
    try:
        while len(out) < n:
            try:
                out.append(results.get(timeout=5))
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"packed trials exited with {dead} or hung") from None
        errors = [r["error"] for r in out if "error" in r]
        if errors:
            raise RuntimeError(f"{len(errors)} of {n} packed trials failed; the first:\n{errors[0]}")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return out


def measure(args, handle: DataHandle) -> dict:
    threads = os.cpu_count() or 1
    models = {}
    for model in args.models.split(","):
        on = one_trial(trial_config(args, model), handle, args.device, threads)
        off = one_trial(trial_config(args, model, **OFF), handle, args.device, threads)
        models[model] = {"defaults": on, "all_off": off, "speedup": on["img_per_s"] / off["img_per_s"]}
    cfg = trial_config(args, args.pack_model)
    one = wall_img_per_s([one_trial(cfg, handle, args.device, threads)])
    many = packed(cfg, handle, args.device, args.pack)
    total = wall_img_per_s(many)
    return {"models": models,
            "packing": {"model": args.pack_model, "trials": args.pack, "one_img_per_s": one,
                        "packed_img_per_s": total, "speedup": total / one, "per_trial": many}}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.epochs < 2 or args.pack < 1 or args.images < CLASSES:
        print(f"error: --epochs must be >= 2 (the first warms up), --pack >= 1, --images >= {CLASSES}",
              file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device}: torch {torch.__version__} sees no CUDA device", file=sys.stderr)
        return 2
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="ftsweep-gpu-bench-"))
    images = work / "images"
    if not (images / "train").is_dir():
        make_images(images, args.images)
    handle = DataHandle(scan(images), args.image_size, str(work / "cache"))
    handle.ensure()
    started = time.time()
    figures = measure(args, handle)
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    report = {**figures, "device": device, "torch": torch.__version__, "train_images": len(handle.dataset.train),
              "settings": {k: v for k, v in vars(args).items() if k != "out"}, "wall_s": time.time() - started}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for model, m in figures["models"].items():
        print(f"{model:>12} {args.image_size}px  defaults {m['defaults']['img_per_s']:8.1f} img/s  "
              f"all off {m['all_off']['img_per_s']:8.1f}  x{m['speedup']:.2f}")
    p = figures["packing"]
    print(f"{p['model']:>12} {p['trials']} packed {p['packed_img_per_s']:8.1f} img/s  one "
          f"{p['one_img_per_s']:8.1f}  x{p['speedup']:.2f}  ({device})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
