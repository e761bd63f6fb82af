"""The trainable alone on one GPU: ``python benchmarks/gpu_bench.py --out gpu.json``.

No Ray, MLflow, Optuna or scikit-learn: ``run_trial`` runs in this process, and for packing
in several processes at once on the same device, as fractional ``--gpus-per-trial`` trials
would. The data are made here: ``--images`` synthetic 500x375 JPEG training images (and an
eighth as many for validation) in 4 classes, decoded once into the cache, random weights,
nothing frozen, at ``--image-size``.
For each model: training images per second with the CUDA defaults (mixed precision,
channels_last, pinned memory) and with all three off, the median over epochs 2 and later
of the trial's own ``img_per_s`` (its training loop; the first epoch warms up). Then
``--pack`` trials of ``--pack-model`` at once against one: every trial waits for the others
after its first epoch, and the later epochs' training images of all of them are divided by
the wall time from that common start to the last one's end (validation included), the
same for the single trial. Last, the feed: each model trained by the trial's own step fed
by the real pipeline (``Batches``: the host gathers uint8 batches from the cache in a
background thread, the device crops, flips and normalises them) against the same step fed
same-shape random tensors already on the device; ``feed_efficiency`` = fed / random.
"""

from __future__ import annotations

import argparse
import contextlib
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
from trainables.pipeline import Batches  # noqa: E402
from trainables.train import device_options, run_trial  # noqa: E402

OFF = {"amp": False, "channels_last": False, "pin_memory": False}
CLASSES = 4
PACK_TIMEOUT_S = 900  # a packed trial that neither reports nor exits by then has hung


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/gpu_bench.py", description=__doc__.split("\n\n")[1])
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


def make_images(root: Path, train: int, seed: int = 0, size: tuple[int, int] = (500, 375)) -> Path:
    """``root/{train,val}/<class>/*.jpg``: smooth random fields around a colour of each class
    with fine noise, ``size`` px, JPEG quality 90 (decoded like photos of that size)."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (CLASSES, 3))
    for split, n in (("train", train), ("val", max(CLASSES, train // 8))):
        for i in range(n):
            label = i % CLASSES
            coarse = Image.fromarray(np.clip(colours[label] + rng.normal(0, 50, (12, 16, 3)), 0, 255)
                                     .astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
            pixels = np.asarray(coarse, np.float32) + rng.normal(0, 8, (size[1], size[0], 3))
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
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
        # a trial that failed aborts the barrier the others wait at: its own error comes first
        errors = sorted((r["error"] for r in out if "error" in r), key=lambda e: "BrokenBarrierError" in e)
        if errors:
            raise RuntimeError(f"{len(errors)} of {n} packed trials failed; the first:\n{errors[0]}")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return out


def feed(args, handle: DataHandle, model_name: str) -> dict:
    """Training images per second of one model's step fed by the real pipeline (augmented:
    RandomResizedCrop + flip on the device) and fed random tensors of the same shape that
    are already on the device; alternating epochs after one warm-up each, medians."""
    from trainables.models import build_model, stages
    from trainables.train import Step, lr_schedule, make_optimizer

    dev = torch.device(args.device)
    cfg = trial_config(args, model_name, augment_strength=1.0)
    options = device_options(cfg, dev)
    torch.manual_seed(0)
    model = build_model(model_name, len(handle.classes), "none").to(dev)
    if options.channels_last:
        model.to(memory_format=torch.channels_last)
    x, y = handle.arrays("train")
    fed = Batches(x, y, cfg.batch_size, mean=handle.mean, std=handle.std, shuffle=True, augment_strength=1.0,
                  generator=torch.Generator().manual_seed(0), crop=cfg.image_size, device=dev,
                  pin_memory=options.pin_memory, dtype=options.amp_dtype, channels_last=options.channels_last)
    shapes = [len(b) for b in np.array_split(np.arange(len(y)), len(fed))]
    layout = torch.channels_last if options.channels_last else torch.contiguous_format
    pool = [torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, device=dev,
                        dtype=options.amp_dtype or torch.float32).contiguous(memory_format=layout)
            for _ in range(2)]
    labels = torch.randint(0, len(handle.classes), (cfg.batch_size,), device=dev)
    random = [(pool[i % 2][:n], labels[:n]) for i, n in enumerate(shapes)]
    optimizer = make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    step = Step(model, stages(model, model_name), cfg, optimizer,
                lr_schedule(cfg, optimizer, len(fed)), dev, 0, options)
    model.train()
    rates: dict[str, list[float]] = {"fed": [], "random": []}
    syncs: list[int] = []  # per fed epoch on a GPU: the waits for the device (the loss read at its end is one)
    for epoch in range(args.epochs):
        for kind, batches in (("random", random), ("fed", fed)):
            started = time.perf_counter()
            with synchronisations(dev if kind == "fed" else None) as seen_syncs:
                _, seen = step.train_epoch(batches)  # reads the loss once: the device has finished
            if epoch:  # the first epoch of each warms up
                rates[kind].append(seen / (time.perf_counter() - started))
                if kind == "fed" and dev.type == "cuda":
                    syncs.append(len(seen_syncs))
    fed_rate, random_rate = statistics.median(rates["fed"]), statistics.median(rates["random"])
    return {"fed_img_per_s": fed_rate, "random_img_per_s": random_rate,
            "feed_efficiency": fed_rate / random_rate, "epochs": rates,
            "syncs_per_fed_epoch": max(syncs) if syncs else None}


@contextlib.contextmanager
def synchronisations(dev):
    """On a CUDA device, every operation within that waits for the GPU, as
    ``torch.cuda.set_sync_debug_mode("warn")`` reports them; elsewhere none are seen."""
    if dev is None or dev.type != "cuda":
        yield []
        return
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield seen
        finally:
            torch.cuda.set_sync_debug_mode("default")
    seen[:] = [w for w in seen if "synchroniz" in str(w.message)]


def measure(args, handle: DataHandle) -> dict:
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    models = {}
    for model in args.models.split(","):
        on = one_trial(trial_config(args, model), handle, args.device, threads)
        off = one_trial(trial_config(args, model, **OFF), handle, args.device, threads)
        models[model] = {"defaults": on, "all_off": off, "speedup": on["img_per_s"] / off["img_per_s"],
                         "feed": feed(args, handle, model)}
    cfg = trial_config(args, args.pack_model)
    one = wall_img_per_s([one_trial(cfg, handle, args.device, threads)])
    many = packed(cfg, handle, args.device, args.pack)
    total = wall_img_per_s(many)
    return {"models": models,
            "feed_efficiency": {model: m["feed"]["feed_efficiency"] for model, m in models.items()},
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
              f"all off {m['all_off']['img_per_s']:8.1f}  x{m['speedup']:.2f}  fed {m['feed']['fed_img_per_s']:8.1f} "
              f"/ random {m['feed']['random_img_per_s']:8.1f} = feed_efficiency {m['feed']['feed_efficiency']:.3f}")
    p = figures["packing"]
    print(f"{p['model']:>12} {p['trials']} packed {p['packed_img_per_s']:8.1f} img/s  one "
          f"{p['one_img_per_s']:8.1f}  x{p['speedup']:.2f}  ({device})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
