"""How close a sweep comes to this machine's limit: ``python benchmarks/bench.py --out bench.json``.

One run, one machine, one model (resnet18 at 64 px, random weights: throughput does not
depend on the weights, and nothing is downloaded) on the demo digits 5-9 or ``--data``.
In order: an 8-trial sweep on an empty cache counts decodes; one process with every core
gives the limit; the real ``sweeps/run.py`` command, on the now warm cache, gives startup
and the sweep's summed throughput; work-free sweeps of the platform and of bare Ray Tune
give the wall time per trial; single trials with and without the frozen-prefix feature
cache give its speedups. ``DEFINITIONS`` says exactly what each figure counts and goes
into the JSON with the figures. The targets are benchmark figures, never test assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import suppress
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_sweeps  # noqa: E402

DEFINITIONS = {
    "limit_img_per_s": "One process without Ray, torch threads = --cpus, nothing frozen, run_trial for "
                       "--limit-epochs epochs: training images / epoch time, an epoch being its training "
                       "loop and its validation pass (not its checkpoint); the median over epochs 2 and "
                       "later (the first warms up).",
    "sweep_img_per_s": "The sweeps/run.py command in a new process on the warm cache, nothing frozen, "
                       "--trials trials x --epochs epochs (ASHA never stops one early), --cpus-per-trial "
                       "CPUs each and --cpus/--cpus-per-trial at once: training images of all trials / "
                       "the fit phase, from the first trial's start to the last trial's end (their MLflow "
                       "child runs). Validation, checkpoints, reporting, model builds, every trial's first "
                       "epoch and the gaps between trials all count in its time.",
    "efficiency": "sweep_img_per_s / limit_img_per_s: both count training images per second of a time "
                  "that includes validation; the limit's excludes start-up and checkpoints, the "
                  "sweep's excludes nothing between the first trial start and the last trial end.",
    "startup_s": "From launching the sweep command (Python imports, checks, data scan, MLflow run into an "
                 "existing store, Ray start, trial start, model build) to the first optimizer step of "
                 "its first trial; the decoded images were cached by the benchmark's first sweep.",
    "startup_milestones_s": "Seconds from the launch until the sweep's MLflow run exists, until Tune starts "
                            "the first trial (its actor is up), and until that trial's first step.",
    "sweep": "Details of the throughput sweep: lane_busy_fraction = the trials' epoch time (train + val) "
             "/ (trials at once x fit phase), the rest being model builds, checkpoints, reporting and "
             "gaps; in_epoch_img_per_s = the summed throughput inside those epochs.",
    "overhead_per_trial_s": "Wall time per trial of the platform (execute(): MLflow tracking, Optuna TPE, "
                            "ASHA, actor reuse, Tune's JSON logger only) sweeping a trainable that reports "
                            "one epoch and does no work, --overhead-trials trials, --cpus/--cpus-per-trial "
                            "at once: (last trial start - first trial start) / (trials - trials at once), "
                            "each start taken inside the trainable; the lowest of --rounds sweeps, alternating "
                            "with the bare ones. Ray's start, the sweep's MLflow run and summary, and "
                            "the last trials' ends are fixed costs, outside it.",
    "overhead_mlflow_complete_per_trial_s": "Not a target: the platform's MLflow writes leave the driver "
                                            "through a writer process and may trail the trials. The same "
                                            "sweeps, timed up to the moment MLflow held every write "
                                            "(the summary's mlflow_done_at; the sweep's end, best model "
                                            "and parent-run metrics included): (that moment - first "
                                            "trial start) / (trials - trials at once); the lowest of "
                                            "--rounds.",
    "bare_ray_overhead_per_trial_s": "The same for a bare tune.Tuner over the same trainable, param space, "
                                     "resources, concurrency, actor reuse and Ray start; no search "
                                     "algorithm, scheduler, callbacks or MLflow; Tune's default loggers "
                                     "(JSON, CSV and TensorBoard files of every result).",
    "bare_ray_json_only_overhead_per_trial_s": "For scale, not a target: the bare loop with only Tune's JSON "
                                               "logger, as the platform runs it (MLflow holds the metrics, "
                                               "so it writes no CSV or TensorBoard copies); alternating with "
                                               "the other two, the lowest of --rounds.",
    "bare_ray_default_overhead_per_trial_s": "For scale, not a target: the bare loop with Tune's default "
                                             "of a new actor per trial (reuse_actors off), one sweep of "
                                             "min(--overhead-trials, 2 x trials at once + 4) trials.",
    "decodes_per_image": "Image decodes during a sweep of --decode-trials trials (1 epoch each) started "
                         "on an empty cache folder, in the driver (trainables.data.DECODE_COUNT) and in "
                         "every trial (decodes_in_trial), divided by the number of images.",
    "feature_cache_speedup": "Frozen prefix of all stages but the last (resnet18: frozen_depth 4, stem and "
                             "layer1-3): epoch time (train + val; median of epochs 2 and later) of "
                             "run_trial without the feature cache / with it; one process, --cpus threads; "
                             "--rounds trials of each, alternating, each side its fastest. The cache's "
                             "one-time build is in neither: it is feature_cache_build_s.",
    "linear_probe_speedup": "The same with every stage frozen (resnet18: frozen_depth 5): only the head "
                            "trains; its build is linear_probe_build_s.",
    "rampup_s": "On a Ray node started on this machine that declares --rampup-lanes CPUs, a sweep of the "
                "platform (execute(): TPE, ASHA, MLflow, no --max-concurrent) of --rampup-lanes trials at "
                "1 CPU each, whose trainable imports nothing heavy and sleeps: seconds from the first "
                "trial's start to the moment all run at once (the last one's start, each taken inside "
                "the trainable; no trial ends before it); alternating with the bare loop, the lowest of "
                "--rounds.",
    "bare_random_rampup_s": "The same for a bare tune.Tuner over Tune's random search (which starts every "
                            "trial at once), the same trainable, data parameter, resources and actor "
                            "reuse, on a node of the same size.",
}
FIGURES = ("limit_img_per_s", "sweep_img_per_s", "efficiency", "startup_s", "overhead_per_trial_s",
           "overhead_mlflow_complete_per_trial_s",
           "bare_ray_overhead_per_trial_s", "bare_ray_json_only_overhead_per_trial_s",
           "bare_ray_default_overhead_per_trial_s", "decodes_per_image",
           "feature_cache_speedup", "feature_cache_build_s", "linear_probe_speedup", "linear_probe_build_s",
           "rampup_s", "bare_random_rampup_s")
BOUNDS = {  # figure: (comparison, bound or the figure it is relative to, factor)
    "efficiency": (">=", 0.90, 1), "startup_s": ("<=", 12.0, 1),
    "rampup_s": ("<=", "bare_random_rampup_s", 1.2),
    "overhead_per_trial_s": ("<=", "bare_ray_overhead_per_trial_s", 1.2),
    "decodes_per_image": ("<=", 1.0, 1), "feature_cache_speedup": (">=", 1.6, 1),
    "linear_probe_speedup": (">=", 20.0, 1),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/bench.py", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, metavar="FILE.json", help="where the figures go")
    p.add_argument("--model", default="resnet18", help="torchvision model (default resnet18)")
    p.add_argument("--image-size", type=int, default=64, metavar="N", help="pixels (default 64)")
    p.add_argument("--data", metavar="DIR", help="ImageFolder (default: the demo digits 5-9)")
    p.add_argument("--cpus", type=int, default=os.cpu_count(), metavar="N",
                   help=f"cores the benchmark uses (default: all, {os.cpu_count()})")
    p.add_argument("--cpus-per-trial", type=float, default=1, metavar="C",
                   help="CPUs per sweep trial; --cpus/C run at once (default 1)")
    p.add_argument("--trials", type=int, default=4, metavar="N",
                   help="trials of the throughput sweep (default 4)")
    p.add_argument("--epochs", type=int, default=3, metavar="N",
                   help="epochs of each throughput-sweep trial (default 3)")
    p.add_argument("--limit-epochs", type=int, default=5, metavar="N",
                   help="epochs of the one-process limit (default 5)")
    p.add_argument("--decode-trials", type=int, default=8, metavar="N",
                   help="trials of the sweep that counts decodes (default 8)")
    p.add_argument("--overhead-trials", type=int, default=40, metavar="N",
                   help="trials of each work-free sweep that measures the overhead (default 40)")
    p.add_argument("--rounds", type=int, default=2, metavar="N",
                   help="repeats of the short comparisons (work-free sweeps, feature-cache trials), "
                        "alternating; each side keeps its best (default 2)")
    p.add_argument("--feature-epochs", type=int, default=3, metavar="N",
                   help="epochs of each feature-cache trial (default 3)")
    p.add_argument("--rampup-lanes", type=int, default=16, metavar="N",
                   help="trials that must all run at once in the ramp-up sweeps, on a node declaring N "
                        "CPUs (default 16; 0: not measured)")
    p.add_argument("--rampup-sleep", type=float, default=20.0, metavar="S",
                   help="seconds each ramp-up trial sleeps: longer than the lanes take to fill (default 20)")
    p.add_argument("--pipeline-images", type=int, default=0, metavar="N",
                   help="also measure benchmarks/bench_pipeline.py's 224 px input-pipeline figures on N "
                        "generated JPEGs (4000 for the README's), under input_pipeline in the JSON "
                        "(default 0: not measured)")
    p.add_argument("--work-dir", metavar="DIR",
                   help="keep what the sweeps write here (must be new or empty; default: a temporary "
                        "folder, removed at the end)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = check(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="ftsweep-bench-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    try:
        from sweeps.tune.driver import environment

        with environment(FTSWEEP_CACHE=str(work / "cache")):
            figures = measure(args, work)
        if args.pipeline_images:  # the 224 px input pipeline (benchmarks/bench_pipeline.py), its own definitions
            from benchmarks import bench_pipeline

            figures["input_pipeline"] = bench_pipeline.report(work / "pipeline", args.pipeline_images)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    load = figures.pop("load")
    report = {**figures, "targets": targets(figures), "machine": machine(args, load),
              "warnings": busy_warnings(load),
              "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "bench_wall_s": time.time() - started, "definitions": DEFINITIONS}
    Path(args.out).write_text(json.dumps(report, indent=2, default=list) + "\n")
    print_table(report)
    print(Path(args.out).resolve())
    return 0


def check(args) -> str | None:
    if args.cpus < 1 or args.cpus_per_trial <= 0 or bench_sweeps.lanes(args) < 1:
        return f"--cpus {args.cpus} must hold at least one trial of --cpus-per-trial {args.cpus_per_trial}"
    for name in ("trials", "epochs", "limit_epochs", "decode_trials", "overhead_trials",
                 "rounds", "feature_epochs", "image_size"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
    if args.overhead_trials <= bench_sweeps.lanes(args):
        return (f"--overhead-trials {args.overhead_trials} must exceed the {bench_sweeps.lanes(args)} "
                "trials that run at once: the overhead is the pace at which later trials start")
    if args.pipeline_images and args.pipeline_images < 80:  # bench_pipeline.MIN_IMAGES
        return f"--pipeline-images must be 0 or >= 80, got {args.pipeline_images}"
    if args.work_dir and Path(args.work_dir).is_dir() and any(Path(args.work_dir).iterdir()):
        return f"--work-dir {args.work_dir} is not empty (decodes are counted from an empty cache)"
    return None


def measure(args, work: Path) -> dict:
    busy: dict[str, dict] = {}  # how loaded the machine was as each phase began

    def phase(name: str, what: str) -> None:
        busy[name] = machine_load()
        print(f"[bench {time.strftime('%H:%M:%S')}] {name}: {what}", flush=True)

    phase("decodes", f"a sweep of {args.decode_trials} trials on an empty cache")
    plan, decodes = bench_sweeps.measure_decodes(args, work)
    base = replace(plan.space.config(), lr=0.01)  # single trials need one lr; speed does not depend on it
    phase("limit", f"one process with {args.cpus} threads, {args.limit_epochs} epochs")
    limit = measure_limit(base, plan.data, args)
    phase("sweep", f"the sweeps/run.py command, {args.trials} trials x {args.epochs} epochs")
    sweep = bench_sweeps.measure_sweep(args, work, len(plan.data.dataset.train))
    sweep["efficiency"] = sweep["sweep_img_per_s"] / limit["limit_img_per_s"]
    phase("overhead", f"work-free sweeps of {args.overhead_trials} trials, platform and bare Ray, "
                      f"{args.rounds} of each")
    overhead = bench_sweeps.measure_overhead(args, work, args.rounds)
    phase("feature_cache", f"single trials with and without it, {args.feature_epochs} epochs, "
                           f"{args.rounds} of each")
    cache = measure_feature_cache(base, plan.data, args)
    rampup = {}
    if args.rampup_lanes:
        phase("rampup", f"{args.rampup_lanes} sleeping trials on a node of {args.rampup_lanes} CPUs, "
                        "the platform and bare random search")
        rampup = bench_sweeps.measure_rampup(args, work, args.rampup_lanes, args.rampup_sleep, args.rounds)
    busy["end"] = machine_load()
    return {**limit, **sweep, **overhead, **decodes, **cache, **rampup, "load": busy}


def run_epochs(cfg, handle, threads: int) -> list[dict]:
    from trainables.train import run_trial

    epochs: list[dict] = []
    run_trial(cfg, handle, lambda metrics, _: epochs.append(metrics), threads=threads, device="cpu")
    return epochs


def steady(values: list[float]) -> float:
    """The median after the first epoch, which warms up (the first one if it is all)."""
    return statistics.median(values[1:] or values)


def measure_limit(base, handle, args) -> dict:
    train = len(handle.dataset.train)
    epochs = run_epochs(replace(base, frozen_depth=0, max_epochs=args.limit_epochs), handle, args.cpus)
    return {"limit_img_per_s": steady([train / m["epoch_s"] for m in epochs]),
            "limit": {"epoch_s": [m["epoch_s"] for m in epochs],
                      "train_loop_img_per_s": [m["img_per_s"] for m in epochs]}}


def measure_feature_cache(base, handle, args) -> dict:
    """Cached and uncached trials alternate, ``--rounds`` times; each side keeps its fastest
    steady epoch time (other load on the machine only ever adds time)."""
    from trainables.models import num_stages

    deepest = num_stages(args.model)
    if deepest == 0:
        return {}  # no stages to freeze: the model has no feature cache
    out = {}
    for name, depth in (("feature_cache", deepest - 1), ("linear_probe", deepest)):
        cfg = replace(base, frozen_depth=depth, max_epochs=args.feature_epochs)
        build_s = build_features(cfg, handle, args.cpus)
        runs: dict[str, list[list[float]]] = {"cached": [], "uncached": []}
        for _ in range(args.rounds):
            cached = run_epochs(cfg, handle, args.cpus)
            if cached[0]["cached_stages"] != depth:
                raise RuntimeError(f"frozen_depth {depth}: the trial did not use the feature cache")
            runs["cached"].append([m["epoch_s"] for m in cached])
            runs["uncached"].append([m["epoch_s"] for m in run_epochs(replace(cfg, feature_cache=False),
                                                                      handle, args.cpus)])
        best = {kind: min(steady(epochs) for epochs in seen) for kind, seen in runs.items()}
        out[f"{name}_speedup"] = best["uncached"] / best["cached"]
        out[f"{name}_build_s"] = build_s
        out[name] = {"frozen_depth": depth, **{f"{kind}_epoch_s": seen for kind, seen in runs.items()}}
    return out


def build_features(cfg, handle, threads: int) -> float:
    """Seconds to compute the frozen prefix's features, as the trial would on first use."""
    import torch

    from trainables import features
    from trainables.models import build_model, freeze, stages

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)  # the prefix run_trial builds for this config
    model = build_model(cfg.model, len(handle.classes), cfg.weights)
    staged = stages(model, cfg.model)
    freeze(staged, cfg.frozen_depth)
    model.eval()
    started = time.perf_counter()
    if features.prefix_features(cfg, handle, staged, torch.device("cpu")) is None:
        raise RuntimeError(f"frozen_depth {cfg.frozen_depth}: the feature cache would not fit")
    return time.perf_counter() - started


