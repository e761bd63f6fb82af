"""Where a sweep's results live: a local folder, a folder every node mounts, or a URI.

Ray Tune writes trials and checkpoints under ``--storage`` itself (through pyarrow, so
``s3://``, ``gs://`` and ``file://`` work). The driver's own files (``sweep_summary.json``,
``best/``) are written into a local folder and then published to the same place with
the same pyarrow filesystem Tune uses, so both land side by side.

On a cluster, trials run on any node and read their inputs (dataset, weights) and write
their checkpoints by path. :func:`require_shared` asks every node, before any trial
starts, whether it sees the same storage folder and inputs as the driver.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import pyarrow.fs as pafs


class SweepTaken(Exception):
    """The sweep's folder belongs to another sweep, or another driver holds it now."""


class NotShared(Exception):
    """A node of the cluster cannot see the sweep's storage or inputs; the message says which."""


def is_uri(location: str) -> bool:
    return "://" in location


def open_storage(location: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path on it, resolved the way Ray Tune resolves
    ``storage_path``; a plain path is made absolute."""
    if is_uri(location):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())


def join(location: str, *parts: str) -> str:
    """``location/part/...``, keeping a URI's query (``?endpoint_override=...``) at the end."""
    base, sep, query = location.partition("?") if is_uri(location) else (location, "", "")
    return "/".join([base.rstrip("/"), *parts]) + sep + query


def write_text(location: str, text: str) -> None:
    """Write a whole file; readers of a local file see the old or the new text, never half."""
    fs, path = open_storage(location)
    fs.create_dir(os.path.dirname(path), recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(tmp) as f:
            f.write(text.encode())
        fs.move(tmp, path)  # rename(2): atomic on one filesystem
    else:
        with fs.open_output_stream(path) as f:  # an object store publishes the object whole
            f.write(text.encode())


def read_text(location: str) -> str:
    fs, path = open_storage(location)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def exists(location: str) -> bool:
    fs, path = open_storage(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def upload_dir(local: str | Path, location: str) -> None:
    """Copy the files under the local folder ``local`` to ``location``, keeping their layout."""
    fs, path = open_storage(location)
    pafs.copy_files(str(Path(local).resolve()), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


class SweepFolder:
    """The sweep's own files: written to ``local``, visible at ``location(...)``.

    For a plain path both are the sweep folder. For a URI, ``local`` is a scratch folder
    and :meth:`publish` copies it to the URI at the end of the sweep.
    """

    def __init__(self, sweep_dir: str, resume: bool = False):
        """Claim the sweep's folder: a new sweep creates it (an existing one is another
        sweep of that name, ``SweepTaken``), a resumed one reuses it; either way this
        process holds an exclusive lock on it until it exits, so two drivers never run
        one sweep at once, even when started at the same moment."""
        self.uri = sweep_dir
        self.remote = is_uri(sweep_dir)
        if self.remote:  # the driver's scratch copy, in the user's own cache, not a shared temp folder
            import hashlib

            key = hashlib.sha256(sweep_dir.encode()).hexdigest()[:16]
            self.local = scratch_root() / key
            self.local.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        else:
            self.local = Path(sweep_dir)
            self.local.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.local.mkdir(mode=0o700 if self.remote else 0o777, exist_ok=resume or self.remote)
        except FileExistsError:
            raise SweepTaken(f"{self.local} exists already: it holds another sweep of this name") from None
        self._lock = os.open(self.local, os.O_RDONLY)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise SweepTaken(f"another process is running this sweep now (it holds {self.local})") from None

    def close(self) -> None:
        """Release the sweep: another driver may resume it from now on."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def location(self, *parts: str) -> str:
        """Where a file of the sweep folder can be found once published."""
        return join(self.uri, *parts) if self.remote else str(self.local.joinpath(*parts))

    def publish(self, pending: bool = False) -> None:
        """Copy a remote sweep's files to its URI; the scratch copy goes too, unless it
        holds MLflow writes still ``pending`` (``--resume`` sends them)."""
        if self.remote:
            upload_dir(self.local, self.uri)
            if not pending:
                shutil.rmtree(self.local, ignore_errors=True)


def replace_dir(new: Path, out: Path) -> None:
    """Put the folder ``new`` in the place of ``out`` (on the same file system) by renames:
    a reader sees the old folder whole or the new one whole (or, between the two renames,
    none), never half of one. What ``out`` held goes."""
    old = out.with_name(f".old-{out.name}")
    shutil.rmtree(old, ignore_errors=True)  # left by a crash between the renames
    if out.exists():
        os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)


def scratch_root() -> Path:
    """Where the driver keeps a remote sweep's files until they are published: the user's
    ftsweep cache (``FTSWEEP_CACHE``), readable by its owner only."""
    from trainables.node_cache import cache_root

    return cache_root() / "sweeps"


def trial_inputs(plan) -> dict[str, str]:
    """What every trial reads by path, whatever node it runs on: path -> what it is."""
    inputs = {plan.data.dataset.root: "the dataset (--data)"}
    weights = plan.space.config().weights
    if weights not in ("imagenet", "none"):
        inputs[weights] = "the pretrained weights (--weights)"
    return inputs


def require_shared(storage: str, inputs: Mapping[str, str]) -> None:
    """Stop before any trial when some node of the connected Ray cluster cannot see the
    storage folder (a plain path or ``file://``) or one of ``inputs`` (path -> what it is).

    Object stores (``s3://``, ``gs://``) are reachable from every node by design, so only
    the inputs are checked for them. A one-node cluster passes without a check.
    """
    import ray

    if len([n for n in ray.nodes() if n["Alive"]]) < 2:
        return
    fs, path = open_storage(storage)
    probe = None
    if isinstance(fs, pafs.LocalFileSystem):
        # A fresh name: a folder of the same name on a node's own disk must not count.
        probe = join(path, f".ftsweep-probe-{uuid.uuid4().hex}")
        write_text(probe, "written by the sweep driver to see which nodes share this folder\n")
    try:
        unseen = unseen_by_nodes([*inputs, *([probe] if probe else [])])
    finally:
        if probe:
            os.unlink(probe)
    if not unseen:
        return
    lines = []
    for node, paths in unseen.items():
        for p in paths:
            what = f"the storage folder {storage} (--storage)" if p == probe else f"{inputs[p]} {p}"
            lines.append(f"  node {node} cannot see {what}")
    raise NotShared(
        "this Ray cluster's nodes do not share the sweep's files:\n" + "\n".join(lines) +
        "\nOn a cluster, put --storage on a folder every node mounts at the same path (NFS, a "
        "Kubernetes ReadWriteMany volume) or on an s3:// / gs:// URI, and --data / --weights "
        "on such a folder too.")


def unseen_by_nodes(paths: Sequence[str], timeout: float = 120) -> dict[str, list[str]]:
    """Run a zero-CPU task on every alive node of the connected Ray cluster; for each node
    that cannot see some of ``paths`` (or does not answer in time, then all of them),
    ``"<ip> (<node id>)"`` -> those paths."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    missing_here = ray.remote(num_cpus=0)(_missing)
    pending = {}  # the task's result -> the node it ran on
    for node in (n for n in ray.nodes() if n["Alive"]):
        pinned = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ref = missing_here.options(scheduling_strategy=pinned).remote(list(paths))
        pending[ref] = f"{node['NodeManagerAddress']} ({node['NodeID'][:8]})"
    answered, _ = ray.wait(list(pending), num_returns=len(pending), timeout=timeout)
    unseen = {pending[ref]: list(paths) for ref in pending if ref not in answered}
    for ref in answered:
        if missing := ray.get(ref):
            unseen[pending[ref]] = missing
    return unseen


def _missing(paths: Sequence[str]) -> list[str]:
    return [p for p in paths if not os.path.exists(p)]
