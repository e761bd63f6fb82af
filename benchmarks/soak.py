"""Soak check: run a long sweep of short trials and prove every trial is accounted for once.

    python benchmarks/soak.py --trials 50 --out soak.json

Runs ``sweeps/run.py`` as a subprocess (on the embedded demo by default), samples the
memory of its whole process tree (driver, Ray, trials) while it runs, then checks the
summary against MLflow: one child run per trial, each with an outcome and a val_acc
history without repeated epochs. Exits 1 when anything is missing or counted twice.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run(trials: int, extra: list[str], workdir: Path) -> dict:
    uri = f"sqlite:///{workdir}/mlflow.db"
    cmd = [sys.executable, str(ROOT / "sweeps" / "run.py"), "--space", "smoke", "--trials", str(trials),
           "--max-epochs", "2", "--name", "soak", "--tracking-uri", uri,
           "--storage", str(workdir / "results"), *extra]
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]

    def sample():
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(ps))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    sampler.join()
    wall = time.time() - started
    if proc.returncode != 0:
        sys.exit(f"sweep failed ({proc.returncode}):\n{out[-3000:]}")
    summary = json.loads(Path(out.strip().splitlines()[-1]).read_text())
    return {"trials": trials, "wall_s": round(wall, 1), "peak_rss_gib": round(peak[0] / 2**30, 2),
            "summary": summary, "problems": account(summary, uri, trials)}


def account(summary: dict, uri: str, trials: int) -> list[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([summary["experiment_id"]],
                              f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'",
                              max_results=10000)
    problems = []
    if sum(summary["trials"].values()) != trials:
        problems.append(f"summary counts {summary['trials']} for {trials} trials")
    trial_runs = [r for r in runs if r.data.tags.get("ftsweep.role") == "trial"]
    if len(trial_runs) != trials:
        problems.append(f"{len(trial_runs)} trial runs in MLflow for {trials} trials")
    ids = [r.data.tags["ftsweep.trial_id"] for r in trial_runs]
    if len(set(ids)) != len(ids):
        problems.append("a trial has more than one run")
    outcomes = {}
    for r in trial_runs:
        outcome = r.data.tags.get("outcome")
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "val_acc")]
        if steps != list(range(1, len(steps) + 1)):
            problems.append(f"{r.info.run_name}: val_acc steps {steps}")
    if outcomes != {k: v for k, v in summary["trials"].items() if v}:
        problems.append(f"MLflow outcomes {outcomes} differ from the summary {summary['trials']}")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=50, help="number of trials (default 50)")
    p.add_argument("--out", help="write the result as JSON here")
    p.add_argument("extra", nargs="*", help="more run.py arguments, after --")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ftsweep-soak-") as tmp:
        result = run(args.trials, args.extra, Path(tmp))
    s = result["summary"]
    print(f"{args.trials} trials in {result['wall_s']} s, peak memory {result['peak_rss_gib']} GiB; "
          f"{s['trials']}; best val_acc {s['best']['val_acc']:.4f}")
    for problem in result["problems"]:
        print("PROBLEM:", problem)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
