"""sweeps/tools/export.py against a real sweep: the exported TorchScript and ONNX models compute
what the checkpoint in the sweep's best/ computes, and carry its classes and preprocessing."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from torchvision.models import get_model

from sweeps.tools.export import build_parser, main

from conftest import DEMO_SWEEP, ROOT, assert_help_documents_every_flag, free_port

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("mlflow_env")]
EXPORT = [sys.executable, str(ROOT / "sweeps" / "tools" / "export.py")]


@pytest.fixture(scope="module")
def sweep(demo_sweep):
    """The shared smoke sweep on the digits demo, logged to sqlite: (summary, tracking URI)."""
    return demo_sweep


@pytest.fixture(scope="module")
def checkpoint(sweep, tmp_path_factory):
    """The best checkpoint loaded as DESIGN.md promises any user can: (model, meta)."""
    summary, uri = sweep
    best = Path(MlflowClient(uri).download_artifacts(summary["parent_run_id"], "best",
                                                     str(tmp_path_factory.mktemp("best"))))
    meta = json.loads((best / "meta.json").read_text())
    model = get_model(meta["model"], num_classes=len(meta["classes"]))
    model.load_state_dict(torch.load(best / "model.pt", weights_only=True))
    return model.eval(), meta


def inputs(meta: dict, n: int = 3) -> torch.Tensor:
    size = meta["image_size"]
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))




def test_torchscript_matches_the_checkpoint(sweep, checkpoint, tmp_path):
    summary, uri = sweep
    model, meta = checkpoint
    out = tmp_path / "models" / "best.pt"  # the folder does not exist yet
    # As a user runs it, and --run by sweep name.
    proc = subprocess.run([*EXPORT, "--tracking-uri", uri, "--run", DEMO_SWEEP, "--format", "torchscript",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out)

    extra = {"meta.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still loads
        scripted = torch.jit.load(str(out), _extra_files=extra)
    x = inputs(meta)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))
    embedded = json.loads(extra["meta.json"])
    assert embedded["run_id"] == summary["parent_run_id"] and embedded["sweep"] == DEMO_SWEEP
    assert {k: embedded[k] for k in meta} == meta
    assert [p.name for p in out.parent.iterdir()] == ["best.pt"]  # no temporary file left


def test_onnx_is_checked_and_matches_the_checkpoint(sweep, checkpoint, tmp_path, capsys):
    onnx = pytest.importorskip("onnx", reason="the onnx package is not installed (pip install onnx)")
    from onnx.reference import ReferenceEvaluator

    summary, uri = sweep
    model, meta = checkpoint
    out = tmp_path / "best.onnx"
    # The format follows from the .onnx suffix.
    assert main(["--tracking-uri", uri, "--run", summary["parent_run_id"], "--out", str(out)]) == 0
    assert "passed onnx.checker" in capsys.readouterr().out

    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    embedded = json.loads({p.key: p.value for p in proto.metadata_props}["ftsweep.meta"])
    assert embedded["classes"] == meta["classes"] and embedded["mean"] == meta["mean"]
    x = inputs(meta)  # a batch of 3, exported with a batch of 1: the batch axis is dynamic
    logits = ReferenceEvaluator(proto).run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), model(x), rtol=1e-4, atol=1e-4)


def test_bad_input_exits_2(sweep, tmp_path, capsys):
    _, uri = sweep
    out = tmp_path / "best.pt"
    cases = [(["--tracking-uri", uri, "--run", "no-such-sweep"], "no sweep named 'no-such-sweep'"),
             (["--tracking-uri", f"http://127.0.0.1:{free_port()}", "--run", "x"], "unreachable"),
             (["--tracking-uri", uri, "--run", DEMO_SWEEP, "--out", str(tmp_path)], "is a folder")]
    for argv, message in cases:
        argv = argv if "--out" in argv else [*argv, "--out", str(out)]
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (argv, err)
    assert not out.exists()


def test_onnx_without_the_onnx_package_exits_2_naming_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx raises ImportError
    out = tmp_path / "best.onnx"
    # Before any MLflow work: the store named here does not even exist.
    assert main(["--tracking-uri", f"sqlite:///{tmp_path}/none.db", "--run", "x", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ONNX export needs the onnx package") and 'pip install -e ".[onnx]"' in err
    assert not out.exists() and not (tmp_path / "none.db").exists()


def test_help_documents_every_flag(capsys):
    assert_help_documents_every_flag(main, build_parser, capsys)
