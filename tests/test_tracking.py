import json
import os
import queue
import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from sweeps.errors import UsageError
from sweeps.records.tracking import check_tracking_uri, outcome_of, redact
from sweeps.records.writer import MERGE_LOOKBACK, Writer, WriterProcess, pump


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
    client.down = True
    write("create", "t1", experiment_id=exp, run_name="r")
    for step in range(3):
        write("batch", "t1", metrics=[dict(key="val_acc", value=step / 10, timestamp=0, step=step)])
    write("end", "t1", status="FINISHED")
    assert len(write.queue) == 3  # the create, the three epochs merged into one batch, the end
    spooled = [json.loads(line) for line in (tmp_path / "pending.jsonl").read_text().splitlines()]
    assert [s["op"] for s in spooled] == ["create", "batch", "end"]
    assert [m["step"] for m in spooled[1]["metrics"]] == [0, 1, 2]
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


def test_queued_batches_merge_only_within_a_run_and_mlflows_limits():
    write = Writer(client=None)
    metric = dict(key="val_acc", value=0.5, timestamp=0, step=1)
    write.add("create", "a", {})
    write.add("batch", "a", {"params": {"lr": "0.1"}})
    write.add("create", "b", {})
    write.add("batch", "a", {"metrics": [metric]})  # joins a's batch across b's create
    write.add("batch", "b", {"tags": {"outcome": "running"}})
    write.add("end", "a", {"status": "FINISHED"})
    write.add("batch", "a", {"tags": {"late": "1"}})  # after a's end: must not move before it
    assert [(op, key) for op, key, _ in write.queue] == [
        ("create", "a"), ("batch", "a"), ("create", "b"), ("batch", "b"), ("end", "a"), ("batch", "a")]
    assert write.queue[1][2] == {"params": {"lr": "0.1"}, "metrics": [metric], "tags": {}}
    full = Writer(client=None)
    full.add("batch", "a", {"metrics": [metric] * 1000})
    full.add("batch", "a", {"metrics": [metric]})  # over log_batch's 1000 metrics: a new batch
    assert [len(kw["metrics"]) for _, _, kw in full.queue] == [1000, 1]
    far = Writer(client=None)
    far.add("batch", "a", {"metrics": [metric]})
    for i in range(MERGE_LOOKBACK):
        far.add("create", f"t{i}", {})
    far.add("batch", "a", {"metrics": [metric]})  # too far back to look for
    assert len(far.queue) == MERGE_LOOKBACK + 2


