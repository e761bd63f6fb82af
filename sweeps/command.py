"""The ``ftsweep`` command: ``ftsweep run|submit|report|predict|export|register [FLAGS]``.

Each subcommand is one of the project's scripts: the rest of the command line goes to that
script's ``main`` unchanged, so the flags, the help and the exit codes are the script's own
(``ftsweep run --space lr_decay`` is ``python sweeps/run.py --space lr_decay``). Only the
chosen script is imported: ``ftsweep --version`` and ``ftsweep --help`` start at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib import metadata

# subcommand: (module with main(argv) -> int, the script it stands for, what it does)
COMMANDS = {
    "run": ("sweeps.run", "sweeps/run.py", "run a fine-tuning sweep on this machine or a Ray cluster"),
    "submit": ("sweeps.tools.submit", "sweeps/tools/submit.py", "submit a sweep to a Ray cluster as a Ray Job"),
    "report": ("dashboards.report", "dashboards/report.py", "write a sweep's HTML report from MLflow"),
    "predict": ("sweeps.tools.predict", "sweeps/tools/predict.py",
                "classify a folder of images with a sweep's best model"),
    "export": ("sweeps.tools.export", "sweeps/tools/export.py", "export a sweep's best model as TorchScript or ONNX"),
    "register": ("sweeps.tools.register", "sweeps/tools/register.py",
                 "register a finished sweep's best model (the champion alias moves only on a better val_acc)"),
}


def version() -> str:
    """The installed package's version (from its metadata, as pip sees it)."""
    try:
        return metadata.version("ftsweep")
    except metadata.PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def build_parser() -> argparse.ArgumentParser:
    table = "\n".join(f"  {name:<9}{doc} (as {script})" for name, (_, script, doc) in COMMANDS.items())
    p = argparse.ArgumentParser(
        prog="ftsweep", formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [-h] [--version] COMMAND [FLAGS...]",
        description="Sweeps for fine-tuning pretrained torchvision image classifiers: "
                    "Ray Tune + Optuna + ASHA + MLflow.",
        epilog=f"commands:\n{table}\n\n"
               "Each command takes the flags of its script; `ftsweep COMMAND --help` lists them.")
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    p.add_argument("command", metavar="COMMAND", choices=COMMANDS, help=", ".join(COMMANDS))
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        module, _, _ = COMMANDS[argv[0]]
        return importlib.import_module(module).main(argv[1:])
    parser = build_parser()
    if not argv:  # no command: what there is to run, and a usage error
        parser.print_help(sys.stderr)
        return 2
    args = parser.parse_args(argv)  # --help, --version, or an error naming the unknown command (exit 2)
    parser.error(f"the command comes first: ftsweep {args.command} [FLAGS...]")  # e.g. "ftsweep -- run"


if __name__ == "__main__":
    sys.exit(main())