def targets(figures: dict) -> dict:
    out = {}
    for key, (op, bound, factor) in BOUNDS.items():
        if key not in figures:
            continue  # not measured in this run (--rampup-lanes 0)
        limit = (figures[bound] if isinstance(bound, str) else bound) * factor
        value = figures.get(key)
        ok = value is not None and (value >= limit if op == ">=" else value <= limit)
        text = f"{op} {factor} x {bound}" if isinstance(bound, str) else f"{op} {bound:g}"
        out[key] = {"value": value, "target": text, "bound": limit, "pass": ok}
    return out


def machine(args, load: dict) -> dict:
    import ray
    import torch

    return {"cpu_count": os.cpu_count(), "cpus_used": args.cpus, "torch": torch.__version__,
            "ray": ray.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            # other work on the machine skews every figure; this shows how much there was
            "load_at_phase_start": load}


def machine_load() -> dict:
    """The 1-minute load average and, where Linux reports it, the share of the last 10 s
    in which some task waited for a CPU."""
    out = {"load_average_1min": round(os.getloadavg()[0], 2)}
    with suppress(OSError, ValueError, IndexError):
        some = Path("/proc/pressure/cpu").read_text().split()[1]  # "avg10=12.34"
        out["cpu_pressure_some_avg10"] = float(some.split("=")[1])
    return out


