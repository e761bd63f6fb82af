"""Register a finished sweep's best model: ``python sweeps/tools/register.py --run SWEEP NAME``.

The same rules as ``sweeps/run.py --register NAME``: the sweep's MLflow Model becomes a new
version of NAME, tagged with the sweep, its dataset fingerprint and val_acc; the ``champion``
alias moves to it only when it beats the champion's val_acc on the same data.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sweeps.errors import UsageError  # noqa: E402
from sweeps.records.format import OBJECTIVE, TAG_FINGERPRINT, TAG_SWEEP  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sweeps/tools/register.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db", metavar="URI",
                   help="MLflow tracking URI the sweep logged to (default sqlite:///mlflow.db)")
    p.add_argument("--run", required=True, metavar="RUN_ID|SWEEP",
                   help="the sweep's parent MLflow run id or its name")
    p.add_argument("name", metavar="NAME", help="the registered model to add a version to")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    try:
        from mlflow.tracking import MlflowClient

        from sweeps.plan.uris import check_tracking_uri
        from sweeps.records.best_model import check_store, find_parent_run
        from sweeps.records.registry import check_registry, register

        check_tracking_uri(args.tracking_uri)
        check_store(args.tracking_uri)
        check_registry(args.tracking_uri, args.name)
        parent = find_parent_run(MlflowClient(args.tracking_uri), args.tracking_uri, args.run)
        if parent.info.status != "FINISHED":
            raise UsageError(f"sweep {parent.data.tags.get(TAG_SWEEP, args.run)} (run {parent.info.run_id}) is "
                             f"{parent.info.status}: register a finished sweep (--resume finishes it)")
        val_acc = parent.data.metrics.get(OBJECTIVE)
        if val_acc is None:
            raise UsageError(f"run {parent.info.run_id} has no {OBJECTIVE} metric: no trial produced a result")
        done = register(args.tracking_uri, args.name, parent.info.run_id,
                        parent.data.tags.get(TAG_FINGERPRINT, ""), val_acc,
                        parent.data.tags.get(TAG_SWEEP, args.run))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
