"""The trainable alone on one GPU: ``python sweeps/gpu_bench.py --out gpu.json``.

No Ray, MLflow or Optuna: ``run_trial`` runs in this process, and for packing in several
processes at once on the same device, as fractional ``--gpus-per-trial`` trials would. For
each model at ``--image-size`` (random weights, nothing frozen, the demo digits 5-9 scaled
up): training images per second with the CUDA defaults (mixed precision, channels_last,
pinned memory) and with all three off; then ``--pack`` trials of ``--pack-model`` at once
against one, summed. Each figure is the median over epochs 2 and later of the trial's own
``img_per_s`` (its training loop); the first epoch warms up.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from trainables.config import TrialConfig  # noqa: E402
from trainables.data import DataHandle, scan  # noqa: E402
from trainables.train import device_options, run_trial  # noqa: E402

OFF = {"amp": False, "channels_last": False, "pin_memory": False}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sweeps/gpu_bench.py", description=__doc__.split("\n\n")[1])
    p.add_argument("--out", required=True, metavar="FILE.json", help="where the figures go")
    p.add_argument("--models", default="resnet18,resnet50", help="comma-separated (default resnet18,resnet50)")
    p.add_argument("--image-size", type=int, default=224, metavar="N", help="pixels (default 224)")
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="default 64")
    p.add_argument("--epochs", type=int, default=4, metavar="N", help="per trial, at least 2 (default 4)")
    p.add_argument("--pack", type=int, default=4, metavar="N", help="trials at once on the device (default 4)")
    p.add_argument("--pack-model", default="resnet18", help="the model of the packed trials (default resnet18)")
    p.add_argument("--device", default="cuda", help="default cuda")
    p.add_argument("--work-dir", metavar="DIR", help="the images and their decoded cache (default: temporary)")
    return p


def trial_config(args, model: str, **overrides) -> TrialConfig:
    return TrialConfig(model=model, weights="none", image_size=args.image_size, batch_size=args.batch_size,
                       max_epochs=args.epochs, lr=0.01, frozen_depth=0, **overrides)


def one_trial(cfg: TrialConfig, handle: DataHandle, device: str, threads: int, start=None) -> dict:
    """Run one trial; its steady training throughput and the device memory it peaked at."""
    if start is not None:
        start.wait()  # packed trials begin together
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    epochs: list[dict] = []
    run_trial(cfg, handle, lambda metrics, _: epochs.append(metrics), threads=threads, device=device)
    opts = device_options(cfg, torch.device(device))
    return {"img_per_s": statistics.median(m["img_per_s"] for m in epochs[1:]),
            "epoch_img_per_s": [m["img_per_s"] for m in epochs],
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "amp_dtype": str(opts.amp_dtype).removeprefix("torch.") if opts.amp_dtype else None,
            "channels_last": opts.channels_last, "pin_memory": opts.pin_memory}


def _packed_worker(cfg, handle, device, threads, start, results) -> None:
    results.put(one_trial(cfg, handle, device, threads, start))


def packed(cfg: TrialConfig, handle: DataHandle, device: str, n: int) -> list[dict]:
    """``n`` trials at once, each in its own process (CUDA needs spawned ones)."""
    ctx = mp.get_context("spawn")
    start, results = ctx.Barrier(n), ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // n)
    procs = [ctx.Process(target=_packed_worker, args=(cfg, handle, device, threads, start, results))
             for _ in range(n)]
    for p in procs:
        p.start()
    out = [results.get() for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"a packed trial exited with code {p.exitcode}")
    return out


def measure(args, handle: DataHandle) -> dict:
    threads = os.cpu_count() or 1
    models = {}
    for model in args.models.split(","):
        on = one_trial(trial_config(args, model), handle, args.device, threads)
        off = one_trial(trial_config(args, model, **OFF), handle, args.device, threads)
        models[model] = {"defaults": on, "all_off": off, "speedup": on["img_per_s"] / off["img_per_s"]}
    cfg = trial_config(args, args.pack_model)
    one = one_trial(cfg, handle, args.device, threads)
    many = packed(cfg, handle, args.device, args.pack)
    total = sum(t["img_per_s"] for t in many)
    return {"models": models,
            "packing": {"model": args.pack_model, "trials": args.pack, "one_img_per_s": one["img_per_s"],
                        "packed_img_per_s": total, "speedup": total / one["img_per_s"],
                        "per_trial": many}}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.epochs < 2 or args.pack < 1:
        print("error: --epochs must be >= 2 (the first warms up) and --pack >= 1", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device}: torch {torch.__version__} sees no CUDA device", file=sys.stderr)
        return 2
    from trainables.demo import write_digits

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="ftsweep-gpu-bench-"))
    handle = DataHandle(scan(write_digits(work / "digits", range(5, 10)), 0.2), args.image_size,
                        str(work / "cache"))
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
