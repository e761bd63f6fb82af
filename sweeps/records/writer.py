"""Every MLflow write of a sweep, in order, retried and never silently dropped.

``Writer`` sends the writes itself. ``WriterProcess`` hands them to a ``Writer`` in a child
process (``python sweeps/records/writer.py``), so Ray Tune's controller loop never waits on the
tracking server or spends its CPU time on it: a write costs the driver a JSON line on a
pipe. The child gathers each burst of writes (at most MAX_DELAY_S) and those that queue up
behind a slow or absent server, merges them into one ``log_batch`` per run, and when the
driver closes it (or dies), sends what is left and keeps anything it still could not send
in the spool file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (the child process): make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# MLflow's limits on one log_batch call
BATCH_LIMITS = {"metrics": 1000, "params": 100, "tags": 100}
MERGE_LOOKBACK = 64  # queued writes searched for a batch of the same run to merge into
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
PIPE_BYTES = 1 << 20
# Training comes first: the writer runs below Ray's workers (niceness 15); its backlog of
# merged batches catches up when the trials are done.
WRITER_NICENESS = 19
# Writes are gathered until they pause for QUIET_S, or for at most MAX_DELAY_S: a burst,
# such as a trial's start, parameters, epochs and end, merges into fewer calls, sent after
# the burst instead of competing with it for the CPU.
QUIET_S = 0.05
MAX_DELAY_S = 0.5


class Writer:
    """Sends MLflow writes in order; keeps them queued while the server is unreachable.

    Runs are named by a key ("parent" or a trial id) and created lazily, so a trial whose
    child run could not be created yet still keeps its metrics queued behind it.
    """

    def __init__(self, client, spool: Path | None = None, retry_s: float = 5.0):
        self.client, self.spool, self.retry_s = client, spool, retry_s
        self.run_ids: dict[str, str] = {}
        self.queue: list[tuple[str, str, dict]] = []
        self.failed_at = 0.0
        self.last_error: Exception | None = None

    def __call__(self, op: str, key: str, **kw) -> None:
        self.add(op, key, kw)
        if time.monotonic() - self.failed_at >= self.retry_s:
            self.flush()

    def add(self, op: str, key: str, kw: dict) -> None:
        """Queue one write; a batch joins the run's queued batch when nothing came between."""
        if op == "batch":
            for i in range(len(self.queue) - 1, max(len(self.queue) - MERGE_LOOKBACK, 0) - 1, -1):
                q_op, q_key, q_kw = self.queue[i]
                if q_key != key:
                    continue
                if q_op == "batch" and _fits(q_kw, kw):
                    self.queue[i] = (op, key, _merged(q_kw, kw))
                    return
                break
        self.queue.append((op, key, kw))

    def load_spool(self) -> int:
        """Put the writes an earlier driver kept in the spool file ahead of this one's, in
        their order; they leave the file only as MLflow acknowledges them."""
        earlier, run_ids = read_spool(self.spool)
        self.queue[:0] = earlier
        self.run_ids = {**run_ids, **self.run_ids}
        return len(earlier)

    def flush(self) -> bool:
        spooled = self.spool is not None and self.spool.exists()
        while self.queue:
            op, key, kw = self.queue[0]
            try:
                self._send(op, key, kw)
            except Exception as e:  # any transport or server error: keep it, retry later
                self.failed_at, self.last_error = time.monotonic(), e
                self._write_spool()
                return False
            self.queue.pop(0)
            # A replayed spool must not create a run twice; any other write may be sent twice
            # without harm (MLflow keeps one copy of an identical metric; tags overwrite).
            if op == "create" and spooled:
                self._write_spool()
        self._write_spool()
        return True

    def close(self) -> list:
        """One last try; returns the writes that could still not be sent."""
        self.flush()
        return self.queue

    def _send(self, op: str, key: str, kw: dict) -> None:
        from mlflow.entities import Metric, Param, RunTag

        if op == "create":
            if key not in self.run_ids:  # a run the spool still had as unsent may exist already
                self.run_ids[key] = self.client.create_run(**kw).info.run_id
        elif op == "batch":
            self.client.log_batch(self.run_ids[key], metrics=[Metric(**m) for m in kw.get("metrics", ())],
                                  params=[Param(k, v) for k, v in kw.get("params", {}).items()],
                                  tags=[RunTag(k, v) for k, v in kw.get("tags", {}).items()])
        elif op == "end":
            self.client.set_terminated(self.run_ids[key], status=kw["status"], end_time=kw.get("end_time"))
        elif op == "reopen":
            self.client.update_run(self.run_ids[key], status="RUNNING")
        elif op == "artifact":
            self.client.log_artifact(self.run_ids[key], kw["local_path"], kw.get("artifact_path"))
        elif op == "artifacts":
            self.client.log_artifacts(self.run_ids[key], kw["local_dir"], kw.get("artifact_path"))
        elif op == "inputs":  # a dataset input: kw as sweeps.plan.inputs.dataset_input makes it
            from mlflow.entities import Dataset, DatasetInput, InputTag

            tags = [InputTag(k, v) for k, v in kw.get("tags", {}).items()]
            self.client.log_inputs(self.run_ids[key], [DatasetInput(Dataset(**kw["dataset"]), tags)])
        else:
            raise ValueError(f"unknown MLflow write {op!r}")

    def _write_spool(self) -> None:
        write_spool(self.spool, self.queue, self.run_ids)


