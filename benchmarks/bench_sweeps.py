"""The benchmark's sweeps: real ones through the platform, and bare Ray Tune for comparison.

Helpers of ``benchmarks/bench.py``. Each sweep gets Ray to itself: it starts Ray and shuts it
down before the next begins, so every measured wall time pays for the same things.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPACE = "bench"  # search_spaces/bench.yaml: lr only, nothing frozen, ASHA never stops early


def lanes(args) -> int:
    """Trials that run at once: every CPU the benchmark may use, split per trial."""
    return int(args.cpus // args.cpus_per_trial)


def sweep_argv(args, work: Path, name: str, trials: int, epochs: int, experiment: str = "bench",
               cpus_per_trial: float | None = None, max_concurrent: bool = True) -> list[str]:
    """The ``sweeps/run.py`` command line of one benchmark sweep: ``args.cpus_per_trial``
    CPUs per trial unless ``cpus_per_trial`` is given, and ``--max-concurrent`` set to the
    lanes unless ``max_concurrent`` is False (the sweep then fills the lanes on its own)."""
    cpus = args.cpus_per_trial if cpus_per_trial is None else cpus_per_trial
    argv = ["--space", SPACE, "--model", args.model, "--weights", "none",
            "--image-size", str(args.image_size), "--trials", str(trials), "--max-epochs", str(epochs),
            "--cpus-per-trial", str(cpus), "--tracking-uri", tracking_uri(work), "--experiment", experiment,
            "--storage", str(work / "sweeps"), "--name", name]
    argv += ["--max-concurrent", str(lanes(args))] if max_concurrent else []
    # absolute: the command runs in the work folder
    return argv + (["--data", str(Path(args.data).resolve())] if args.data else [])


def tracking_uri(work: Path) -> str:
    return f"sqlite:///{work / 'mlflow.db'}"


def trivial(config: dict, data) -> None:
    """A trial that does no work: it reports one epoch's metrics, and when it started."""
    from ray import tune

    tune.report({"epoch": 1, "val_acc": 0.5, "best_val_acc": 0.5, "val_loss": 1.0, "train_loss": 1.0,
                 "lr": config["lr"], "img_per_s": 0.0, "epoch_s": 0.0, "started": time.time()})


def sleeper(seconds: float):
    """A trainable that imports nothing heavy and sleeps ``seconds``, so that many actor
    starts on few cores measure scheduling rather than CPU contention; it reports when it
    started and ended. Nested, so Ray ships it by value with its ``seconds``."""

    def sleep(config: dict, data) -> None:
        from ray import tune

        started = time.time()
        time.sleep(seconds)
        tune.report({"epoch": 1, "val_acc": 0.5, "best_val_acc": 0.5, "val_loss": 1.0, "train_loss": 1.0,
                     "lr": config["lr"], "started": started, "ended": time.time()})
    return sleep


def ship_by_value() -> None:
    """Ray's workers cannot import ``benchmarks`` (it is not installed, and the sweeps run
    in a work folder): the trainables defined here travel to them by value."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


def in_process(argv: list[str], log: Path, trainable=None, ray_cpus: int | None = None):
    """Run one sweep of the platform in this process, with its output in ``log``; returns
    its plan. Ray is shut down after it, so the next sweep starts Ray afresh."""
    import ray

    from sweeps.cli import build_parser
    from sweeps.plan.prepare import prepare
    from sweeps.run import execute
    from sweeps.tune import driver

    ship_by_value()
    with open(log, "a") as out, contextlib.redirect_stdout(out):
        plan = prepare(build_parser().parse_args(argv))
        try:
            driver.init_ray(None, num_cpus=ray_cpus)  # ray_cpus: declared, whatever the machine has
            execute(plan, trainable=trainable)
        finally:
            ray.shutdown()
    return plan


def bare_tune(plan, trials: int, concurrent: int | None, log: Path, reuse_actors: bool = True,
              json_only: bool = False, trainable=trivial, ray_cpus: int | None = None) -> Path:
    """Sweep ``trivial`` with a bare ``tune.Tuner``: the plan's resources, concurrency and
    param space, actor reuse as the platform has it unless told otherwise (Tune's default
    is off), and the platform's way of starting Ray; no search algorithm, scheduler,
    callbacks or MLflow. Tune's default loggers (JSON, CSV, TensorBoard) write the results,
    or with ``json_only`` the JSON one alone, as in the platform. Returns the sweep's folder."""
    import ray
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    from sweeps.tune import driver

    ship_by_value()
    name = f"bare-{time.time_ns()}"
    with open(log, "a") as out, contextlib.redirect_stdout(out):
        try:
            driver.init_ray(None, num_cpus=ray_cpus)
            trainable = tune.with_resources(tune.with_parameters(trainable, data=plan.data), plan.resources)
            tuner = tune.Tuner(trainable, param_space=driver.param_space(plan.space),
                               tune_config=tune.TuneConfig(num_samples=trials, max_concurrent_trials=concurrent,
                                                           reuse_actors=reuse_actors),
                               run_config=tune.RunConfig(name=name, storage_path=plan.storage, verbose=1,
                                                         callbacks=[JsonLoggerCallback()] if json_only else None))
            with driver.json_results_only() if json_only else contextlib.nullcontext():
                tuner.fit()
        finally:
            ray.shutdown()
    return Path(plan.storage) / name


