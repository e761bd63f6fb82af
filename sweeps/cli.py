"""The command line of ``sweeps/run.py``. Hyperparameter defaults live in the space
files, not here: a flag left out means "what the space says"."""

from __future__ import annotations

import argparse

from search_spaces.loader import available

EPILOG = """examples:
  python sweeps/run.py --space lr_decay                      # the embedded digits demo
  python sweeps/run.py --space lr_decay --data ~/flowers --model resnet50 --gpus-per-trial 0.25
  python sweeps/run.py --space smoke --set batch_size=16 --trials 2
  python sweeps/run.py --space lr_decay --name nightly --resume   # continue a killed sweep
  python sweeps/run.py --space lr_decay --warm-start nightly      # TPE starts from nightly's trials
  python sweeps/run.py --space pruning --max-acc-drop 0.02        # smallest model within 0.02 of the best
  python sweeps/run.py --space lr_decay --register digits         # a new version of model digits
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sweeps/run.py", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a pretrained torchvision classifier many times at once: Ray Tune "
                    "runs the trials, Optuna's TPE picks the settings, ASHA stops weak trials "
                    "early, MLflow records every trial and keeps the best checkpoint.")
    what = p.add_argument_group("what to sweep")
    what.add_argument("--space", required=True, metavar="NAME|FILE",
                      help=f"search space: a name in search_spaces/ ({', '.join(available())}) "
                           "or a path to a YAML file")
    what.add_argument("--data", metavar="DIR",
                      help="ImageFolder dataset: DIR/train and DIR/val if both exist, else DIR/<class>/* "
                           "split by a seeded stratified split. Default: the embedded digits demo")
    what.add_argument("--val-fraction", type=float, default=0.2, metavar="F",
                      help="validation share when DIR has no train/val folders (default 0.2)")
    what.add_argument("--split-seed", type=int, default=0, metavar="N",
                      help="seed of the stratified train/val split when DIR has no train/val folders "
                           "(default 0); --seed does not change the split, so sweeps with different "
                           "seeds are scored on the same validation images")
    what.add_argument("--skip-bad-images", action="store_true",
                      help="leave out unreadable images instead of stopping (their list is logged)")
    what.add_argument("--model", metavar="NAME",
                      help="any torchvision classification model (default resnet18)")
    what.add_argument("--weights", metavar="imagenet|none|PATH",
                      help="pretrained weights: torchvision's ImageNet weights from its cache, none, or "
                           "a torchvision state_dict file (default: imagenet; the demo uses its own "
                           "digits 0-4 backbone)")
    what.add_argument("--image-size", type=int, metavar="N",
                      help="images are resized and centre-cropped to N x N (default 224; demo 32)")
    what.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="fix a trial config value of the space, e.g. --set batch_size=64 (repeatable)")
    what.add_argument("--warm-start", metavar="SWEEP|RUN_ID",
                      help="give TPE the finished trials of an earlier sweep (its name or parent run id, "
                           "read from --tracking-uri) before it samples; they are not run again")

    budget = p.add_argument_group("budget and resources")
    budget.add_argument("--trials", type=int, metavar="N", help="number of trials (default: the space's)")
    budget.add_argument("--max-epochs", type=int, metavar="N",
                        help="epochs per trial, also ASHA's max_t (default: the space's)")
    budget.add_argument("--cpus-per-trial", type=float, default=1, metavar="C",
                        help="CPUs per trial; torch uses this many threads (default 1)")
    budget.add_argument("--gpus-per-trial", type=float, default=0, metavar="G",
                        help="GPUs per trial; fractions pack trials onto one GPU, e.g. 0.25 (default 0)")
    budget.add_argument("--max-concurrent", type=int, metavar="N",
                        help="run at most N trials at once (default: as many as resources allow)")
    budget.add_argument("--time-budget", type=float, metavar="SECONDS",
                        help="stop starting and running trials after this many seconds")
    budget.add_argument("--max-failures", type=int, default=1, metavar="N",
                        help="retry a failing trial from its last checkpoint up to N times (default 1)")
    budget.add_argument("--seed", type=int, metavar="N",
                        help="seed for TPE and every trial (default: the space's; the same as --set seed=N); "
                             "the validation split has its own, --split-seed")

    where = p.add_argument_group("where results go")
    where.add_argument("--tracking-uri", default="sqlite:///mlflow.db", metavar="URI",
                       help="MLflow tracking URI (default sqlite:///mlflow.db in the working directory)")
    where.add_argument("--experiment", metavar="NAME",
                       help="MLflow experiment (default: ftsweep-<dataset folder name>)")
    where.add_argument("--storage", default="sweep_results", metavar="PATH_OR_URI",
                       help="Ray Tune results and checkpoints: a folder, shared path or s3:// / gs:// "
                            "URI (default ./sweep_results)")
    where.add_argument("--name", metavar="SWEEP", help="sweep name (default <space>-<date>-<time>)")
    where.add_argument("--max-acc-drop", type=float, metavar="F",
                       help="name in sweep_summary.json the model with the fewest nonzero parameters whose "
                            "val_acc is at most F below the best (default 0.01 when the space prunes)")
    where.add_argument("--keep-checkpoints", type=int, default=1, metavar="K",
                       help="when the sweep ends, keep the best checkpoint of the K best trials and delete "
                            "the rest, except those a --resume still needs (default 1; best/ always stays)")
    where.add_argument("--register", metavar="NAME",
                       help="register the best model as a new version of the MLflow registered model NAME, "
                            "tagged with the sweep's run, dataset fingerprint and val_acc; its alias champion "
                            "moves to it when it beats the champion's val_acc on the same data (needs a store "
                            "with a Model Registry: sqlite, another database, or an mlflow server)")
    where.add_argument("--resume", action="store_true",
                       help="continue the sweep --name (default: the newest sweep of --space) where it stopped")
    where.add_argument("--ray-address", metavar="ADDR",
                       help="Ray cluster to join (default: $RAY_ADDRESS, as set inside a Ray job, "
                            "else a local Ray on this machine)")
    return p


def parse_sets(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = value.strip()
    return out
