"""Kill the driver with SIGKILL in the middle of a sweep, run it again with --resume."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import RUN, stop_group

pytestmark = pytest.mark.slow
TRIALS = 6


def child_runs(client, name):
    exp = client.get_experiment_by_name("ftsweep-digits5-9")
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id],
                              f"tags.`ftsweep.sweep` = '{name}' and tags.`ftsweep.role` = 'trial'")


def keep_first_searcher_record(record: Path, early: Path) -> None:
    """Copy the searcher's record files the first time both are there and whole."""
    import pickle

    import ray.cloudpickle as cloudpickle

    files = [*record.glob("search_gen_state-*.json"), *record.glob("searcher-state-*.pkl")]
    if len(files) != 2 or early.exists():
        return
    contents = {f.name: f.read_bytes() for f in files}
    try:
        for content in contents.values():
            cloudpickle.loads(content)
    except (pickle.UnpicklingError, EOFError, ValueError):
        return  # still being copied
    early.mkdir()
    for name, content in contents.items():
        (early / name).write_bytes(content)


def restore_first_searcher_record(record: Path, early: Path) -> tuple[int, int]:
    """Put the kept searcher files back; return the trials they say were suggested and the
    trials the record of the trials lists."""
    import ray.cloudpickle as cloudpickle

    for f in early.iterdir():
        (record / f.name).write_bytes(f.read_bytes())
    state = cloudpickle.loads(next(early.glob("search_gen_state-*.json")).read_bytes())
    trials = json.loads(max(record.glob("experiment_state-*.json")).read_text())["trial_data"]
    return state["counter"], len(trials)


def test_killed_sweep_resumes_without_running_or_logging_anything_twice(tmp_path, cache_dir):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # two lanes, as on a 2-core machine: on a bigger one all six would be suggested at once
    args = [*RUN, "--space", "smoke", "--trials", str(TRIALS), "--max-concurrent", "2", "--name", "nightly",
            "--storage", str(tmp_path / "results"), "--tracking-uri", uri]
    driver = subprocess.Popen(args, cwd=tmp_path, stdout=open(tmp_path / "first.log", "w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    client = MlflowClient(uri)
    record, early = tmp_path / "results" / "nightly", tmp_path / "early"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and driver.poll() is None:
            keep_first_searcher_record(record, early)
            ended = [r for r in child_runs(client, "nightly") if r.data.tags["outcome"] != "running"]
            if len(ended) >= 2:
                break
            time.sleep(0.5)
        assert driver.poll() is None, "the sweep finished before it could be killed"
        os.kill(driver.pid, signal.SIGKILL)  # the driver dies without any cleanup
        killed_at_ms = time.time() * 1000
        driver.wait()
    finally:
        stop_group(driver)  # and the local Ray it started goes with it
    # Ray Tune writes and uploads its record of the trials and of the searcher as separate
    # files, so a kill can leave the searcher's older than the trials' (seen on S3): put
    # back the searcher's first record, from when it had suggested fewer trials.
    suggested, listed = restore_first_searcher_record(record, early)
    assert suggested < listed, (suggested, listed)
    before = {r.data.tags["ftsweep.trial_id"]: r for r in child_runs(client, "nightly")}
    done_before = {t: r for t, r in before.items() if r.data.tags["outcome"] != "running"}
    epochs_before = {t: len(client.get_metric_history(r.info.run_id, "val_acc"))
                     for t, r in done_before.items()}
    assert 2 <= len(done_before) < TRIALS
    parent_before = client.search_runs([before[next(iter(before))].info.experiment_id],
                                       "tags.`ftsweep.role` = 'parent'")

    # What a killed trial's worker left in its scratch folder: the next trials remove it.
    leftover = cache_dir / "scratch" / "wkilled" / "ckpt-x" / "checkpoint.pt"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"\0" * 1000)
    (leftover.parents[1] / ".lock").touch()  # whose worker no longer holds it

    again = subprocess.run([*args, "--resume"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert not leftover.parent.parent.exists()
    left = [p for p in (cache_dir / "scratch").glob("*/*") if p.name != ".lock"]
    assert not left, f"checkpoints on their way to Tune were left behind: {left}"
    summary = json.loads(Path(again.stdout.strip().splitlines()[-1]).read_text())

    # The same parent run continues; every trial is counted once, here and in MLflow.
    assert summary["parent_run_id"] == parent_before[0].info.run_id
    assert sum(summary["trials"].values()) == TRIALS
    after = child_runs(client, "nightly")
    assert len(after) == TRIALS  # runs of trials Tune never recorded are marked abandoned
    assert len({r.data.tags["ftsweep.trial_id"] for r in after}) == TRIALS
    for run in after:
        assert run.data.tags["outcome"] in ("completed", "stopped_early")
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
        assert steps == list(range(1, len(steps) + 1)), (run.info.run_name, steps)
        # the restored sweep still writes the results that a later resume reads
        trial_dir = tmp_path / "results" / "nightly" / f"trial_{run.data.tags['ftsweep.trial_id']}"
        assert len((trial_dir / "result.json").read_text().splitlines()) >= len(steps), run.info.run_name
    # Trials that had finished were not run again.
    for trial_id, run in done_before.items():
        now = client.get_run(run.info.run_id)
        # Its end: as MLflow had it, or, when the kill came between the writes of its outcome
        # and its end, the end the first driver stamped, sent from the spool file on resume.
        assert now.info.end_time == run.info.end_time or (run.info.end_time is None
                                                          and now.info.end_time <= killed_at_ms)
        assert len(client.get_metric_history(run.info.run_id, "val_acc")) == epochs_before[trial_id]
    # ASHA still stops trials after the restart: its rungs and TPE's history came back.
    assert f"{TRIALS}/{TRIALS} trials" in again.stdout
    assert "ASHA: rungs rebuilt from" in again.stdout
    assert summary["trials"]["stopped_early"] >= 1

    # Ray Tune restores the trial count the sweep started with: another --trials is refused.
    more = subprocess.run([*args[:args.index("--trials") + 1], str(TRIALS + 2),
                           *args[args.index("--trials") + 2:], "--resume"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert more.returncode == 2
    assert f"with the {TRIALS} trials it started with, not --trials {TRIALS + 2}" in more.stderr
