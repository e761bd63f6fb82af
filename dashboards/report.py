"""A sweep's report: ``python dashboards/report.py --sweep NAME_OR_PARENT_RUN_ID --out report.html``.

Reads the sweep from MLflow (``dashboards/frame.py``), writes one self-contained HTML
file (learning curves, hyperparameters against val_acc, importance, for a sweep that
pruned the smallest model within ``--max-acc-drop`` of the best, a timeline, the seed
recipe for comparison, the sortable trial table), the table as CSV and Parquet next to
it, and logs all three to the sweep's parent run under ``report/``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from dashboards import charts  # noqa: E402
from dashboards.frame import Sweep, SweepNotFound, load_sweep  # noqa: E402
from dashboards.importance import param_importances  # noqa: E402
from dashboards.page import document, legend, note, section  # noqa: E402
from dashboards.svg import esc, fmt  # noqa: E402

ARTIFACT_DIR = "report"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dashboards/report.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db", metavar="URI",
                   help="MLflow tracking URI (default sqlite:///mlflow.db, as sweeps/run.py)")
    p.add_argument("--sweep", required=True, metavar="NAME|RUN_ID",
                   help="the sweep's name (--name of sweeps/run.py) or its parent run id")
    p.add_argument("--out", metavar="FILE.html",
                   help="where to write the report; the trial table goes next to it as .csv and "
                        ".parquet (default <sweep>-report.html)")
    p.add_argument("--compare", action="append", default=[], metavar="NAME|RUN_ID",
                   help="another sweep to draw on the anytime chart (best val_acc so far against wall time); "
                        "repeat for more")
    p.add_argument("--no-log", action="store_true", help="do not log the report to the sweep's parent run")
    p.add_argument("--max-acc-drop", type=float, default=0.01, metavar="F",
                   help="for a sweep that pruned: name the model with the fewest nonzero parameters whose "
                        "val_acc is at most F below the best (default 0.01)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(args.tracking_uri)
    try:
        sweep = load_sweep(client, args.sweep)
        others = [load_sweep(client, other, with_seed_recipe=False) for other in args.compare]
    except SweepNotFound as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or f"{sweep.name}-report.html")
    paths = write_report(sweep, out, model_sizes(client, sweep), args.max_acc_drop, others)
    for path in paths:
        print(path)
    if not args.no_log:
        for path in paths:
            client.log_artifact(sweep.parent.info.run_id, str(path), ARTIFACT_DIR)
        print(f"logged to MLflow run {sweep.parent.info.run_id} under {ARTIFACT_DIR}/")
    return 0


def write_report(sweep: Sweep, out: Path, sizes: pd.DataFrame | None = None,
                 max_acc_drop: float = 0.01, compare: list[Sweep] | None = None) -> list[Path]:
    """The HTML report, then the trial table as CSV and Parquet beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(build_html(sweep, sizes, max_acc_drop, compare), encoding="utf-8")
    csv, parquet = out.with_suffix(".csv"), out.with_suffix(".parquet")
    sweep.trials.to_csv(csv, index=False)
    sweep.trials.to_parquet(parquet, index=False)
    return [out, csv, parquet]


def build_html(sweep: Sweep, sizes: pd.DataFrame | None = None, max_acc_drop: float = 0.01,
               compare: list[Sweep] | None = None) -> str:
    parts = [header(sweep)]
    if sweep.trials.empty:
        parts.append(note("This sweep has no trials in MLflow yet."))
    else:
        parts += [curves_section(sweep), anytime_section(sweep, compare or []), params_section(sweep),
                  importance_section(sweep), size_section(sweep, sizes, max_acc_drop), timeline_section(sweep),
                  seed_section(sweep), table_section(sweep)]
    made = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts.append(f"<footer>Made by dashboards/report.py on {made} from MLflow run "
                 f"<code>{esc(sweep.parent.info.run_id)}</code>.</footer>")
    return document(f"Sweep {sweep.name}", "\n".join(parts))


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds // 60:.0f} min {seconds % 60:.0f} s"
    return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:.0f} min"


def card(key: str, value: str, detail: str = "", cls: str = "") -> str:
    return (f'<div class="card {cls}"><div class="k">{esc(key)}</div><div class="v">{esc(value)}</div>'
            f'<div class="d">{esc(detail)}</div></div>')


