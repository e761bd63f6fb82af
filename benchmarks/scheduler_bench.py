"""Schedulers judged by accuracy against wall time: ``python benchmarks/scheduler_bench.py --out sched.json``.

On each task (the embedded demo, and ``photos``: random crops of eight photographs that
ship with scikit-image, as JPEGs in an ImageFolder), with one fixed backbone (the demo's
ResNet-18 pretrained on digits 0-4) and 32 px images:

1. one run of the ``seed_recipe`` space: its wall time W (``wall_s`` of its summary);
2. one run each of ``lr_decay`` (ASHA), ``lr_decay_promotion`` (promotion) and
   ``one_epoch_top_k`` (every trial one epoch, then the best k to the full budget), each
   with ``--time-budget`` 4 W, read at 1, 2 and 4 W from the anytime curve of its summary
   (the best val_acc reached so far, against seconds since its command started);
3. the reference: the same search, ``--ref-trials`` trials (default 40) and no early
   stopping (ASHA's only rung at the last epoch).

Every sweep runs ``sweeps/run.py`` as a user would, one after the other, with Ray to
itself, on ``--cpus`` CPUs split into trials of ``--cpus-per-trial``. The figures, the
curves and where each sweep's first seconds went are written to ``--out`` and printed as
a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCHEDULERS = {"asha": "lr_decay", "promotion": "lr_decay_promotion", "top_k": "one_epoch_top_k"}
# Colour photographs bundled with scikit-image (no download): one class each.
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
          "retina", "stereo_motorcycle")
IMAGE_SIZE = 32


def make_photos(root: Path, per_class: int = 40, size: int = 48, seed: int = 0) -> Path:
    """``root/<photo>/<i>.jpg``: random square crops (1/8 to 1/3 of the short side) of each
    photo, flipped half the time, colour gains of +-20 %, resized to ``size`` px. Idempotent."""
    import numpy as np
    import skimage.data
    from PIL import Image

    if (root / ".complete").exists():
        return root
    rng = np.random.default_rng(seed)
    for name in PHOTOS:
        img = getattr(skimage.data, name)()
        img = np.asarray(img[0] if isinstance(img, tuple) else img)[..., :3]
        h, w = img.shape[:2]
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            side = int(min(h, w) * rng.uniform(1 / 8, 1 / 3))
            top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            crop = img[top:top + side, left:left + side].astype(np.float32) * rng.uniform(0.8, 1.2, 3)
            im = Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR)
            if rng.random() < 0.5:
                im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            im.save(folder / f"{i:04d}.jpg", quality=85)
    (root / ".complete").touch()
    return root


def reference_space(work: Path) -> Path:
    """lr_decay with ASHA's grace period past the last epoch: no trial stops early."""
    import yaml

    space = yaml.safe_load((ROOT / "search_spaces" / "lr_decay.yaml").read_text())
    space.pop("asha", None)
    space["description"] = "lr_decay without early stopping: every trial trains its full budget."
    space["scheduler"] = {"type": "asha", "grace_period": 1000, "reduction_factor": 3}
    path = work / "reference.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def task_argv(task: str, work: Path) -> list[str]:
    if task == "demo":
        return []
    from trainables import demo

    backbone = demo.pretrained_backbone("resnet18", IMAGE_SIZE)
    return ["--data", str(make_photos(work / "photos")), "--weights", str(backbone),
            "--image-size", str(IMAGE_SIZE), "--model", "resnet18"]


