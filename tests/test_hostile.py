"""Hostile input, the way an unlucky or careless user gives it (issue 16): every flag, space
file, storage folder, weights file and tracking URI is handled correctly or refused with
exit 2 and a message naming it, before Ray starts; every fault (a signal, two sweeps at
once) ends with an honest exit status. Hostile image files: tests/test_hostile_images.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import ray

from sweeps.cli import build_parser
from sweeps.errors import UsageError
from sweeps.run import main

from conftest import write_image_folder

# --- helpers for the command line -------------------------------------------------------

def args(*argv: str):
    return build_parser().parse_args(["--space", "smoke", *argv])


@pytest.fixture
def in_tmp(tmp_path, monkeypatch, cache_dir):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def refused(argv: list[str], capsys, *culprits: str) -> str:
    """``main(argv)`` exits 2 naming every culprit; no Ray, no MLflow store, no results."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    for c in culprits:
        assert c in err, err
    assert "Traceback" not in err
    assert not ray.is_initialized()
    assert not Path("mlflow.db").exists() and not Path("sweep_results").exists()
    return err


# --- numbers on the command line --------------------------------------------------------

BAD_FLAGS = [
    (["--time-budget", "-5"], "--time-budget must be > 0 seconds, got -5"),
    (["--time-budget", "0"], "--time-budget must be > 0 seconds, got 0"),
    (["--time-budget", "nan"], "--time-budget must be a finite number, got nan"),
    (["--set", "lr=nan"], "--set lr=nan: lr must be a finite number"),
    (["--set", "lr=inf"], "--set lr=inf: lr must be a finite number"),
    (["--set", "weight_decay=-inf"], "--set weight_decay=-inf: weight_decay must be a finite number"),
    (["--set", "batch_size=1e999"], "--set batch_size=1e999"),
    (["--set", "seed=inf"], "--set seed=inf"),
    (["--max-epochs", "0"], "--max-epochs must be >= 1, got 0"),
    (["--image-size", "0"], "--image-size must be >= 1, got 0"),
    (["--image-size", "-32"], "--image-size must be >= 1, got -32"),
    (["--val-fraction", "0"], "--val-fraction must be between 0 and 1 (exclusive), got 0.0"),
    (["--val-fraction", "1"], "--val-fraction must be between 0 and 1 (exclusive), got 1.0"),
    (["--val-fraction", "-0.2"], "--val-fraction must be between 0 and 1 (exclusive), got -0.2"),
    (["--split-seed", "-1"], "--split-seed must be between 0 and 2**32 - 1, got -1"),
    (["--seed", "-3"], "--seed must be between 0 and 2**32 - 1, got -3"),
    (["--max-concurrent", "0"], "--max-concurrent must be >= 1, got 0"),
    (["--cpus-per-trial", "nan"], "--cpus-per-trial must be a finite number, got nan"),
    (["--gpus-per-trial", "inf"], "--gpus-per-trial must be a finite number, got inf"),
    (["--max-acc-drop", "nan"], "--max-acc-drop must be a finite number, got nan"),
    (["--data", ""], "--data must be a non-empty value, got ''"),
    (["--model", " "], "--model must be a non-empty value, got ' '"),
    (["--experiment", ""], "--experiment must be a non-empty value, got ''"),
    (["--name", ""], "--name must be a non-empty value, got ''"),
    (["--weights", ""], "--weights must be a non-empty value, got ''"),
    (["--tracking-uri", "foo://bar"], "--tracking-uri foo://bar: MLflow has no tracking store for 'foo://'"),
]


@pytest.mark.parametrize(("flags", "message"), BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_a_number_no_sweep_can_use_is_refused_naming_the_flag(in_tmp, capsys, flags, message):
    refused(["--space", "smoke", *flags], capsys, message)


# --- space files ------------------------------------------------------------------------

LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(8)) + \
    "description: *i\n"

