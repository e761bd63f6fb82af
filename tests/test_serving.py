"""``mlflow models serve -m models:/NAME@champion`` serves the registered best model over HTTP:
images in, the classes and probabilities sweeps/tools/predict.py gives out; a non-image is a 4xx
and the server goes on serving."""

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from test_mlflow_model import logged_sweep, predict_csv

from sweeps.records import registry

from conftest import free_port, stop_group, wait_http, write_image_folder

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("mlflow_env")]


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_served_champion_answers_as_predict_py(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = logged_sweep(uri, tmp_path / "sweep", "served")
    registry.register(uri, "digits", run_id, "fp", 0.5, "served")
    images = sorted(p for p in write_image_folder(tmp_path / "imgs", classes=("a", "b", "c"), per_class=2).rglob("*")
                    if p.is_file())
    expected = predict_csv(uri, "models:/digits@champion", images, tmp_path / "preds.csv")

    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/digits@champion", "--env-manager",
         "local", "--host", "127.0.0.1", "-p", str(port)],
        cwd=tmp_path, env={**os.environ, "MLFLOW_TRACKING_URI": uri}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/ping", timeout=180, proc=proc)
        encoded = [base64.b64encode(p.read_bytes()).decode() for p in images]
        # The scoring server's two DataFrame forms; it decodes their base64 for the binary column.
        for body in [{"dataframe_split": {"columns": ["image"], "data": [[e] for e in encoded]}},
                     {"dataframe_records": [{"image": e} for e in encoded]}]:
            status, answer = post(f"{url}/invocations", body)
            assert status == 200, (list(body), answer)
            rows = answer["predictions"]
            assert len(rows) == len(images)
            for path, row in zip(images, rows, strict=True):
                want = expected[str(path)]
                assert row["prediction"] == max(want, key=want.get)
                assert row["probability"] == pytest.approx(want[row["prediction"]], abs=1e-6)
                assert row["probabilities"] == pytest.approx(want, abs=1e-6)

        not_image = base64.b64encode(b"%PDF-1.4 not an image").decode()
        status, answer = post(f"{url}/invocations",
                              {"dataframe_split": {"columns": ["image"], "data": [[encoded[0]], [not_image]]}})
        assert status == 400, answer
        assert answer["error_code"] == "INVALID_PARAMETER_VALUE"
        assert "row 1: 21 bytes is not a readable image" in answer["message"]
        status, answer = post(f"{url}/invocations", {"dataframe_split": {"columns": ["image"], "data": [["%%%"]]}})
        assert 400 <= status < 500, answer
        # Still serving.
        with urllib.request.urlopen(f"{url}/ping", timeout=10) as r:
            assert r.status == 200
        status, answer = post(f"{url}/invocations", {"dataframe_records": [{"image": encoded[0]}]})
        assert status == 200 and answer["predictions"][0]["prediction"] == max(
            expected[str(images[0])], key=expected[str(images[0])].get)
    finally:
        stop_group(proc)
        log.close()