def sweep(args, work: Path, task: str, name: str, space: str, extra: list[str], log) -> dict:
    """Run one sweep through ``sweeps/run.py``; its summary, with the command's own wall time."""
    argv = [sys.executable, str(ROOT / "sweeps" / "run.py"), "--space", space, "--name", name,
            "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}", "--experiment", f"schedulers-{task}",
            "--storage", str(work / "sweeps"), "--cpus-per-trial", str(args.cpus_per_trial),
            *task_argv(task, work), *extra]
    log(f"[{task}] {name}: {' '.join(argv[2:])}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    started = time.time()
    with open(work / f"{name}.log", "w") as out:
        proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=work)
    command_s = time.time() - started
    lines = (work / f"{name}.log").read_text().strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); see {work / f'{name}.log'}")
    summary = json.loads(Path(lines[-1]).read_text())
    summary["command_s"] = round(command_s, 1)
    summary["first_steps"] = first_steps(Path(summary["sweep_dir"]), started)
    best = summary["best"]["val_acc"] if summary["best"] else None
    log(f"[{task}] {name}: best val_acc {best}, wall {summary['wall_s']} s, trials {summary['trials']}")
    return summary


def first_steps(sweep_dir: Path, started: float) -> dict:
    """Where a sweep's seconds went: when its first trial started (start-up: Ray, data,
    MLflow), the trial starts (actor starts and model builds before the first training
    step), and the epochs trained."""
    starts, first_step, epochs = [], [], 0
    for path in sweep_dir.glob("trial_*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            starts.append(min(r["started_at"] for r in rows))
            first_step += [r["first_step_time"] - r["started_at"] for r in rows if r.get("first_step_time")]
            epochs += len(rows)
    return {"first_trial_start_s": round(min(starts) - started, 1) if starts else None,
            "mean_trial_start_to_first_step_s": round(sum(first_step) / len(first_step), 2) if first_step else None,
            "trial_epochs": epochs}


def best_at(curve: list, t: float) -> float | None:
    """The best val_acc of an anytime curve at ``t`` seconds (None before its first result)."""
    reached = [best for at, best in curve if at <= t]
    return max(reached) if reached else None


def run_task(args, work: Path, task: str, log) -> dict:
    recipe = sweep(args, work, task, f"{task}-seed_recipe", "seed_recipe", [], log)
    wall = recipe["wall_s"]
    out = {"seed_recipe": {"wall_s": wall, "best_val_acc": recipe["best"]["val_acc"],
                           "first_steps": recipe["first_steps"]}}
    epochs = ["--max-epochs", str(args.max_epochs)]
    ref = sweep(args, work, task, f"{task}-reference", str(reference_space(work)),
                ["--trials", str(args.ref_trials), *epochs], log)
    reference = ref["best"]["val_acc"]
    out["reference"] = {"trials": args.ref_trials, "best_val_acc": reference, "wall_s": ref["wall_s"],
                        "total_trial_epochs": ref["total_trial_epochs"], "anytime": ref["anytime"]}
    for scheduler in SCHEDULERS:
        out[scheduler] = run_scheduler(args, work, task, scheduler, wall, reference, log)
    return out


def run_scheduler(args, work: Path, task: str, scheduler: str, wall: float, reference: float, log,
                  name: str | None = None) -> dict:
    """One scheduler's sweep with a time budget of the largest multiple of ``wall``, read at each."""
    trials = args.top_k_trials if scheduler == "top_k" else 1000  # the others: as many as the time allows
    budget = max(args.multiples) * wall
    s = sweep(args, work, task, name or f"{task}-{scheduler}", SCHEDULERS[scheduler],
              ["--trials", str(trials), "--time-budget", f"{budget:.0f}", "--max-epochs", str(args.max_epochs)], log)
    at = {f"{m:g}x": best_at(s["anytime"], m * wall) for m in args.multiples}
    return {"best_val_acc_at": at,
            "fraction_of_reference_at": {k: (round(v / reference, 4) if v is not None else None)
                                         for k, v in at.items()},
            "trials": s["trials"], "total_trial_epochs": s["total_trial_epochs"],
            "wall_s": s["wall_s"], "anytime": s["anytime"], "first_steps": s["first_steps"]}


def redo(args, out: Path, work: Path, log) -> dict:
    """Run ``--redo TASK:SCHEDULER`` sweeps again against the seed recipe wall time and the
    reference an earlier run of this script measured (``--out``), replacing their figures."""
    results = json.loads(out.read_text())
    for item in args.redo:
        task, _, scheduler = item.partition(":")
        r = results["tasks"][task]
        n = sum(1 for p in work.glob(f"{task}-{scheduler}*.log"))
        r[scheduler] = run_scheduler(args, work, task, scheduler, r["seed_recipe"]["wall_s"],
                                     r["reference"]["best_val_acc"], log, name=f"{task}-{scheduler}-{n + 1}")
        out.write_text(json.dumps(results, indent=2))
    return results


def table(results: dict, multiples) -> str:
    lines = []
    for task, r in results["tasks"].items():
        w, ref = r["seed_recipe"]["wall_s"], r["reference"]
        lines += [f"\n{task}: seed_recipe W = {w:.0f} s (val_acc {r['seed_recipe']['best_val_acc']:.4f}); "
                  f"reference ({ref['trials']} trials, no early stopping, {ref['wall_s']:.0f} s): "
                  f"{ref['best_val_acc']:.4f}",
                  "| scheduler | " + " | ".join(f"best val_acc at {m:g} W" for m in multiples)
                  + " | trials (4 W) | trial-epochs |",
                  "|---|" + "---|" * (len(multiples) + 2)]
        for name in SCHEDULERS:
            s = r[name]
            cells = []
            for m in multiples:  # "–": no result yet at that time, or not measured (a shorter --redo)
                v, f = s["best_val_acc_at"].get(f"{m:g}x"), s["fraction_of_reference_at"].get(f"{m:g}x")
                cells.append("–" if v is None else f"{v:.4f} ({f:.3f})")
            n = sum(s["trials"].values()) - s["trials"].get("interrupted", 0)
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {n} | {s['total_trial_epochs']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/scheduler_bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="scheduler_bench.json", metavar="FILE.json")
    p.add_argument("--work-dir", metavar="DIR", help="where the sweeps, logs and data go (default: a new "
                                                     "folder next to --out)")
    p.add_argument("--tasks", default="photos,demo", help="comma-separated: demo, photos (default both)")
    p.add_argument("--max-epochs", type=int, default=4, help="epochs of a full trial in the searches (default 4)")
    p.add_argument("--ref-trials", type=int, default=40, help="trials of the reference search (default 40)")
    p.add_argument("--top-k-trials", type=int, default=16,
                   help="trials of the one-epoch baseline, each trained one epoch (default 16)")
    p.add_argument("--multiples", default="1,2,4", help="wall budgets to read, in seed_recipe runs (default 1,2,4)")
    p.add_argument("--cpus-per-trial", type=float, default=1)
    p.add_argument("--redo", action="append", default=[], metavar="TASK:SCHEDULER",
                   help="run this one sweep again (e.g. photos:promotion), reusing the seed recipe's wall time "
                        "and the reference from --out, and replace its figures there")
    args = p.parse_args(argv)
    args.multiples = [float(m) for m in args.multiples.split(",")]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(tasks) - {"demo", "photos"})
    if unknown:
        print(f"error: --tasks: unknown task {unknown[0]!r} (demo, photos)", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    work = Path(args.work_dir or out.with_suffix("")).resolve()
    work.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)

    if args.redo:
        results = redo(args, out, work, log)
        print(table(results, args.multiples))
        return 0
    results = {"cpus": os.cpu_count(), "cpus_per_trial": args.cpus_per_trial, "max_epochs": args.max_epochs,
               "image_size": IMAGE_SIZE, "model": "resnet18 (demo backbone: digits 0-4)", "tasks": {}}
    started = time.time()
    for task in tasks:
        results["tasks"][task] = run_task(args, work, task, log)
        out.write_text(json.dumps(results, indent=2))  # what is measured so far survives a later failure
    results["total_s"] = round(time.time() - started, 1)
    out.write_text(json.dumps(results, indent=2))
    print(table(results, args.multiples))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