SPACE_FILES = {
    "laughs.yaml": (LAUGHS, "more than 10000 values once its YAML aliases are expanded"),
    "loop.yaml": ("description: &x [*x]\n", "more than 10000 values"),
    "list.yaml": ("- lr\n- decay_power\n", "expected a mapping at the top level, got list"),
    "scalar.yaml": ("just words\n", "expected a mapping at the top level, got str"),
    "empty.yaml": ("", "expected a mapping at the top level, got NoneType"),
    "deep.yaml": ("[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    "nan.yaml": ("fixed: {lr: .nan}\n", "fixed: lr must be a finite number, got nan"),
    "inf.yaml": ("search:\n  lr: {type: uniform, low: 0.1, high: .inf}\n", "lr must be a finite number"),
    "huge.yaml": ("fixed: {batch_size: 1e999}\n", "batch_size"),
}


@pytest.mark.parametrize("name", sorted(SPACE_FILES))
def test_a_space_file_no_sweep_can_use_is_refused_naming_it(in_tmp, capsys, name):
    text, message = SPACE_FILES[name]
    (in_tmp / name).write_text(text)
    refused(["--space", str(in_tmp / name)], capsys, str(in_tmp / name), message)


def test_a_billion_laughs_file_is_small_and_refused_without_expanding(in_tmp, capsys):
    import resource

    assert len(LAUGHS) < 1024
    (in_tmp / "laughs.yaml").write_text(LAUGHS)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    refused(["--space", str(in_tmp / "laughs.yaml")], capsys, "laughs.yaml")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: no gigabytes


def test_a_folder_or_a_binary_file_as_space_is_refused_naming_it(in_tmp, capsys):
    (in_tmp / "spaces.yaml").mkdir()
    refused(["--space", str(in_tmp / "spaces.yaml")], capsys, f"--space {in_tmp / 'spaces.yaml'}: a folder")
    (in_tmp / "blob.yaml").write_bytes(bytes(range(256)) * 4)
    refused(["--space", str(in_tmp / "blob.yaml")], capsys, f"{in_tmp / 'blob.yaml'}: not a text file")


def test_a_space_file_may_still_use_a_few_aliases(in_tmp):
    from search_spaces.loader import load_space

    (in_tmp / "ok.yaml").write_text("fixed: &f {max_epochs: 2}\nsearch:\n"
                                    "  lr: &r {type: uniform, low: 0.01, high: 0.1}\n")
    assert load_space(str(in_tmp / "ok.yaml")).fixed == {"max_epochs": 2}


# --- --storage --------------------------------------------------------------------------

def test_storage_that_is_a_file_is_refused(in_tmp, capsys):
    (in_tmp / "taken").write_text("x")
    refused(["--space", "smoke", "--storage", "taken"], capsys, "--storage taken", "is a file, not a folder")


def test_storage_under_a_file_cannot_be_created(in_tmp, capsys):
    (in_tmp / "taken").write_text("x")
    refused(["--space", "smoke", "--storage", "taken/results"], capsys, "--storage taken/results",
            f"cannot create it, {in_tmp / 'taken'} is a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_storage_without_permission_is_refused(in_tmp, capsys):
    (in_tmp / "locked").mkdir(mode=0o500)
    refused(["--space", "smoke", "--storage", "locked/results"], capsys, "--storage locked/results",
            "not writable")


# --- signals ----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize(("signame", "code", "said"), [("SIGINT", 130, "Ctrl-C"), ("SIGTERM", 143, "SIGTERM")])
def test_ctrl_c_or_sigterm_during_a_sweep_is_not_a_success(tmp_path, cache_dir, signame, code, said):
    """SIGINT (Ctrl-C) or SIGTERM mid-sweep: exit 128 + the signal, the parent run KILLED (not
    FINISHED) with how to go on in its stop_reason, the running trials counted as interrupted
    (not stopped early), the summary and the last words say it was interrupted and how to go on."""
    import contextlib
    import json
    import signal
    import subprocess
    import time

    from conftest import RUN, stop_group

    data = write_image_folder(tmp_path / "images")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    log = tmp_path / "driver.log"
    driver = subprocess.Popen(
        # one trial: with two, ASHA may stop the worse one at its first rung before the signal
        [*RUN, "--space", "smoke", "--trials", "1", "--max-epochs", "500", "--image-size", "16",
         "--weights", "none", "--data", str(data), "--name", "cut", "--tracking-uri", uri,
         "--storage", str(tmp_path / "results")],
        cwd=tmp_path, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        results = tmp_path / "results" / "cut"
        while time.monotonic() < deadline and driver.poll() is None:
            if any(f.stat().st_size for f in results.glob("trial_*/result.json")):
                break  # a trial has reported an epoch
            time.sleep(0.5)
        assert driver.poll() is None, log.read_text()[-3000:]
        os.kill(driver.pid, getattr(signal, signame))
        rc = driver.wait(300)
    finally:
        stop_group(driver)
    out = log.read_text()
    assert rc == code, out[-3000:]
    assert f"INTERRUPTED ({said})" in out and "--resume --name cut" in out
    summary = json.loads((results / "sweep_summary.json").read_text())
    assert summary["interrupted"]["signal"] == signame and "--resume" in summary["interrupted"]["resume"]
    import sqlite3  # read the store directly: one test process's MLflow clients cache stores

    assert summary["trials"]["interrupted"] >= 1 and summary["trials"]["stopped_early"] == 0
    with contextlib.closing(sqlite3.connect(tmp_path / "mlflow.db")) as db:
        status = db.execute("select status from runs where run_uuid = ?", (summary["parent_run_id"],)).fetchall()
        reason = db.execute("select value from tags where run_uuid = ? and key = 'stop_reason'",
                            (summary["parent_run_id"],)).fetchall()
    assert status == [("KILLED",)]
    assert reason == [(f"interrupted by {signame}; to continue, run the same command with --resume --name cut",)]


# --- weights, credentials, two sweeps at once -------------------------------------------

def test_a_folder_as_weights_is_refused_as_a_folder(in_tmp, capsys):
    data = write_image_folder(in_tmp / "images")
    (in_tmp / "weights").mkdir()
    refused(["--space", "smoke", "--data", str(data), "--image-size", "16", "--weights", str(in_tmp / "weights")],
            capsys, str(in_tmp / "weights"), "is a folder; --weights takes a state_dict file")


@pytest.fixture
def basic_auth_server():
    """A loopback server that answers MLflow's /health and get-experiment-by-name only to
    the user ``alice`` with password ``s3cret`` (HTTP basic authentication); it records
    the Authorization header of every request."""
    import base64
    import http.server
    import json
    import threading

    seen: list[str | None] = []
    good = "Basic " + base64.b64encode(b"alice:s3cret").decode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append(self.headers.get("Authorization"))
            if self.headers.get("Authorization") != good:
                self.send_response(401)
                self.end_headers()
                return
            body = b"OK" if self.path == "/health" else json.dumps(
                {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no such experiment"}).encode()
            self.send_response(200 if self.path == "/health" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], seen, good
    server.shutdown()


def test_credentials_in_the_tracking_uri_are_sent_not_taken_for_an_unreachable_server(basic_auth_server):
    from mlflow.tracking import MlflowClient

    from sweeps.records.tracking import check_tracking_uri

    port, seen, good = basic_auth_server
    check_tracking_uri(f"http://alice:s3cret@127.0.0.1:{port}", timeout=5)  # reachable: no error
    assert seen[-1] == good
    with pytest.raises(UsageError, match=r"http://\*\*\*@127\.0\.0\.1:\d+ refused the credentials \(HTTP 401\)"):
        check_tracking_uri(f"http://alice:wrong@127.0.0.1:{port}", timeout=5)
    # MLflow's own client sends them the same way
    assert MlflowClient(f"http://alice:s3cret@127.0.0.1:{port}").get_experiment_by_name("x") is None
    assert seen[-1] == good


def test_a_token_given_as_the_user_name_is_never_printed(in_tmp, capsys, basic_auth_server):
    port, _, _ = basic_auth_server
    token = "dapi5f3c0ffee5f3c0ffee5f3c0ffee"
    out = refused(["--space", "smoke", "--tracking-uri", f"http://{token}@127.0.0.1:{port}"], capsys,
                  f"http://***@127.0.0.1:{port}", "refused the credentials")
    assert token not in out


def test_the_mlflow_writer_never_sees_the_uri_on_its_command_line_and_leaves_no_temp_file(tmp_path, monkeypatch):
    import tempfile

    from sweeps.records.writer import WriterProcess

    shared_tmp = tmp_path / "tmp"
    shared_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(shared_tmp))
    uri = f"sqlite:///{tmp_path}/secret-place.db"
    write = WriterProcess(uri, tmp_path / "pending.jsonl", {})
    try:
        cmdline = Path(f"/proc/{write._proc.pid}/cmdline").read_bytes().decode()
        assert "secret-place" not in cmdline
    finally:
        assert write.close() == []
    assert list(shared_tmp.iterdir()) == []


def test_a_remote_sweep_keeps_its_scratch_files_in_the_users_cache_not_in_a_shared_temp_folder(tmp_path, monkeypatch):
    from sweeps.results import storage

    monkeypatch.setenv("FTSWEEP_CACHE", str(tmp_path / "cache"))
    folder = storage.SweepFolder(f"file://{tmp_path}/bucket/s1")
    assert folder.local.is_relative_to(tmp_path / "cache")
    assert folder.local.stat().st_mode & 0o077 == 0  # the owner's alone
    (folder.local / "sweep_summary.json").write_text("{}")
    (tmp_path / "bucket" / "s1").mkdir(parents=True)  # as Ray Tune makes it
    folder.publish()
    assert (tmp_path / "bucket" / "s1" / "sweep_summary.json").exists() and not folder.local.exists()


def test_one_sweep_name_is_claimed_by_one_driver(tmp_path):
    from sweeps.results import storage

    first = storage.SweepFolder(str(tmp_path / "results" / "s"))
    with pytest.raises(storage.SweepTaken, match="exists already"):
        storage.SweepFolder(str(tmp_path / "results" / "s"))  # a new sweep of a taken name
    with pytest.raises(storage.SweepTaken, match="another process is running this sweep now"):
        storage.SweepFolder(str(tmp_path / "results" / "s"), resume=True)  # --resume while it runs
    first.close()  # the first driver ends
    storage.SweepFolder(str(tmp_path / "results" / "s"), resume=True)


def _open_store_at_once(uri: str, n: int) -> list[int]:
    import subprocess
    import sys

    code = "import sys; from sweeps.records.tracking import client; client(sys.argv[1]).get_experiment_by_name('x')"
    procs = [subprocess.Popen([sys.executable, "-c", code, uri], stderr=subprocess.PIPE) for _ in range(n)]
    return [p.wait(120) for p in procs]


@pytest.mark.slow
def test_two_sweeps_opening_a_new_sqlite_store_at_the_same_moment_both_work(tmp_path):
    """MLflow creates a new sqlite store's schema on first use; two processes doing it at
    once crash one of them (alembic's "expected to match one row") without the lock."""
    for i in range(3):
        assert _open_store_at_once(f"sqlite:///{tmp_path}/m{i}.db", 2) == [0, 0]


@pytest.mark.slow
def test_two_sweeps_of_one_name_started_together_run_once(tmp_path, cache_dir):
    """Both pass the name check before either has a run; the folder claim lets one run and
    stops the other with exit 2 before it logs anything."""
    import subprocess

    from conftest import RUN

    data = write_image_folder(tmp_path / "images")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = [*RUN, "--space", "smoke", "--trials", "1", "--max-epochs", "1", "--image-size", "16",
            "--weights", "none", "--data", str(data), "--name", "twin", "--tracking-uri", uri,
            "--storage", str(tmp_path / "results")]
    procs = [subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    refused_out = outs[[p.returncode for p in procs].index(2)]
    assert "--name twin" in refused_out and "Traceback" not in refused_out
    import contextlib
    import sqlite3

    with contextlib.closing(sqlite3.connect(tmp_path / "mlflow.db")) as db:
        parents = db.execute("select count(*) from tags where key = 'ftsweep.role' and value = 'parent'").fetchone()
    assert parents == (1,)


@pytest.mark.parametrize("fault", [KeyboardInterrupt, RuntimeError])
def test_ctrl_c_or_a_failed_ray_start_while_the_checks_run_opens_no_sweep(in_tmp, monkeypatch, capsys, fault):
    """Ray starts while the slower checks run beside it; when its start is interrupted
    (Ctrl-C: exit 130) or fails, the checks end and no sweep is opened (no MLflow run, no
    claimed name)."""
    import time

    import sweeps.run
    import sweeps.tune.ray_session

    opened = []

    def slow_checks(args, checked):
        checked()  # the quick checks passed: Ray starts now
        time.sleep(1)
        return "plan"

    def ray_start(address, **options):
        raise fault("Ray did not start")

    monkeypatch.setattr(sweeps.run, "prepare", slow_checks)
    monkeypatch.setattr(sweeps.tune.ray_session, "init_ray", ray_start)
    monkeypatch.setattr(sweeps.run, "open_sweep", opened.append)
    if fault is KeyboardInterrupt:
        assert main(["--space", "smoke"]) == 130
        assert "INTERRUPTED (Ctrl-C) before the sweep started" in capsys.readouterr().err
    else:
        with pytest.raises(RuntimeError, match="Ray did not start"):
            main(["--space", "smoke"])
    assert opened == [] and not ray.is_initialized()