def write_spool(spool: Path | None, writes: list, run_ids: dict[str, str]) -> None:
    """Keep the unsent writes in ``spool``, in order, one JSON line each: the write, its
    run's key and, once created, its run id; with nothing unsent, remove it. Written whole
    beside it and renamed over it: a reader sees the old file or the new one."""
    if spool is None:
        return
    if not writes:
        spool.unlink(missing_ok=True)
        return
    spool.parent.mkdir(parents=True, exist_ok=True)
    tmp = spool.with_name(f".{spool.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        for op, key, kw in writes:
            f.write(json.dumps({"op": op, "key": key, "run": run_ids.get(key, key), **kw}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, spool)


def read_spool(spool: Path | None) -> tuple[list, dict[str, str]]:
    """The writes ``write_spool`` kept, and the run ids of their keys."""
    if spool is None or not spool.exists():
        return [], {}
    writes, run_ids = [], {}
    for line in spool.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # not written by write_spool (it renames whole files into place)
        op, run = entry.pop("op"), entry.pop("run")
        key = entry.pop("key", run)
        if run != key or re.fullmatch(r"[0-9a-f]{32}", run):  # created: its run id
            run_ids[key] = run
        writes.append((op, key, entry))
    return writes, run_ids


def _fits(a: dict, b: dict) -> bool:
    return all(len(a.get(k, ())) + len(b.get(k, ())) <= n for k, n in BATCH_LIMITS.items())


def _merged(a: dict, b: dict) -> dict:
    return {"metrics": [*a.get("metrics", ()), *b.get("metrics", ())],
            "params": {**a.get("params", {}), **b.get("params", {})},
            "tags": {**a.get("tags", {}), **b.get("tags", {})}}


class WriterProcess:
    """The driver's end of a ``Writer`` running in a child process.

    Calls return at once: a write is a JSON line put on the child's stdin without blocking
    (a full pipe keeps the rest here until the next call), from the caller's own thread, so
    Tune's controller never hands the GIL to a helper thread. ``close()`` waits for the
    child to send everything, then holds what a synchronous ``Writer`` would: ``run_ids``,
    ``queue`` (the writes that could not be sent, also in the spool file) and
    ``last_error``; ``wait_s`` is how long it waited, ``done_at`` when it returned.
    """

    def __init__(self, tracking_uri: str, spool: Path | None, run_ids: dict[str, str],
                 queued: list | None = None):
        self.spool, self.run_ids = spool, dict(run_ids)
        self.queue: list = []
        self.last_error: Exception | str | None = None
        self.wait_s, self.done_at = 0.0, 0.0
        # The tracking URI (it may hold credentials) goes on the pipe, never on the command
        # line, where other users of the machine could read it; the child's answer comes
        # back on a pipe of its own, so no file is left in a shared folder if we die.
        self._answer, answer_w = os.pipe()
        self._proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), str(answer_w)],
            # A group of its own: Ctrl-C, or a kill of the driver's group, does not reach it.
            # It stops when its input ends, as the driver closes it or dies, and first sends
            # or spools every write it holds.
            stdin=subprocess.PIPE, process_group=0, pass_fds=(answer_w,))
        os.close(answer_w)
        self._fd = self._proc.stdin.fileno()
        os.set_blocking(self._fd, False)
        with contextlib.suppress(OSError):  # Linux: room for a few thousand writes
            fcntl.fcntl(self._fd, F_SETPIPE_SZ, PIPE_BYTES)
        self._unsent = bytearray()  # written by us, not yet taken by the pipe
        self._child_gone = False
        self._put({"tracking_uri": tracking_uri, "spool": str(spool or ""), "run_ids": run_ids,
                   "queue": [list(q) for q in queued or ()]})

    def __call__(self, op: str, key: str, **kw) -> None:
        self._put({"op": op, "key": key, "kw": kw})

    def _put(self, message: dict) -> None:
        self._unsent += json.dumps(message).encode() + b"\n"
        self._push()

    def _push(self) -> None:
        while self._unsent and not self._child_gone:
            try:
                sent = os.write(self._fd, self._unsent)
            except BlockingIOError:
                return  # the child is busy: the rest goes with the next write
            except OSError:  # BrokenPipeError: the child is gone; keep everything for the spool
                self._child_gone = True
                return
            del self._unsent[:sent]

    def detach(self) -> None:
        """Stop waiting for the child: it gets what is still here, then sends or spools it on
        its own (a Ctrl-C during ``close``)."""
        with contextlib.suppress(OSError):
            os.set_blocking(self._fd, True)
            self._push()
            self._proc.stdin.close()

    def close(self, timeout: float = 600) -> list:
        started = time.monotonic()
        os.set_blocking(self._fd, True)
        self._push()
        with contextlib.suppress(OSError):
            self._proc.stdin.close()
        answer = _read_until_closed(self._answer, started + timeout)
        os.close(self._answer)
        try:
            code = self._proc.wait(timeout=max(1.0, started + timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            self._proc.kill()
            code = self._proc.wait()
        self.wait_s, self.done_at = time.monotonic() - started, time.time()
        try:
            result = json.loads(answer)
        except ValueError:
            result = None
        if result is None:  # the child died: what it spooled stays, what it never got joins it
            self.last_error = f"the MLflow writer process exited with code {code}"
            self.queue, spooled_ids = read_spool(self.spool)
            self.run_ids = {**spooled_ids, **self.run_ids}
            for line in self._unsent.decode(errors="replace").splitlines():
                with contextlib.suppress(ValueError):  # the tail of a line the child had taken
                    m = json.loads(line)
                    if "op" in m:
                        self.queue.append((m["op"], m["key"], m["kw"]))
            write_spool(self.spool, self.queue, self.run_ids)
            return self.queue
        self.run_ids.update(result["run_ids"])
        self.queue = [tuple(q) for q in result["queue"]]
        self.last_error = result["last_error"]
        return self.queue


def _read_until_closed(fd: int, deadline: float) -> bytes:
    """Everything written to the pipe ``fd`` until its writer closes it, or until ``deadline``."""
    import select

    chunks = []
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def serve(answer_fd: str) -> int:
    """The child: read the tracking URI, the spool and what is queued from the first line of
    stdin, then writes, one per line; send them, and at end of input send the rest and write
    ``{"run_ids", "queue", "last_error"}`` to the pipe ``answer_fd``."""
    os.nice(WRITER_NICENESS)
    from mlflow.tracking import MlflowClient

    lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()

    def read() -> None:
        for line in sys.stdin:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, name="mlflow-writer-read", daemon=True).start()
    state = json.loads(lines.get() or "{}")
    writer = Writer(MlflowClient(state["tracking_uri"]), Path(state["spool"]) if state["spool"] else None)
    writer.run_ids.update(state.get("run_ids", {}))
    writer.queue.extend(tuple(q) for q in state.get("queue", ()))
    try:
        pump(lines, writer)
    finally:  # whatever stopped us, every write we hold is sent or spooled
        writer.flush()
        answer = json.dumps({"run_ids": writer.run_ids, "queue": [list(q) for q in writer.queue],
                             "last_error": str(writer.last_error) if writer.last_error else None})
        with contextlib.suppress(OSError), open(int(answer_fd), "w") as out:  # gone: the driver died
            out.write(answer)
    return 0


def pump(lines: queue.SimpleQueue, writer: Writer, quiet_s: float = QUIET_S,
         max_delay_s: float = MAX_DELAY_S) -> None:
    """Hand the JSON writes from ``lines`` to ``writer`` until a ``None`` ends them; send
    each gathered burst, and at the end everything."""
    done = False
    while not done:
        try:  # wait for work; with writes queued behind a failure, only until the next retry
            line = lines.get(timeout=writer.retry_s if writer.queue else None)
        except queue.Empty:
            line = ""
        deadline = time.monotonic() + max_delay_s
        while line is not None:
            if line:
                try:
                    m = json.loads(line)
                    writer.add(m["op"], m["key"], m["kw"])
                except (ValueError, KeyError) as e:  # the driver died halfway through a line
                    writer.last_error = f"a write the driver did not finish was dropped: {line[:200]!r} ({e})"
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                line = lines.get(timeout=min(quiet_s, left))
            except queue.Empty:
                break
        done = line is None
        if done or time.monotonic() - writer.failed_at >= writer.retry_s:
            writer.flush()


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1]))
