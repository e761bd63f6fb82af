"""Send the MLflow writes a sweep kept on disk: ``python sweeps/records/flush.py SWEEP_DIR``.

A sweep that could not reach its tracking server keeps the writes it could not send in
``SWEEP_DIR/mlflow_pending.jsonl`` (``sweeps/records/writer.py``). ``--resume`` sends them first;
this sends them without running anything: in order, each removed from the file only once
MLflow acknowledged it. Exit code 0 when everything was sent, 1 when some writes are still
pending (the file keeps them), 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sweeps.records.writer import Writer  # noqa: E402
from sweeps.results import storage  # noqa: E402

SPOOL = "mlflow_pending.jsonl"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sweeps/records/flush.py", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_dir", metavar="SWEEP_DIR",
                   help="the sweep's folder under --storage (where mlflow_pending.jsonl is)")
    p.add_argument("--tracking-uri", metavar="URI",
                   help="MLflow tracking URI (default: the one in the sweep's sweep_summary.json, "
                        "else sqlite:///mlflow.db)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    folder = Path(args.sweep_dir).expanduser()
    spool = folder / SPOOL
    if not folder.is_dir():
        print(f"error: no sweep folder {folder}", file=sys.stderr)
        return 2
    if not spool.exists():
        print(f"Nothing pending in {folder}")
        return 0
    uri = args.tracking_uri or _summary_uri(folder) or "sqlite:///mlflow.db"
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    from mlflow.tracking import MlflowClient

    try:  # a driver running or resuming this sweep sends these writes itself: never both
        claim = storage.SweepFolder(str(folder), resume=True)
    except storage.SweepTaken as e:
        print(f"error: {folder}: {e}; its driver sends the pending writes", file=sys.stderr)
        return 2
    try:
        write = Writer(MlflowClient(uri), spool)
        total = write.load_spool()
        sent = write.flush()
    finally:
        claim.close()
    left = len(write.queue)
    print(f"Sent {total - left} of {total} pending MLflow writes to {uri}")
    if not sent:
        print(f"{left} still pending ({write.last_error}); kept in {spool}", file=sys.stderr)
        return 1
    return 0


def _summary_uri(folder: Path) -> str | None:
    """The sweep's tracking URI, when its summary has it in full (not with a redacted password)."""
    try:
        uri = json.loads((folder / "sweep_summary.json").read_text()).get("tracking_uri")
    except (OSError, ValueError):
        return None
    return uri if uri and "***" not in uri else None


if __name__ == "__main__":
    sys.exit(main())
