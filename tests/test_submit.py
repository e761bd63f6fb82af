"""sweeps/tools/submit.py without a cluster: argument checks, the job's runtime env, the token.

The submission itself, against a real token-authenticated cluster, is in test_cluster.py.
"""

import json
import os
import subprocess
import sys
import zipfile

import pytest

from sweeps.tools import submit
from sweeps.tools.submit import EXCLUDES, SubmitError, check_run_args, runtime_env

from conftest import ROOT, free_port

SUBMIT = [sys.executable, str(ROOT / "sweeps" / "tools" / "submit.py")]
GOOD = ["--space", "smoke", "--storage", "/shared/sweeps", "--tracking-uri", "http://mlflow:5000"]


def _with(**flags) -> list[str]:
    """GOOD with some flags replaced or added."""
    args = dict(zip(GOOD[::2], GOOD[1::2], strict=True))
    args.update({f"--{k.replace('_', '-')}": v for k, v in flags.items()})
    return [x for pair in args.items() for x in pair]


@pytest.mark.parametrize("flags, culprit", [
    ({"storage": "sweep_results"}, "--storage sweep_results"),
    ({"storage": "results/here"}, "--storage results/here"),
    ({"tracking_uri": "sqlite:///mlflow.db"}, "--tracking-uri sqlite:///mlflow.db"),
    ({"tracking_uri": "mlruns"}, "--tracking-uri mlruns"),
    ({"tracking_uri": "file:mlruns"}, "--tracking-uri file:mlruns"),
    ({"data": "data/flowers"}, "--data data/flowers"),
    ({"weights": "backbone.pt"}, "--weights backbone.pt"),
    ({"space": "../spaces/mine.yaml"}, "--space ../spaces/mine.yaml"),
])
def test_paths_that_mean_something_else_on_the_cluster_are_refused(flags, culprit):
    with pytest.raises(SubmitError, match="cannot run this sweep on a cluster") as e:
        check_run_args(_with(**flags))
    assert culprit in str(e.value)


def test_the_default_storage_is_refused_too():
    args = ["--space", "smoke", "--tracking-uri", "http://mlflow:5000"]
    with pytest.raises(SubmitError, match="--storage sweep_results"):
        check_run_args(args)


@pytest.mark.parametrize("flags", [
    {},
    {"storage": "s3://bucket/sweeps?region=eu-west-1"},
    {"storage": "file:///shared/sweeps"},
    {"tracking_uri": "sqlite:////shared/mlflow.db"},
    {"tracking_uri": "file:///shared/mlruns"},
    {"tracking_uri": "databricks"},
    {"data": "/shared/data/flowers", "weights": "imagenet"},
    {"weights": "/shared/weights/resnet50.pth"},
    {"space": "search_spaces/smoke.yaml"},  # inside the project: shipped with it
])
def test_cluster_paths_and_project_files_are_accepted(flags):
    args = check_run_args(_with(**flags))
    assert args.space == flags.get("space", "smoke")


def test_run_args_must_follow_a_double_dash(capsys):
    assert submit.main(["--address", "http://head:8265", "--space", "smoke"]) == 2
    assert "after --" in capsys.readouterr().err


def test_a_mistyped_run_flag_fails_before_anything_is_sent(capsys):
    with pytest.raises(SystemExit) as e:
        submit.main(["--address", "http://127.0.0.1:1", "--", *GOOD, "--trails", "2"])
    assert e.value.code == 2
    assert "unrecognized arguments: --trails 2" in capsys.readouterr().err


def test_address_is_required(monkeypatch, capsys):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert submit.main(["--", *GOOD]) == 2
    assert "--address is required" in capsys.readouterr().err


def test_runtime_env_ships_the_project_with_the_sweeps_environment():
    env = runtime_env(["FTSWEEP_CACHE=/local/ftsweep", "TORCH_HOME=/shared/torch"], pip=False)
    assert env["working_dir"] == str(ROOT)
    assert {".git", "sweep_results", "mlruns", "mlflow.db", "__pycache__", ".cache"} <= set(env["excludes"])
    assert env["env_vars"] == {"FTSWEEP_CACHE": "/local/ftsweep", "TORCH_HOME": "/shared/torch"}
    assert "pip" not in env
    with pytest.raises(SubmitError, match="--env expects KEY=VALUE"):
        runtime_env(["FTSWEEP_CACHE"], pip=False)


def test_pip_installs_the_projects_own_dependencies():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+, as --pip itself
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert runtime_env([], pip=True)["pip"] == deps
    assert any(d.startswith("torch") for d in deps)


def test_results_and_caches_stay_out_of_the_uploaded_package(tmp_path):
    """Ray's own packager with our excludes: what a job's working directory would hold."""
    from ray._private.runtime_env.packaging import create_package

    project = tmp_path / "project"
    for rel in ["sweeps/run.py", "search_spaces/smoke.yaml", "cluster/slurm/sweep.sbatch",
                "sweep_results/s1/sweep_summary.json", "mlruns/0/meta.yaml", "mlflow.db", ".git/HEAD",
                "sweeps/__pycache__/run.cpython-311.pyc", "ftsweep.egg-info/PKG-INFO",
                ".cache/ftsweep/decoded/x.npy", ".venv/bin/python"]:
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_text("x")
    package = tmp_path / "package.zip"
    create_package(str(project), package, include_gitignore=True, excludes=EXCLUDES)
    files = {n for n in zipfile.ZipFile(package).namelist() if not n.endswith("/")}
    assert files == {"sweeps/run.py", "search_spaces/smoke.yaml", "cluster/slurm/sweep.sbatch"}


def _without_auth() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}


def _auth_headers_in(env: dict) -> dict:
    """auth_headers() in a fresh process: Ray's token loader caches what it read first."""
    code = ("import json\nfrom sweeps.tools.submit import SubmitError, auth_headers\n"
            "try:\n    h, s = auth_headers(); print(json.dumps({'headers': h, 'source': s}))\n"
            "except SubmitError as e:\n    print(json.dumps({'error': str(e)}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**_without_auth(), **env},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_token_is_read_where_ray_reads_it_in_rays_order(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home")
    token_file = tmp_path / "token"
    token_file.write_text("from-file")

    got = _auth_headers_in({"HOME": str(home), "RAY_AUTH_TOKEN": "from-env",
                            "RAY_AUTH_TOKEN_PATH": str(token_file)})
    assert got == {"headers": {"authorization": "Bearer from-env"}, "source": "RAY_AUTH_TOKEN"}
    got = _auth_headers_in({"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(token_file)})
    assert got == {"headers": {"authorization": "Bearer from-file"},
                   "source": f"RAY_AUTH_TOKEN_PATH ({token_file})"}
    got = _auth_headers_in({"HOME": str(home)})
    assert got == {"headers": {"authorization": "Bearer from-home"}, "source": "~/.ray/auth_token"}
    assert _auth_headers_in({"HOME": str(tmp_path)}) == {"headers": {}, "source": None}


def test_an_unreadable_token_file_is_named(tmp_path):
    got = _auth_headers_in({"HOME": str(tmp_path), "RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})
    assert "cannot read the Ray token" in got["error"] and str(tmp_path / "missing") in got["error"]


def test_an_unreachable_cluster_exits_2(tmp_path):
    address = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.run([*SUBMIT, "--address", address, "--", *GOOD], cwd=tmp_path,
                          env={**_without_auth(), "HOME": str(tmp_path)}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert f"cannot reach the Ray dashboard at {address}" in proc.stderr