def header(sweep: Sweep) -> str:
    best, counts = sweep.best(), sweep.counts()
    most, mean = charts.concurrency(sweep)
    facts = [f"space <b>{esc(sweep.tag('space', '?'))}</b>", f"model <b>{esc(sweep.tag('model', '?'))}</b>",
             f"data <b>{esc(sweep.tag('dataset', '?'))}</b>", f"started {sweep.started:%Y-%m-%d %H:%M} UTC",
             f"parent run <code>{esc(sweep.parent.info.run_id)}</code>",
             f"commit <code>{esc(sweep.tag('git_commit', '?')[:10])}</code>"]
    running = "" if sweep.parent.info.end_time else " (still running)"
    cards = [
        card("best val_acc", f"{best['best_val_acc']:.4f}" if best is not None else "–",
             f"trial {best['trial']}, epoch {best['best_epoch']}" if best is not None else "no trial scored",
             "best"),
        card("trials", str(len(sweep.trials)),
             ", ".join(f"{n} {o.replace('_', ' ')}" for o, n in counts.items())),
        card("wall time", duration(sweep.wall_s) + running,
             f"the sweep's MLflow run, start to end; "
             f"{sweep.trials['epochs'].sum() if len(sweep.trials) else 0} trial-epochs in all"),
        card("running at once", f"{mean:.1f}", f"on average; at most {most}"),
    ]
    paras = "".join(f"<p>{_markdown_bold(esc(p))}</p>" for p in sweep.description.split("\n\n") if p.strip())
    desc = f'<details class="desc" open><summary>What this sweep is</summary>{paras}</details>' * bool(paras)
    return (f"<header><h1>Sweep {esc(sweep.name)}</h1><p class=\"sub\">{' · '.join(facts)}</p>"
            f"<div class=\"cards\">{''.join(cards)}</div>{desc}</header>")


def _markdown_bold(text: str) -> str:
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)


def outcome_legend(sweep: Sweep) -> str:
    counts = sweep.counts()
    return legend([(f"{o.replace('_', ' ')} ({counts[o]})", charts.OUTCOME_COLOURS[o], False)
                   for o in counts if counts[o]])


def curves_section(sweep: Sweep) -> str:
    return section("curves", "Learning curves",
                   "val_acc after every epoch, one line per trial, coloured by how the trial ended. A cross "
                   "marks a trial that was stopped early; the dashed lines are the epochs where ASHA stopped "
                   "trials (its rungs). Hover a line to see the trial and light it up everywhere.",
                   outcome_legend(sweep), charts.learning_curves(sweep))


def anytime_section(sweep: Sweep, compare: list[Sweep]) -> str:
    """The best val_acc so far against wall-clock time, with the compared sweeps and the seed
    recipe run of the experiment on the same axes."""
    drawn = [(f"{sweep.name} ({sweep.tag('space', '?')})", sweep, charts.SWEEP_COLOURS[0], False)]
    for i, other in enumerate(compare, start=1):
        colour = charts.SWEEP_COLOURS[i % len(charts.SWEEP_COLOURS)]
        drawn.append((f"{other.name} ({other.tag('space', '?')})", other, colour, False))
    if sweep.seed_recipe is not None:
        drawn.append((f"{sweep.seed_recipe.name} (seed_recipe)", sweep.seed_recipe, charts.SEED, True))
    rows = "".join(f"<tr><td>{esc(label)}</td><td>{_best_at_end(s)}</td><td>{duration(s.wall_s)}</td></tr>"
                   for label, s, _, _ in drawn)
    table = ('<table class="cmp"><tr><th class="s">sweep</th><th>best val_acc</th><th>wall time</th></tr>'
             + rows + "</table>")
    return section("anytime", "Best val_acc against wall time",
                   "The best val_acc any trial had reached so far, against seconds since the sweep's MLflow run "
                   "started (a step at each new best), each line drawn on to the sweep's wall time. Pass "
                   "<code>--compare SWEEP</code> to draw other sweeps on the same axes (another scheduler on "
                   "the same data, say); a seed_recipe run in the experiment is the dashed line.",
                   legend([(label, colour, dashed) for label, _, colour, dashed in drawn]),
                   charts.anytime_curves(drawn), table)


def _best_at_end(sweep: Sweep) -> str:
    curve = sweep.anytime()
    return f"{curve['best'].iloc[-1]:.4f}" if len(curve) else "–"


def params_section(sweep: Sweep) -> str:
    if not sweep.searched:
        return section("params", "Hyperparameters", "",
                       note("Nothing was searched: every trial ran one fixed recipe."))
    scatters = "".join(charts.param_scatter(sweep, p) for p in sweep.searched.values())
    ranges = ", ".join(f"{p.name} {p.type} {p.bounds}" for p in sweep.searched.values())
    return section("params", "Hyperparameters against val_acc",
                   f"Each searched hyperparameter over its searched range ({esc(ranges)}), against the best "
                   "val_acc the trial reached; the best trial is ringed in green. Trials stopped early "
                   "reached theirs in fewer epochs.",
                   outcome_legend(sweep), f'<div class="grid-3">{scatters}</div>',
                   "<h3>Parallel coordinates</h3><p class=\"caption\">Every trial as one line through its "
                   "searched values to its best val_acc; colour is best val_acc, brighter is better.</p>",
                   charts.parallel_coordinates(sweep))


