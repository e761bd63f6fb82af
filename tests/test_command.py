"""The ``ftsweep`` command: installed with the package, each subcommand the script it
stands for (same flags, same help, same exit codes), and the package importable without
the scripts' ``sys.path`` fix."""

import json
import os
import subprocess
import sys
from importlib import import_module, metadata
from pathlib import Path

import pytest

from sweeps import command

from conftest import ROOT

SCRIPTS = {"run": "sweeps/run.py", "submit": "sweeps/tools/submit.py", "report": "dashboards/report.py",
           "predict": "sweeps/tools/predict.py", "export": "sweeps/tools/export.py",
           "register": "sweeps/tools/register.py"}


def installed_command() -> list[str]:
    """The ``ftsweep`` script pip wrote for this interpreter (listed in the package's RECORD),
    else the same entry point through ``python -m``."""
    for f in metadata.distribution("ftsweep").files or []:
        if f.name == "ftsweep" and f.parent.name == "bin" and Path(f.locate()).exists():
            return [str(Path(f.locate()).resolve())]
    return [sys.executable, "-m", "sweeps.command"]


def ftsweep(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([*installed_command(), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_package_installs_the_ftsweep_entry_point():
    (entry,) = metadata.entry_points(group="console_scripts", name="ftsweep")
    assert entry.value == "sweeps.command:main"
    assert entry.load() is command.main


def test_the_onnx_extra_installs_what_onnx_export_imports():
    from packaging.requirements import Requirement

    extras: dict[str, set[str]] = {}
    for line in metadata.requires("ftsweep"):
        req = Requirement(line)
        for extra in ("onnx", "test"):
            if req.marker and req.marker.evaluate({"extra": extra}):
                extras.setdefault(extra, set()).add(req.name)
    assert extras["onnx"] == {"onnx"}
    assert "onnx" in extras["test"]  # the tests export ONNX too


def test_version_is_the_installed_packages(tmp_path):
    proc = ftsweep("--version", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"ftsweep {metadata.version('ftsweep')}"


def test_every_subcommand_is_its_script(tmp_path):
    assert {name: script for name, (_, script, _) in command.COMMANDS.items()} == SCRIPTS
    for name, script in SCRIPTS.items():
        module = import_module(command.COMMANDS[name][0])
        assert Path(module.__file__).resolve() == ROOT / script
        assert callable(module.main)


@pytest.mark.parametrize("name", SCRIPTS)
def test_subcommand_help_is_the_scripts_help(name, capsys):
    module = import_module(command.COMMANDS[name][0])
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0
    script_help = capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        command.main([name, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out == script_help


def test_installed_run_help_matches_the_script_run_by_path(tmp_path):
    by_command = ftsweep("run", "--help", cwd=tmp_path)
    by_path = subprocess.run([sys.executable, str(ROOT / "sweeps" / "run.py"), "--help"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert by_command.returncode == by_path.returncode == 0, by_command.stderr + by_path.stderr
    assert by_command.stdout == by_path.stdout
    assert "--space" in by_command.stdout


@pytest.mark.parametrize("argv, code, message", [
    (["run", "--space", "nope"], 2, "unknown space 'nope'"),
    (["run", "--space", "smoke", "--no-such-flag"], 2, "unrecognized arguments: --no-such-flag"),
    (["submit", "--space", "smoke"], 2, "after --"),
    (["export", "--run", "x"], 2, "--out"),
    (["predict", "--run", "x", "--out", "p.csv"], 2, "--images"),
])
def test_exit_codes_and_messages_are_the_scripts(argv, code, message, tmp_path):
    by_command = ftsweep(*argv, cwd=tmp_path)
    script = ROOT / SCRIPTS[argv[0]]
    by_path = subprocess.run([sys.executable, str(script), *argv[1:]], cwd=tmp_path, capture_output=True,
                             text=True, timeout=120)
    assert by_command.returncode == by_path.returncode == code, by_command.stderr + by_path.stderr
    assert message in by_command.stderr
    # the same message, but for the program name argparse puts in front of it
    assert by_command.stderr.splitlines()[-1] == by_path.stderr.splitlines()[-1]


@pytest.mark.parametrize("argv, message", [
    ([], "COMMAND"),
    (["train"], "invalid choice: 'train'"),
    (["--", "run"], "the command comes first"),
])
def test_without_a_known_command_it_says_what_there_is_and_exits_2(argv, message, capsys):
    with pytest.raises(SystemExit) as done:
        code = command.main(argv)
        raise SystemExit(code)
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "usage: ftsweep" in err


def test_help_lists_every_subcommand(tmp_path):
    proc = ftsweep("--help", cwd=tmp_path)
    assert proc.returncode == 0
    for name, script in SCRIPTS.items():
        assert f"  {name} " in proc.stdout and script in proc.stdout


def test_the_package_imports_without_the_scripts_path_fix(tmp_path):
    """From another folder, with nothing on PYTHONPATH: the install alone finds every module,
    and importing the scripts as modules leaves sys.path alone."""
    code = f"""
import sys
before = list(sys.path)
import dashboards.report, search_spaces.loader, sweeps.command, sweeps.tools.export, sweeps.tools.predict
import sweeps.run, sweeps.tools.submit, trainables.train
added = [p for p in sys.path if p not in before]  # Ray adds its own third-party folder
assert not [p for p in added if p.startswith({str(ROOT)!r})], added
assert {str(ROOT)!r} not in sys.path
print(sweeps.run.__file__)
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(proc.stdout.strip()) == ROOT / "sweeps" / "run.py"


def test_the_product_does_not_need_the_benchmarks():
    """benchmarks/ measures the product from outside: nothing installed imports it, and the
    benchmark programs live there, not in sweeps/."""
    for package in ("sweeps", "trainables", "dashboards", "search_spaces"):
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            assert "import benchmarks" not in text and "from benchmarks" not in text, path
    for name in ("bench.py", "bench_sweeps.py", "bench_pipeline.py", "gpu_bench.py", "soak.py"):
        assert (ROOT / "benchmarks" / name).is_file() and not (ROOT / "sweeps" / name).exists()


@pytest.mark.slow
def test_ftsweep_run_then_report(tmp_path, image_folder, cache_dir):
    """A real sweep through the installed command, then its report: exit 0, the summary's
    path printed last, and the report written."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = ftsweep("run", "--space", "smoke", "--data", str(image_folder), "--weights", "none",
                   "--image-size", "32", "--trials", "1", "--max-epochs", "1", "--name", "by-command",
                   "--tracking-uri", uri, "--storage", str(tmp_path / "results"), cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(Path(proc.stdout.strip().splitlines()[-1]).read_text())
    assert summary["name"] == "by-command" and summary["trials"]["errored"] == 0

    report = ftsweep("report", "--tracking-uri", uri, "--sweep", "by-command", "--out", str(tmp_path / "r.html"),
                     cwd=tmp_path, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "by-command" in (tmp_path / "r.html").read_text()
    missing = ftsweep("report", "--tracking-uri", uri, "--sweep", "no-such-sweep", cwd=tmp_path, timeout=300)
    assert missing.returncode == 2 and "no-such-sweep" in missing.stderr


def test_a_finished_sweep_says_what_to_do_next_with_its_names():
    from sweeps.run import next_steps

    local = "\n".join(next_steps("s1", "sqlite:///m.db", "7"))
    assert "ftsweep report --tracking-uri sqlite:///m.db --sweep s1" in local
    assert "mlflow ui --backend-store-uri sqlite:///m.db" in local
    assert "http://127.0.0.1:5000/#/experiments/7?workflowType=machine_learning" in local
    assert "ftsweep predict --tracking-uri sqlite:///m.db --run s1" in local
    assert "ftsweep register --tracking-uri sqlite:///m.db --run s1 MODEL_NAME" in local
    served = "\n".join(next_steps("s1", "http://mlflow:5000/", "7"))
    assert "open http://mlflow:5000/#/experiments/7?workflowType=machine_learning" in served
