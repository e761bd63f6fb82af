"""Submit a sweep to a Ray cluster as a Ray Job.

    python sweeps/tools/submit.py --address http://HEAD:8265 -- --space lr_decay --data /shared/flowers \\
        --storage /shared/sweeps --tracking-uri http://mlflow:5000

Everything after ``--`` is the command line of ``sweeps/run.py``, checked here before
anything is uploaded. This project is shipped as the job's working directory, the job
runs ``python sweeps/run.py ...`` on the cluster (its Tuner places trials on every node),
and its log is streamed here. Exit status: 0 when the job succeeded, 1 when it failed or
was stopped, 2 when it was not submitted (bad arguments, no token, no cluster).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(ROOT))

from sweeps.cli import build_parser as build_run_parser  # noqa: E402

# Never shipped: local results, caches and build leftovers (.gitignore is honoured too).
# .cache is where CI keeps $FTSWEEP_CACHE (decoded arrays, backbones): node-local by nature.
EXCLUDES = [".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache", ".cache",
            ".benchmarks", "sweep_results", "bench_results", "mlruns", "mlartifacts", "mlflow.db"]
TOKEN_PLACES = ("the RAY_AUTH_TOKEN environment variable (the token itself), "
                "RAY_AUTH_TOKEN_PATH (a file holding it), or ~/.ray/auth_token")


class SubmitError(Exception):
    """The job cannot be submitted; the message says why. Exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sweeps/tools/submit.py", usage="%(prog)s --address URL [options] -- RUN_ARGS...",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run `python sweeps/run.py RUN_ARGS` on a Ray cluster as a Ray Job, shipping "
                    "this project\nas its working directory, and follow its log.",
        epilog=f"""example:
  python sweeps/tools/submit.py --address http://HEAD:8265 --env FTSWEEP_CACHE=/local/ftsweep -- \\
      --space lr_decay --data /shared/data/flowers --storage /shared/sweeps \\
      --tracking-uri http://mlflow:5000

exit status: 0 the job succeeded, 1 it failed or was stopped, 2 it was not submitted.
token authentication: the token is read where Ray's own CLI reads it:
  {TOKEN_PLACES}.
  On the head node, `ray get-auth-token` prints it.
""")
    p.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS"), metavar="URL",
                   help="the cluster's dashboard, e.g. http://HEAD:8265 (default $RAY_API_SERVER_ADDRESS)")
    p.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                   help="follow the job's log and exit with its outcome (default); --no-wait "
                        "prints the job id and returns")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment of the sweep on every node, e.g. FTSWEEP_CACHE=/local/ftsweep "
                        "or TORCH_HOME=/shared/torch (repeatable)")
    p.add_argument("--pip", action="store_true",
                   help="have Ray install this project's dependencies (pyproject.toml) into the "
                        "job's environment on every node; off by default, for clusters whose "
                        "image already has them")
    p.add_argument("--submission-id", metavar="ID", help="the job's id (default: Ray makes one)")
    return p