def importance_section(sweep: Sweep) -> str:
    if not sweep.searched:
        return ""  # the hyperparameter section already says nothing was searched
    scores, why = param_importances(sweep.trials, sweep.searched)
    body = charts.importance_bars(scores) if scores else ""
    return section("importance", "Hyperparameter importance", esc(why), body)


def model_sizes(client, sweep: Sweep) -> pd.DataFrame | None:
    """Every epoch of every trial as a model: trial, epoch, val_acc, nonzero_params,
    sparsity. None unless some trial pruned: without pruning there is no size to trade."""
    t = sweep.trials
    if "final_sparsity" not in t or not (t["final_sparsity"] > 0).any():
        return None
    rows = []
    for trial, run_id in zip(t["trial"], t["run_id"], strict=True):
        size = {m.step: m.value for m in client.get_metric_history(run_id, "nonzero_params")}
        zeros = {m.step: m.value for m in client.get_metric_history(run_id, "sparsity")}
        curve = sweep.curves[sweep.curves["trial"] == trial]
        rows += [{"trial": trial, "epoch": int(e), "val_acc": float(v), "nonzero_params": int(size[e]),
                  "sparsity": zeros.get(e, 0.0)}
                 for e, v in zip(curve["epoch"], curve["val_acc"], strict=True) if e in size]
    return pd.DataFrame(rows)


def size_section(sweep: Sweep, sizes: pd.DataFrame | None, drop: float) -> str:
    if sizes is None or sizes.empty:
        return ""
    from sweeps.results.summary import smallest_within_drop  # the rule sweep_summary.json uses; imports torch

    models = sizes.to_dict("records")
    pick, best = smallest_within_drop(models, drop), smallest_within_drop(models, 0.0)
    share = pick["nonzero_params"] / best["nonzero_params"]
    return section("size", f"Smallest model within {fmt(drop)} of the best",
                   f"Every epoch of every trial is a model: its val_acc against its nonzero parameters, "
                   f"counted over the whole model (frozen layers too). "
                   f"The smallest whose val_acc is at least {best['val_acc']:.4f} − {fmt(drop)} is "
                   f"<b>trial {pick['trial']} at epoch {pick['epoch']}</b>: val_acc {pick['val_acc']:.4f} "
                   f"with {pick['nonzero_params']:,} nonzero parameters, {share:.0%} of the best model's "
                   f"{best['nonzero_params']:,} (trial {best['trial']}, epoch {best['epoch']}); "
                   f"{pick['sparsity']:.0%} of its prunable weights are zero.",
                   legend([("pruned", charts.PRUNED, False), ("dense", charts.DENSE, False),
                           (f"best − {fmt(drop)}", charts.BEST, True)]),
                   charts.size_scatter(sweep, sizes, pick, best["val_acc"] - drop))


def timeline_section(sweep: Sweep) -> str:
    most, mean = charts.concurrency(sweep)
    setup = sweep.trials["start_s"].min()
    return section("timeline", "Timeline",
                   f"Each trial from the start to the end of its MLflow run, with white ticks at its epochs; "
                   f"below, how many trials ran at once (at most {most}, {mean:.1f} on average over "
                   f"{duration(sweep.wall_s)}). The first trial started {setup:.0f} s in: the sweep's setup "
                   "(checking the data, decoding it once, starting Ray).",
                   outcome_legend(sweep), charts.timeline(sweep))


