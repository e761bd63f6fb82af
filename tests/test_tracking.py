import json

import pytest
from mlflow.tracking import MlflowClient

from sweeps.plan import UsageError
from sweeps.tracking import Writer, check_tracking_uri, outcome_of, redact


class FlakyClient:
    """Delegates to a real MlflowClient but fails while ``down`` is set."""

    def __init__(self, real):
        self.real, self.down = real, False

    def __getattr__(self, name):
        def call(*args, **kw):
            if self.down:
                raise ConnectionError("server went away")
            return getattr(self.real, name)(*args, **kw)
        return call


def test_writes_queue_while_the_server_is_down_and_land_in_order(tmp_path):
    real = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    exp = real.create_experiment("e")
    client = FlakyClient(real)
    write = Writer(client, spool=tmp_path / "pending.jsonl", retry_s=0)
    write("create", "t1", experiment_id=exp, run_name="r")
    client.down = True
    for step in range(3):
        write("batch", "t1", metrics=[dict(key="val_acc", value=step / 10, timestamp=0, step=step)])
    write("end", "t1", status="FINISHED")
    assert len(write.queue) == 4
    spooled = [json.loads(line) for line in (tmp_path / "pending.jsonl").read_text().splitlines()]
    assert [s["op"] for s in spooled] == ["batch", "batch", "batch", "end"]
    client.down = False
    assert write.flush() and not write.queue
    assert not (tmp_path / "pending.jsonl").exists()
    run_id = write.run_ids["t1"]
    history = real.get_metric_history(run_id, "val_acc")
    assert [m.step for m in history] == [0, 1, 2]
    assert real.get_run(run_id).info.status == "FINISHED"


def test_a_run_that_could_not_be_created_yet_keeps_its_metrics_behind_it(tmp_path):
    real = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    exp = real.create_experiment("e")
    client = FlakyClient(real)
    client.down = True
    write = Writer(client, retry_s=0)
    write("create", "t1", experiment_id=exp, run_name="r")
    write("batch", "t1", metrics=[dict(key="val_acc", value=0.5, timestamp=0, step=1)])
    client.down = False
    write.flush()
    assert real.get_metric_history(write.run_ids["t1"], "val_acc")[0].value == 0.5


def test_unreachable_server_fails_fast_naming_the_uri():
    from conftest import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(UsageError, match=f"{uri} is unreachable"):
        check_tracking_uri(uri, timeout=2)


def test_secrets_never_reach_a_log():
    assert redact("http://alice:s3cret@host:5000/x") == "http://alice:***@host:5000/x"
    assert redact("sqlite:///mlflow.db") == "sqlite:///mlflow.db"


@pytest.mark.parametrize("last, errored, outcome", [
    ({"epoch": 6}, False, "completed"),
    ({"epoch": 2}, False, "stopped_early"),
    ({"epoch": 3, "early_stopped": 1}, False, "stopped_early"),
    ({"epoch": 6}, True, "errored"),
])
def test_outcomes(last, errored, outcome):
    assert outcome_of(last, errored, 6) == outcome