def split_argv(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """submit.py's own arguments and run.py's (None when there is no ``--``)."""
    if "--" not in argv:
        return argv, None
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def check_run_args(run_args: list[str]) -> argparse.Namespace:
    """Parse the run.py arguments here (a typo fails before the upload) and refuse paths
    that would mean something else on the cluster.

    The job runs in a temporary copy of this project that Ray deletes afterwards, so
    results must go to a folder every node mounts or a URI, and inputs must be absolute
    paths on the cluster or files inside this project (which are shipped with it).
    """
    args = build_run_parser().parse_args(run_args)  # argparse prints and exits 2 on a bad flag
    problems = []
    if not _is_absolute(args.storage):
        problems.append(f"--storage {args.storage}: give a folder that every node mounts at the same "
                        "absolute path (NFS, a Kubernetes volume) or an s3:// / gs:// URI; a relative "
                        "path would land in the job's temporary copy of the project")
    if _is_relative_tracking_uri(args.tracking_uri):
        problems.append(f"--tracking-uri {args.tracking_uri}: give an MLflow server (http://HOST:5000) or an "
                        "absolute sqlite:////shared/path/mlflow.db; a relative one would be deleted "
                        "with the job's working directory")
    for flag, value in (("--data", args.data), ("--space", args.space),
                        ("--weights", None if args.weights in (None, "imagenet", "none") else args.weights)):
        if value and not _is_absolute(value) and _looks_like_path(flag, value) \
                and not (ROOT / value).exists():
            problems.append(f"{flag} {value}: a relative path is read inside the shipped copy of this "
                            f"project ({ROOT}), where it does not exist; give an absolute path that "
                            "exists on every node")
    if problems:
        raise SubmitError("\n  ".join(["cannot run this sweep on a cluster:", *problems]))
    return args


def _is_absolute(location: str) -> bool:
    return "://" in location or os.path.isabs(os.path.expanduser(location))


def _is_relative_tracking_uri(uri: str) -> bool:
    if uri.startswith("sqlite:///"):
        return not uri.startswith("sqlite:////")  # sqlite:///rel.db vs sqlite:////abs.db
    if uri.startswith("file:"):
        return not uri.removeprefix("file://").removeprefix("file:").startswith("/")
    return ":" not in uri and uri != "databricks" and not os.path.isabs(os.path.expanduser(uri))


def _looks_like_path(flag: str, value: str) -> bool:
    # --space takes a space name (search_spaces/<name>.yaml) or a file path.
    return flag != "--space" or "/" in value or value.endswith((".yaml", ".yml"))


def runtime_env(env: list[str], pip: bool) -> dict:
    out: dict = {"working_dir": str(ROOT), "excludes": list(EXCLUDES)}
    env_vars = {}
    for pair in env:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SubmitError(f"--env expects KEY=VALUE, got {pair!r}")
        env_vars[key] = value
    if env_vars:
        out["env_vars"] = env_vars
    if pip:
        out["pip"] = project_dependencies()
    return out


def project_dependencies() -> list[str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        raise SubmitError("--pip reads pyproject.toml with tomllib (Python 3.11+); on 3.10 list the "
                          "dependencies with `ray job submit --runtime-env-json`") from None
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def auth_headers() -> tuple[dict, str | None]:
    """The ``Authorization`` header and where its token came from (None: no token).

    Ray's own loader reads the token in Ray's order (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH,
    ~/.ray/auth_token). It is sent even when RAY_AUTH_MODE is unset here: the Jobs SDK
    alone would only send it with RAY_AUTH_MODE=token, and a cluster without token
    authentication ignores it.
    """
    from ray._raylet import AuthenticationTokenLoader
    from ray.exceptions import AuthenticationError

    try:
        headers = AuthenticationTokenLoader.instance().get_token_for_http_header(ignore_auth_mode=True)
    except AuthenticationError as e:  # e.g. RAY_AUTH_TOKEN_PATH names a missing or empty file
        raise SubmitError(f"cannot read the Ray token: {e}") from None
    if not headers:
        return {}, None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return headers, "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return headers, f"RAY_AUTH_TOKEN_PATH ({os.environ['RAY_AUTH_TOKEN_PATH']})"
    return headers, "~/.ray/auth_token"


def connect(address: str):
    """A Jobs client for the dashboard at ``address``, and where its token came from."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    headers, source = auth_headers()
    try:
        return JobSubmissionClient(address, headers=headers), source
    except AuthenticationError:
        raise SubmitError(_auth_message(address, source)) from None
    except ConnectionError:
        raise SubmitError(f"cannot reach the Ray dashboard at {address}: is the head running "
                          "and is this its dashboard address (port 8265 by default)?") from None


def _auth_message(address: str, source: str | None) -> str:
    if source is None:
        return (f"the Ray cluster at {address} uses token authentication and no token was found. "
                f"Provide it in {TOKEN_PLACES}. On the head node, `ray get-auth-token` prints it.")
    return (f"the Ray cluster at {address} rejected the token from {source}. Check that it is "
            f"the cluster's token (`ray get-auth-token` on the head node prints it).")


def follow(client, job_id: str) -> str:
    """Stream the job's log to stdout until it ends; returns its final status."""
    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except RuntimeError as e:  # the log stream broke off; the job itself goes on
        print(f"[submit] lost the log stream ({e}); waiting for the job to end", file=sys.stderr)
    status = client.get_job_status(job_id)
    while not status.is_terminal():  # the stream can close a moment before the status turns
        time.sleep(1)
        status = client.get_job_status(job_id)
    return str(status)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        own, run_args = split_argv(argv)
        if run_args is None:
            build_parser().parse_known_args(own)  # --help still works
            raise SubmitError("put the sweeps/run.py arguments after --, e.g. "
                              "sweeps/tools/submit.py --address http://HEAD:8265 -- --space lr_decay ...")
        opts = build_parser().parse_args(own)
        if not opts.address:
            raise SubmitError("--address is required (the dashboard, e.g. http://HEAD:8265)")
        check_run_args(run_args)
        env = runtime_env(opts.env, opts.pip)
        client, token_source = connect(opts.address)
        entrypoint = shlex.join(["python", "sweeps/run.py", *run_args])
        job_id = _submit(client, opts, entrypoint, env)
    except SubmitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Ray's CLI sends the token only when RAY_AUTH_MODE=token is set.
    ray_cli = "RAY_AUTH_MODE=token ray job" if token_source else "ray job"
    hint = f"--address {opts.address} {job_id}"
    print(f"[submit] job {job_id} on {opts.address}: {entrypoint}", file=sys.stderr)
    if not opts.wait:
        print(f"[submit] follow: {ray_cli} logs -f {hint}\n[submit] stop: {ray_cli} stop {hint}",
              file=sys.stderr)
        print(job_id)
        return 0
    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\n[submit] stopped following; the job goes on. Stop it: {ray_cli} stop {hint}",
              file=sys.stderr)
        return 130
    exit_code = client.get_job_info(job_id).driver_exit_code
    print(f"[submit] job {job_id} {status}" + (f" (run.py exit status {exit_code})"
                                                if exit_code not in (None, 0) else ""), file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def _submit(client, opts, entrypoint: str, env: dict) -> str:
    from ray.exceptions import AuthenticationError

    try:
        return client.submit_job(entrypoint=entrypoint, runtime_env=env,
                                 submission_id=opts.submission_id)
    except AuthenticationError:
        raise SubmitError(_auth_message(opts.address, auth_headers()[1])) from None
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise SubmitError(f"the cluster at {opts.address} did not accept the job: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