def busy_warnings(load: dict, threshold: float = 10.0) -> list[str]:
    """Phases that began while other work made tasks wait for a CPU. A process with one
    torch thread per core slows down far more than its share when it must share them, so
    a busy machine understates the limit and every figure relative to it."""
    return [f"{phase}: CPUs were busy as it began (some task waited {seen['cpu_pressure_some_avg10']:.0f}% "
            f"of the last 10 s); rerun on a quiet machine" for phase, seen in load.items()
            if seen.get("cpu_pressure_some_avg10", 0.0) > threshold and phase != "end"]


def print_table(report: dict) -> None:
    print(f"\n{'figure':38} {'value':>10}  {'target':40} result")
    for key in FIGURES:
        if key not in report:
            continue
        t = report["targets"].get(key)
        target, result = (t["target"], "pass" if t["pass"] else "MISS") if t else ("", "")
        print(f"{key:38} {report[key]:10.3f}  {target:40} {result}")
    load = [v["load_average_1min"] for v in report["machine"]["load_at_phase_start"].values()]
    print(f"({report['machine']['cpus_used']} of {report['machine']['cpu_count']} CPUs; 1-min load average "
          f"{min(load):.1f} to {max(load):.1f} at the phases' starts; {report['bench_wall_s']:.0f} s)")
    for warning in report["warnings"]:
        print(f"WARNING {warning}")


if __name__ == "__main__":
    sys.exit(main())