def as_command(argv: list[str], work: Path, log: Path) -> tuple[float, float]:
    """Run ``sweeps/run.py`` as a user would; returns (launch time, wall time)."""
    with open(log, "w") as out:
        started = time.time()
        proc = subprocess.run([sys.executable, str(ROOT / "sweeps" / "run.py"), *argv], cwd=work,
                              stdout=out, stderr=subprocess.STDOUT)
        wall = time.time() - started
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"the benchmark sweep exited with {proc.returncode}:\n{tail}")
    return started, wall


def trial_results(sweep_dir: str | Path) -> list[list[dict]]:
    """Every trial's reported results in order, from Ray Tune's ``result.json`` files."""
    return [[json.loads(line) for line in f.read_text().splitlines() if line.strip()]
            for f in sorted(Path(sweep_dir).glob("*/result.json"))]


def run_times(uri: str, experiment: str, sweep: str) -> tuple[float, list[tuple[float, float]]]:
    """The sweep's MLflow parent run start and its trials' (start, end), in epoch seconds:
    when Ray Tune started the trial and when it ended, which the driver stamps on the writes."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.`ftsweep.sweep` = '{sweep}'", max_results=10000)
    parent = [r.info.start_time / 1000 for r in runs if r.data.tags.get("ftsweep.role") == "parent"]
    trials = [(r.info.start_time / 1000, r.info.end_time / 1000) for r in runs
              if r.data.tags.get("ftsweep.role") == "trial" and r.info.end_time]
    return parent[0], trials


def measure_decodes(args, work: Path):
    """A sweep of ``--decode-trials`` trials, one epoch each, on an empty cache folder;
    returns its plan (whose data handle the other measurements reuse) and the figures."""
    from trainables import data

    if any((work / "cache").glob("decoded/*/meta.json")):
        raise RuntimeError(f"{work / 'cache'} already holds decoded images: decodes need an empty cache")
    before = data.DECODE_COUNT
    plan = in_process(sweep_argv(args, work, "decodes", args.decode_trials, 1), work / "decodes.log")
    driver = data.DECODE_COUNT - before
    results = [r for r in trial_results(plan.sweep_dir) if r]
    in_trials = sum(int(r[-1]["decodes_in_trial"]) for r in results)
    images = len(plan.data.dataset)
    return plan, {"decodes_per_image": (driver + in_trials) / images,
                  "decodes": {"driver": driver, "in_trials": in_trials, "images": images,
                              "trials": len(results)}}


def measure_sweep(args, work: Path, train_images: int) -> dict:
    """Startup and summed training throughput of the real command, on the warm cache."""
    name = "throughput"
    started, wall = as_command(sweep_argv(args, work, name, args.trials, args.epochs), work,
                               work / "throughput.log")
    results = [r for r in trial_results(work / "sweeps" / name) if r]
    parent_start, spans = run_times(tracking_uri(work), "bench", name)
    first_start, fit_s = min(s for s, _ in spans), fit_phase(spans)
    epochs = sum(int(r[-1]["epoch"]) for r in results)
    epoch_s = sum(row["epoch_s"] for r in results for row in r)
    first_step = min(r[0]["first_step_time"] for r in results)
    return {
        "sweep_img_per_s": epochs * train_images / fit_s,
        "startup_s": first_step - started,
        # seconds from the launch until: the sweep's MLflow run exists, Tune starts the
        # first trial (its actor is up), that trial takes its first optimizer step
        "startup_milestones_s": {"sweep_run_created": parent_start - started,
                                 "first_trial_started": first_start - started,
                                 "first_step": first_step - started},
        "sweep": {"trials": len(results), "trial_epochs": epochs, "train_images": epochs * train_images,
                  "fit_s": fit_s, "command_wall_s": wall, "concurrent": lanes(args),
                  # time the trials spent in their epochs' train and val loops, per lane
                  "lane_busy_fraction": epoch_s / (lanes(args) * fit_s),
                  "in_epoch_img_per_s": lanes(args) * epochs * train_images / epoch_s}}


def measure_overhead(args, work: Path, rounds: int = 2) -> dict:
    """Wall time per trial of work-free sweeps, the platform's and bare Ray Tune's. They
    alternate, ``rounds`` times, and each keeps its lowest: other load on the machine only
    ever adds time."""
    n, experiment = args.overhead_trials, "bench-overhead"
    _create_experiment(tracking_uri(work), experiment)  # once, outside the timed sweeps
    per: dict[str, list[float]] = {"platform": [], "bare": [], "bare_json_only": [],
                                   "platform_mlflow_complete": []}
    for i in range(rounds):
        argv = sweep_argv(args, work, f"overhead-{i}", n, 1, experiment)
        plan = in_process(argv, work / "overhead.log", trivial)
        results = trial_results(plan.sweep_dir)
        per["platform"].append(per_trial(results, lanes(args)))
        # MLflow's writes trail the trials: the pace up to the moment MLflow held them all
        done_at = json.loads((Path(plan.sweep_dir) / "sweep_summary.json").read_text())["mlflow_done_at"]
        first = min(r[0]["started"] for r in results if r)
        per["platform_mlflow_complete"].append((done_at - first) / (n - lanes(args)))
        bare = bare_tune(plan, n, lanes(args), work / "overhead.log")
        per["bare"].append(per_trial(trial_results(bare), lanes(args)))
        bare = bare_tune(plan, n, lanes(args), work / "overhead.log", json_only=True)
        per["bare_json_only"].append(per_trial(trial_results(bare), lanes(args)))
    # For scale: Tune as it comes starts a new actor per trial. Few trials: each costs seconds.
    few = min(n, 2 * lanes(args) + 4)
    default = bare_tune(plan, few, lanes(args), work / "overhead.log", reuse_actors=False)
    return {"overhead_per_trial_s": min(per["platform"]), "bare_ray_overhead_per_trial_s": min(per["bare"]),
            "overhead_mlflow_complete_per_trial_s": min(per["platform_mlflow_complete"]),
            "bare_ray_json_only_overhead_per_trial_s": min(per["bare_json_only"]),
            "bare_ray_default_overhead_per_trial_s": per_trial(trial_results(default), lanes(args)),
            "overhead": {"trials": n, "concurrent": lanes(args), "per_trial_s": per,
                         "default_trials": few}}


def measure_rampup(args, work: Path, lanes_: int = 16, sleep_s: float = 30.0, rounds: int = 1) -> dict:
    """Seconds from the first trial's start until ``lanes_`` run at once, on a Ray node that
    declares ``lanes_`` CPUs: a sweep of the platform (TPE, ASHA, no --max-concurrent) and a
    bare Ray Tune loop over random search (which starts every trial at once), both of
    ``sleeper(sleep_s)`` with the same data parameter and 1 CPU per trial; ``sleep_s`` must
    be longer than the lanes take to fill. They alternate ``rounds`` times and each keeps
    its lowest: other load on the machine only ever adds time."""
    per: dict[str, list[float]] = {"platform": [], "bare": []}
    for _ in range(rounds):
        argv = sweep_argv(args, work, f"rampup-{time.time_ns()}", lanes_, 1, "bench-rampup",
                          cpus_per_trial=1, max_concurrent=False)
        plan = in_process(argv, work / "rampup.log", sleeper(sleep_s), ray_cpus=lanes_)
        per["platform"].append(rampup(trial_results(plan.sweep_dir), lanes_))
        bare = bare_tune(plan, lanes_, None, work / "rampup.log", json_only=True, trainable=sleeper(sleep_s),
                         ray_cpus=lanes_)
        per["bare"].append(rampup(trial_results(bare), lanes_))
    out = {"rampup_s": min(per["platform"]), "bare_random_rampup_s": min(per["bare"])}
    out["rampup"] = {"lanes": lanes_, "sleep_s": sleep_s, "per_round_s": per,
                     "ratio": out["rampup_s"] / out["bare_random_rampup_s"]}
    return out


def rampup(results: list[list[dict]], lanes_: int) -> float:
    """From the first trial's start to the moment ``lanes_`` trials run at once: the
    lanes_-th start, provided none had ended by then."""
    spans = sorted((r[0]["started"], r[0]["ended"]) for r in results if r)
    if len(spans) < lanes_:
        raise ValueError(f"{len(spans)} trials started: need {lanes_}")
    last_start = spans[lanes_ - 1][0]
    if min(end for _, end in spans[:lanes_]) < last_start:
        raise ValueError(f"{lanes_} trials were never running at once: let them sleep longer")
    return last_start - spans[0][0]


def per_trial(results: list[list[dict]], concurrent: int) -> float:
    """Seconds per trial at the pace trials start: the first ``concurrent`` start at once,
    each later one when a running trial has ended and the next has been set up."""
    starts = sorted(r[0]["started"] for r in results if r)
    if len(starts) <= concurrent:
        raise ValueError(f"{len(starts)} trials started: need more than the {concurrent} run at once")
    return (starts[-1] - starts[0]) / (len(starts) - concurrent)


def fit_phase(spans: list[tuple[float, float]]) -> float:
    """From the first trial's start to the last trial's end."""
    return max(end for _, end in spans) - min(start for start, _ in spans)


def _create_experiment(uri: str, name: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    if client.get_experiment_by_name(name) is None:
        client.create_experiment(name)