def seed_section(sweep: Sweep) -> str:
    title = "Against the seed recipe"
    recipe = sweep.seed_recipe
    if sweep.tag("space") == "seed_recipe":
        return ""
    if recipe is None:
        return section("seed", title, "", note(
            "No seed_recipe run in this experiment. Run `python sweeps/run.py --space seed_recipe` with the "
            "same --data, --model and --experiment to see what the search bought over the classic recipe."))
    ours, theirs = sweep.best(), recipe.best()
    if ours is None or theirs is None:
        return section("seed", title, "", note("The sweep or the seed recipe run has no scored trial yet."))
    same_data = recipe.tag("dataset_fingerprint") == sweep.tag("dataset_fingerprint")
    warn = "" if same_data else note("The seed recipe ran on different data (another dataset fingerprint).")
    keys = list(sweep.searched) or ["lr"]
    rows = [("run", sweep.name + f" (trial {ours['trial']})", recipe.name),
            ("best val_acc", f"{ours['best_val_acc']:.4f}", f"{theirs['best_val_acc']:.4f}"),
            ("at epoch", *(f"{r['best_epoch']} of {r['epochs']}" for r in (ours, theirs))),
            ("trial time", duration(ours["duration_s"]), duration(theirs["duration_s"])),
            ("wall time of the whole run", duration(sweep.wall_s), duration(recipe.wall_s)),
            *[(k, fmt(ours.get(k, "–")), fmt(theirs.get(k, "–"))) for k in keys]]
    table = ('<table class="cmp"><tr><th class="s"></th><th>sweep best</th><th>seed recipe</th></tr>'
             + "".join(f"<tr><td>{esc(a)}</td><td>{esc(b)}</td><td>{esc(c)}</td></tr>" for a, b, c in rows)
             + "</table>")
    gain = ours["best_val_acc"] - theirs["best_val_acc"]
    return section("seed", title,
                   f"The sweep's best trial against the newest seed_recipe run in this experiment "
                   f"(<code>{esc(recipe.parent.info.run_id)}</code>): {gain:+.4f} val_acc for "
                   f"{duration(sweep.wall_s)} of sweep instead of {duration(recipe.wall_s)}.",
                   warn, table,
                   legend([("sweep best", charts.BEST, False), ("seed recipe", charts.SEED, True)]),
                   '<div class="grid-3">', charts.comparison_curves(sweep, "epoch"),
                   charts.comparison_curves(sweep, "seconds"), "</div>")


def table_columns(sweep: Sweep) -> list[str]:
    """The table shows what differs between trials; the CSV and Parquet keep everything."""
    t = sweep.trials
    varied = [c for c in t.columns if c not in sweep.searched and c not in FIXED_COLUMNS
              and c in _config_keys() and t[c].astype(str).nunique() > 1]
    return ["trial", "outcome", "epochs", "best_val_acc", "best_epoch", "final_val_acc", "final_val_loss",
            *sweep.searched, *varied, "duration_s", "start_s", "run_id"]


FIXED_COLUMNS = {"trial", "run_name", "outcome", "stop_reason", "epochs", "start", "end", "run_id"}


def _config_keys() -> set[str]:
    from trainables.config import TrialConfig

    return set(TrialConfig.keys())


def table_section(sweep: Sweep) -> str:
    t, cols = sweep.trials, [c for c in table_columns(sweep) if c in sweep.trials.columns]
    best = sweep.best()
    head = "".join(f'<th class="{"s" if not pd.api.types.is_numeric_dtype(t[c]) else ""}"'
                   f'{" data-initial" if c == "best_val_acc" else ""}'
                   f'{" data-first=asc" if c in ("trial", "start_s") else ""}>{esc(c)}</th>' for c in cols)
    rows = []
    for _, r in t.iterrows():
        cells = "".join(_cell(c, r[c]) for c in cols)
        cls = "best" if best is not None and r["trial"] == best["trial"] else ""
        why = f" ({r['stop_reason']})" if r.get("stop_reason") else ""
        title = esc(r["run_name"] + why)
        rows.append(f'<tr class="{cls}" data-trial="{r["trial"]}" title="{title}">{cells}</tr>')
    return section("trials", "Trials",
                   "Click a column header to sort. Columns whose value was the same for every trial are left "
                   "out here; the CSV and Parquet files next to this report have all of them.",
                   f'<div class="table-wrap"><table class="sortable"><thead><tr>{head}</tr></thead>'
                   f'<tbody>{"".join(rows)}</tbody></table></div>')


def _cell(col: str, value) -> str:
    if col == "outcome":
        colour = charts.OUTCOME_COLOURS.get(value, "#6b7280")
        return f'<td class="s"><span class="pill" style="background:{colour}">{esc(value)}</span></td>'
    if col == "run_id":  # the first 8 characters find the run in MLflow's search box
        return f'<td class="s" title="{esc(value)}"><code>{esc(value[:8])}</code></td>'
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f'<td class="s">{esc(value)}</td>'
    if pd.isna(value):
        return '<td data-v=""></td>'
    shown = f"{value:.4f}" if col.endswith(("val_acc", "val_loss")) else (
        f"{value:.1f}" if col.endswith("_s") else fmt(value))
    return f'<td data-v="{value!r}">{shown}</td>'


if __name__ == "__main__":
    sys.exit(main())