def test_writer_process_sends_everything_by_close(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    real = MlflowClient(uri)
    exp = real.create_experiment("e")
    parent = real.create_run(exp).info.run_id
    write = WriterProcess(uri, tmp_path / "pending.jsonl", {"parent": parent})
    assert os.getpgid(write._proc.pid) != os.getpgid(0)  # Ctrl-C to the driver's group misses it
    started, ended = 1_790_000_000_000, 1_790_000_042_000  # the moments the writes describe
    write("create", "t1", experiment_id=exp, run_name="trial-1", tags={"outcome": "running"},
          start_time=started)
    write("batch", "t1", params={"lr": "0.1"}, metrics=[])
    for step in (1, 2, 3):
        write("batch", "t1", metrics=[dict(key="val_acc", value=step / 10, timestamp=0, step=step)])
    write("batch", "t1", metrics=[], tags={"outcome": "completed"})
    write("end", "t1", status="FINISHED", end_time=ended)
    write("end", "parent", status="FINISHED")
    assert write.close() == [] and write.last_error is None
    assert (real.get_run(write.run_ids["t1"]).info.start_time, real.get_run(write.run_ids["t1"]).info.end_time) \
        == (started, ended)
    run = real.get_run(write.run_ids["t1"])
    assert run.data.params == {"lr": "0.1"} and run.data.tags["outcome"] == "completed"
    assert [m.value for m in real.get_metric_history(run.info.run_id, "val_acc")] == [0.1, 0.2, 0.3]
    assert run.info.status == real.get_run(parent).info.status == "FINISHED"
    assert not (tmp_path / "pending.jsonl").exists()


class CountingClient:
    """Records each MLflow call and when it came; creates runs with ids of its own."""

    def __init__(self):
        self.calls: list[tuple[str, float]] = []

    def __getattr__(self, name):
        def call(*args, **kw):
            self.calls.append((name, time.monotonic()))
            return type("Run", (), {"info": type("Info", (), {"run_id": f"r{len(self.calls)}"})})()
        return call


def trial_writes(key: str) -> list[str]:
    """What SweepTracker writes for a trial of one epoch: start, config, epoch, outcome, end."""
    writes = [("create", {"experiment_id": "1", "run_name": key}), ("batch", {"params": {"lr": "0.1"}}),
              ("batch", {"metrics": [dict(key="val_acc", value=0.5, timestamp=0, step=1)]}),
              ("batch", {"tags": {"outcome": "completed"}}), ("end", {"status": "FINISHED"})]
    return [json.dumps({"op": op, "key": key, "kw": kw}) for op, kw in writes]


def test_a_burst_of_trials_takes_three_calls_each():
    lines, client = queue.SimpleQueue(), CountingClient()
    for i in range(10):  # ten short trials whose writes interleave, as concurrent ones do
        for write in trial_writes(f"t{i}"):
            lines.put(write)
    lines.put(None)
    pump(lines, Writer(client))
    assert [name for name, _ in client.calls] == ["create_run", "log_batch", "set_terminated"] * 10


def test_a_write_cut_off_by_a_dying_driver_is_named_and_the_rest_are_sent():
    lines, client = queue.SimpleQueue(), CountingClient()
    writer = Writer(client)
    for write in trial_writes("t1"):
        lines.put(write)
    lines.put(trial_writes("t2")[0][:40])  # the driver was killed while writing this line
    lines.put(None)
    pump(lines, writer)
    assert [name for name, _ in client.calls] == ["create_run", "log_batch", "set_terminated"]
    assert "did not finish" in writer.last_error and '"t2"' in writer.last_error


def test_a_steady_stream_of_writes_is_sent_within_the_delay_bound():
    lines, client = queue.SimpleQueue(), CountingClient()
    writer = Writer(client)
    pumping = threading.Thread(target=pump, args=(lines, writer), kwargs={"quiet_s": 0.05, "max_delay_s": 0.2})
    pumping.start()
    for i in range(200):  # a trial starts every 10 ms: no pause of quiet_s, only the bound sends
        lines.put(trial_writes(f"t{i}")[0])
        time.sleep(0.01)
    stream_end = time.monotonic()
    lines.put(None)
    pumping.join()
    assert len(client.calls) == 200
    assert client.calls[0][1] < stream_end - 1, "the first writes waited for the stream to end"


def test_writer_process_keeps_what_an_unreachable_server_did_not_get(tmp_path, monkeypatch):
    from conftest import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # as SweepTracker sets it: fail fast

    write = WriterProcess(f"http://127.0.0.1:{free_port()}", tmp_path / "pending.jsonl", {"parent": "p" * 32})
    write("batch", "parent", metrics=[dict(key="best_val_acc", value=0.9, timestamp=0, step=0)])
    write("end", "parent", status="FINISHED")
    pending = write.close()
    assert [op for op, _, _ in pending] == ["batch", "end"]
    assert "127.0.0.1" in write.last_error
    spooled = [json.loads(line) for line in (tmp_path / "pending.jsonl").read_text().splitlines()]
    assert [(s["op"], s["run"]) for s in spooled] == [("batch", "p" * 32), ("end", "p" * 32)]


def test_writes_after_the_writer_process_died_are_kept(tmp_path):
    write = WriterProcess(f"sqlite:///{tmp_path}/m.db", tmp_path / "pending.jsonl", {"parent": "p" * 32})
    write._proc.kill()
    write._proc.wait()
    write("end", "parent", status="FINISHED")
    pending = write.close()
    assert pending == [("end", "parent", {"status": "FINISHED"})]
    assert "exited with code -9" in write.last_error
    assert json.loads((tmp_path / "pending.jsonl").read_text())["op"] == "end"


def test_unreachable_server_fails_fast_naming_the_uri():
    from conftest import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(UsageError, match=f"{uri} is unreachable"):
        check_tracking_uri(uri, timeout=2)


def test_secrets_never_reach_a_log():
    assert redact("http://alice:s3cret@host:5000/x") == "http://***@host:5000/x"
    assert redact("https://dapi0123456789abcdef@host/x") == "https://***@host/x"  # a token as the user name
    assert redact("sqlite:///mlflow.db") == "sqlite:///mlflow.db"


@pytest.mark.parametrize("last, errored, outcome", [
    ({"epoch": 6}, False, "completed"),
    ({"epoch": 2}, False, "stopped_early"),
    ({"epoch": 3, "early_stopped": 1}, False, "stopped_early"),
    ({"epoch": 6}, True, "errored"),
])
def test_outcomes(last, errored, outcome):
    assert outcome_of(last, errored, 6) == outcome


def test_a_later_writer_sends_the_spooled_writes_first_and_keeps_them_until_acknowledged(tmp_path):
    real = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    exp = real.create_experiment("e")
    spool = tmp_path / "pending.jsonl"
    client = FlakyClient(real)
    first = Writer(client, spool=spool, retry_s=0)
    first("create", "t1", experiment_id=exp, run_name="r")
    client.down = True
    for step in (1, 2):
        first("batch", "t1", metrics=[dict(key="val_acc", value=step / 10, timestamp=step, step=step)])
    assert [(op, key) for op, key, _ in first.queue] == [("batch", "t1")]
    # the next driver (a --resume) finds the server still down: its writes join the spool
    second = Writer(client, spool=spool, retry_s=0)
    assert second.load_spool() == 1 and second.run_ids == {"t1": first.run_ids["t1"]}
    second("batch", "t1", metrics=[dict(key="val_acc", value=0.3, timestamp=3, step=3)])
    second("end", "t1", status="FINISHED")
    kept = [json.loads(line) for line in spool.read_text().splitlines()]
    assert [(k["op"], k["key"]) for k in kept] == [("batch", "t1"), ("end", "t1")]  # the batches merged
    assert [m["step"] for m in kept[0]["metrics"]] == [1, 2, 3]
    assert not list(tmp_path.glob(".*.tmp"))  # written beside and renamed: never half a file
    client.down = False
    assert second.flush() and not spool.exists()
    history = real.get_metric_history(first.run_ids["t1"], "val_acc")
    assert [m.step for m in history] == [1, 2, 3]


def test_a_spooled_create_that_mlflow_acknowledged_is_not_sent_again(tmp_path):
    real = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    exp = real.create_experiment("e")
    spool = tmp_path / "pending.jsonl"
    write = Writer(real, spool=spool)
    write.queue = [("create", "t1", {"experiment_id": exp, "run_name": "r"}),
                   ("batch", "t1", {"metrics": [dict(key="val_acc", value=0.5, timestamp=0, step=1)]})]
    write._write_spool()
    again = Writer(real, spool=spool)
    again.load_spool()
    again.run_ids["t1"] = run_id = real.create_run(exp).info.run_id  # the driver found it in MLflow
    assert again.flush()
    assert len(real.search_runs([exp])) == 1
    assert real.get_metric_history(run_id, "val_acc")[0].value == 0.5


def test_a_dying_writer_process_adds_to_the_spool_instead_of_overwriting_it(tmp_path):
    spool = tmp_path / "pending.jsonl"
    earlier = Writer(client=None, spool=spool)
    earlier.queue = [("batch", "parent", {"metrics": [dict(key="m", value=1.0, timestamp=0, step=0)]})]
    earlier.run_ids = {"parent": "p" * 32}
    earlier._write_spool()
    write = WriterProcess(f"sqlite:///{tmp_path}/m.db", spool, {"parent": "p" * 32})
    write._proc.kill()
    write._proc.wait()
    write("end", "parent", status="FINISHED")
    write.close()
    assert [json.loads(line)["op"] for line in spool.read_text().splitlines()] == ["batch", "end"]


def test_flush_command_sends_only_the_pending_writes(tmp_path, capsys, monkeypatch):
    from sweeps.records.flush import main

    from conftest import free_port

    uri = f"sqlite:///{tmp_path}/m.db"
    real = MlflowClient(uri)
    exp = real.create_experiment("e")
    sweep = tmp_path / "sweep"
    spool = sweep / "mlflow_pending.jsonl"
    write = Writer(client=None, spool=spool)
    write.queue = [("create", "t1", {"experiment_id": exp, "run_name": "r"}),
                   ("batch", "t1", {"metrics": [dict(key="val_acc", value=v, timestamp=0, step=s)
                                                for s, v in ((1, 0.5), (2, 0.7))]}),
                   ("end", "t1", {"status": "FINISHED"})]
    write._write_spool()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    assert main([str(sweep), "--tracking-uri", f"http://127.0.0.1:{free_port()}"]) == 1
    assert len(spool.read_text().splitlines()) == 3  # nothing acknowledged, nothing removed
    from sweeps.results import storage

    driver = storage.SweepFolder(str(sweep), resume=True)  # a driver resuming the sweep holds it
    assert main([str(sweep), "--tracking-uri", uri]) == 2
    assert "its driver sends the pending writes" in capsys.readouterr().err
    assert len(spool.read_text().splitlines()) == 3
    driver.close()
    assert main([str(sweep), "--tracking-uri", uri]) == 0
    assert "Sent 3 of 3" in capsys.readouterr().out and not spool.exists()
    (run,) = real.search_runs([exp])
    assert [m.value for m in real.get_metric_history(run.info.run_id, "val_acc")] == [0.5, 0.7]
    assert run.info.status == "FINISHED"
    assert main([str(sweep), "--tracking-uri", uri]) == 0  # nothing pending: nothing sent twice
    assert len(real.search_runs([exp])) == 1
