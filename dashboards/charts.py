"""The report's charts, each a function of a ``Sweep`` that returns one inline SVG string.

Every mark that belongs to a trial carries ``data-trial``, so hovering it (or its table
row) lights the same trial up in every chart, and a ``<title>`` that says what it is.
"""

from __future__ import annotations

import pandas as pd

from dashboards.frame import Searched, Sweep
from dashboards.svg import Bands, Figure, Scale, fmt, padded

OUTCOME_COLOURS = {"completed": "#2563eb", "stopped_early": "#f59e0b", "time_budget": "#a855f7",
                   "errored": "#dc2626", "paused": "#0891b2", "running": "#6b7280"}
# one colour per sweep on the anytime chart: the report's sweep first, then the compared ones
SWEEP_COLOURS = ["#047857", "#2563eb", "#dc2626", "#d97706", "#7c3aed", "#0891b2"]
BEST, SEED = "#047857", "#7c3aed"
PRUNED, DENSE = "#2563eb", "#9ca3af"
# viridis without its palest yellow, which vanishes on white
RAMP = ["#440154", "#414487", "#2a788e", "#22a884", "#7ad151", "#bddf26"]
WIDE = 1080


def ramp(t: float) -> str:
    t = min(max(t, 0.0), 1.0) * (len(RAMP) - 1)
    i = min(int(t), len(RAMP) - 2)
    a, b = (tuple(int(c[k:k + 2], 16) for k in (1, 3, 5)) for c in RAMP[i:i + 2])
    return "#" + "".join(f"{round(x + (y - x) * (t - i)):02x}" for x, y in zip(a, b, strict=True))


def describe(row: pd.Series, searched: dict[str, Searched]) -> str:
    """A trial in one line, for tooltips."""
    params = " ".join(f"{k}={fmt(row[k])}" for k in searched if k in row)
    reason = f" ({row['stop_reason']})" if row.get("stop_reason") else ""
    verdict = row["outcome"].replace("_", " ") + reason
    acc = "no val_acc" if pd.isna(row["best_val_acc"]) else f"best val_acc {row['best_val_acc']:.4f}"
    return f"trial {row['trial']} {params}\n{verdict} after {row['epochs']} epoch(s); {acc}"


def acc_scale(sweep: Sweep, a: float, b: float) -> Scale:
    values = pd.concat([sweep.curves["val_acc"], *( [sweep.seed_recipe.curves["val_acc"]]
                                                    if sweep.seed_recipe else [])])
    lo, hi = (values.min(), values.max()) if len(values) else (0.0, 1.0)
    return Scale(*padded(lo, hi, floor=0.0, ceil=1.0), a, b)


def _epoch_scale(f: Figure, last: int) -> Scale:
    return Scale(1, max(last, 2), f.x0 + 12, f.x1 - 12, integer=True)


def _end_marker(f: Figure, x: float, y: float, outcome: str, colour: str, **attrs) -> None:
    if outcome == "stopped_early":  # a cross where ASHA (or patience) cut the trial
        a, b, c, d = x - 4.5, y - 4.5, x + 4.5, y + 4.5
        f.el("path", d=f"M{a:.1f},{b:.1f}L{c:.1f},{d:.1f}M{a:.1f},{d:.1f}L{c:.1f},{b:.1f}",
             stroke=colour, stroke_width=2.2, **attrs)
    else:
        f.el("circle", cx=round(x, 1), cy=round(y, 1), r=4, fill=colour, **attrs)


def learning_curves(sweep: Sweep) -> str:
    """val_acc per epoch for every trial; crosses and rung lines show where ASHA stopped trials."""
    f = Figure(WIDE, 400, label="Learning curves: val_acc per epoch for every trial")
    trials, curves = sweep.trials, sweep.curves
    planned = trials["max_epochs"].max() if "max_epochs" in trials else 1
    last = int(max(curves["epoch"].max() if len(curves) else 1, planned))
    xs, ys = _epoch_scale(f, last), acc_scale(sweep, f.y0, f.y1)
    f.axes(xs, ys, "epoch", "val_acc", xticks=range(1, last + 1))
    stopped = trials[trials["outcome"] == "stopped_early"].groupby("epochs").size()
    for epoch, n in stopped.items():  # ASHA's rungs, as the trials it stopped reveal them
        x = xs(epoch)
        f.line(x, f.y0, x, f.y1, class_="rung")
        f.text(x + 4, f.y1 + 12, f"{n} stopped here", class_="note")
    best = sweep.best()
    order = sorted(trials.itertuples(), key=lambda r: best is not None and r.trial == best["trial"])
    for r in order:
        curve = curves[curves["trial"] == r.trial]
        if curve.empty:
            continue
        is_best = best is not None and r.trial == best["trial"]
        colour = OUTCOME_COLOURS.get(r.outcome, "#6b7280")
        pts = [(xs(e), ys(v)) for e, v in zip(curve["epoch"], curve["val_acc"], strict=True)]
        f.open_group(class_="trial", data_trial=r.trial)
        f.polyline(pts, class_="curve best" if is_best else "curve", stroke=colour)
        _end_marker(f, *pts[-1], r.outcome, colour, class_="end")
        if is_best:
            f.text(pts[-1][0] - 8, pts[-1][1] - 9, f"best: trial {r.trial}", class_="callout",
                   text_anchor="end")
        f.close_group(describe(trials[trials["trial"] == r.trial].iloc[0], sweep.searched))
    return f.render(data_chart="curves")


def param_axis(p: Searched, a: float, b: float, observed: pd.Series):
    if p.type == "choice":
        return Bands(p.bounds, a, b)
    lo = min(float(p.bounds[0]), observed.min()) if len(observed) else float(p.bounds[0])
    hi = max(float(p.bounds[1]), observed.max()) if len(observed) else float(p.bounds[1])
    if p.type == "loguniform":
        return Scale(lo, hi, a, b, log=True)
    return Scale(*((lo - 0.4, hi + 0.4) if p.type == "int" else (lo, hi)), a, b, integer=p.type == "int")


def param_scatter(sweep: Sweep, p: Searched) -> str:
    """One searched hyperparameter against each trial's best val_acc, over its searched range."""
    f = Figure(350, 270, margin=(56, 14, 14, 44), label=f"{p.name} against best val_acc")
    trials = sweep.trials.dropna(subset=["best_val_acc"])
    xs = param_axis(p, f.x0 + 8, f.x1 - 8, trials[p.name] if p.type != "choice" else pd.Series())
    ys = acc_scale(sweep, f.y0, f.y1)
    f.axes(xs, ys, f"{p.name} ({p.type})", "best val_acc")
    best = sweep.best()
    for _, r in trials.iterrows():
        is_best = best is not None and r["trial"] == best["trial"]
        f.el("circle", cx=xs(r[p.name]), cy=ys(r["best_val_acc"]), r=6 if is_best else 4.5,
             fill=OUTCOME_COLOURS.get(r["outcome"], "#6b7280"), class_="dot best" if is_best else "dot",
             data_trial=r["trial"], title=describe(r, sweep.searched))
    return f.render(data_chart=f"param-{p.name}")


def parallel_coordinates(sweep: Sweep) -> str:
    """Each trial a line through its searched values to its best val_acc, coloured by it."""
    names = list(sweep.searched)
    f = Figure(WIDE, 330, margin=(70, 34, 120, 24), label="Parallel coordinates of the searched values")
    axes_x = [f.x0 + i * (f.x1 - f.x0) / max(len(names), 1) for i in range(len(names) + 1)]
    trials = sweep.trials
    scales = [param_axis(p, f.y0, f.y1, trials[p.name].dropna() if p.type != "choice" else pd.Series())
              for p in sweep.searched.values()]
    acc = acc_scale(sweep, f.y0, f.y1)
    scored = trials["best_val_acc"].dropna()
    lo, hi = (scored.min(), scored.max()) if len(scored) else (0, 1)
    best = sweep.best()
    for _, r in trials.sort_values("best_val_acc", na_position="first").iterrows():
        pts = [(x, s(r[n])) for x, n, s in zip(axes_x, names, scales, strict=False)]  # axes_x has one more
        scored_row = not pd.isna(r["best_val_acc"])
        if scored_row:
            pts.append((axes_x[-1], acc(r["best_val_acc"])))
        colour = ramp((r["best_val_acc"] - lo) / ((hi - lo) or 1)) if scored_row else "#9ca3af"
        is_best = best is not None and r["trial"] == best["trial"]
        f.polyline(pts, stroke=colour, class_="pc best" if is_best else "pc", data_trial=r["trial"],
                   title=describe(r, sweep.searched))
    # axes last, so their (haloed) tick labels stay readable over the lines
    for x, name, s in zip(axes_x, [*names, "best val_acc"], [*scales, acc], strict=True):
        f.line(x, f.y0, x, f.y1, class_="axis")
        f.text(x, f.y1 - 12, name, class_="label", text_anchor="middle")
        for v in s.ticks(4):
            f.line(x - 3, s(v), x, s(v), class_="axis")
            f.text(x - 6, s(v) + 4, fmt(v), class_="tick", text_anchor="end")
    _colour_key(f, axes_x[-1] + 40, lo, hi)
    return f.render(data_chart="parallel")


def _colour_key(f: Figure, x: float, lo: float, hi: float) -> None:
    stops = "".join(f'<stop offset="{i / (len(RAMP) - 1):.2f}" stop-color="{c}"/>'
                    for i, c in enumerate(RAMP))
    f.parts.append(f'<defs><linearGradient id="ramp" x1="0" y1="1" x2="0" y2="0">{stops}'
                   "</linearGradient></defs>")
    f.el("rect", x=round(x, 1), y=f.y1, width=12, height=f.y0 - f.y1, fill="url(#ramp)", rx=2)
    f.text(x + 18, f.y1 + 10, fmt(hi), class_="tick")
    f.text(x + 18, f.y0, fmt(lo), class_="tick")
    f.text(x + 18, (f.y0 + f.y1) / 2, "colour:", class_="tick")
    f.text(x + 18, (f.y0 + f.y1) / 2 + 14, "best val_acc", class_="tick")


def importance_bars(scores: dict[str, float]) -> str:
    f = Figure(620, 30 + 34 * len(scores), margin=(130, 10, 70, 20), label="Hyperparameter importance")
    xs = Scale(0, 1, f.x0, f.x1)
    for i, (name, v) in enumerate(scores.items()):
        y = f.top + i * 34
        f.text(f.x0 - 10, y + 17, name, class_="label", text_anchor="end")
        f.el("rect", x=f.x0, y=y + 4, width=max(round(xs(v) - f.x0, 1), 1), height=20, rx=3,
             class_="bar", fill=ramp(0.35), title=f"{name}: {v:.1%} of the variance in best val_acc")
        f.text(xs(v) + 6, y + 18, f"{v:.0%}", class_="tick")
    return f.render(data_chart="importance")


def timeline(sweep: Sweep) -> str:
    """Trials over wall-clock time (a bar per trial, ticks at its epochs) and how many ran at once."""
    trials = sweep.trials.sort_values("start_s")
    row_h, lanes = 18, len(trials)
    f = Figure(WIDE, 80 + row_h * lanes + 130, margin=(90, 10, 16, 40), label="Timeline of trials")
    gantt_bottom = f.top + row_h * lanes
    span = max(sweep.wall_s, trials["end_s"].max() if lanes else 1.0, 1.0)
    xs = Scale(0, span, f.x0, f.x1)
    for v in xs.ticks(10):
        f.line(xs(v), f.top, xs(v), f.y0, class_="grid")
    for i, r in enumerate(trials.itertuples()):
        y = f.top + i * row_h
        colour = OUTCOME_COLOURS.get(r.outcome, "#6b7280")
        f.text(f.x0 - 8, y + 13, f"trial {r.trial}", class_="tick", text_anchor="end")
        f.open_group(class_="lane", data_trial=r.trial)
        f.el("rect", x=xs(r.start_s), y=y + 3, width=max(xs(r.end_s) - xs(r.start_s), 1.5),
             height=row_h - 6, rx=3, fill=colour, class_="span")
        for t in sweep.curves.loc[sweep.curves["trial"] == r.trial, "time_s"]:
            f.line(xs(t), y + 3, xs(t), y + row_h - 3, class_="epoch-tick")
        row = sweep.trials[sweep.trials["trial"] == r.trial].iloc[0]
        f.close_group(describe(row, sweep.searched) + f"\nran {r.duration_s:.1f} s from +{r.start_s:.1f} s")
    top = gantt_bottom + 50
    pts = running_steps(trials)
    most = max(n for _, n in pts)
    pts.append((span, pts[-1][1]))
    ys = Scale(0, max(most, 1), f.y0, top, integer=True)
    for v in ys.ticks(min(max(most, 1), 4)):
        f.line(f.x0, ys(v), f.x1, ys(v), class_="grid")
        f.text(f.x0 - 8, ys(v) + 4, fmt(v), class_="tick", text_anchor="end")
    path = "M" + " L".join(f"{xs(t):.1f},{ys(n):.1f}" for t, n in pts) + f" L{xs(span):.1f},{ys(0):.1f} Z"
    f.el("path", d=path, class_="running", title=f"at most {most} trial(s) running at once")
    f.text(f.x0 - 8, top - 14, "running", class_="label", text_anchor="end")
    for v in xs.ticks(10):
        f.line(xs(v), f.y0, xs(v), f.y0 + 4, class_="axis")
        f.text(xs(v), f.y0 + 17, fmt(v), class_="tick", text_anchor="middle")
    f.line(f.x0, f.y0, f.x1, f.y0, class_="axis")
    f.text((f.x0 + f.x1) / 2, f.height - 6, "seconds since the sweep started", class_="label",
           text_anchor="middle")
    return f.render(data_chart="timeline")


def running_steps(trials: pd.DataFrame) -> list[tuple[float, int]]:
    """How many trials were running, as (seconds, count) corners of a step function."""
    events = sorted([(s, 1) for s in trials["start_s"]] + [(e, -1) for e in trials["end_s"]])
    running, pts = 0, [(0.0, 0)]
    for t, step in events:
        pts.append((t, running))
        running += step
        pts.append((t, running))
    return pts


def concurrency(sweep: Sweep) -> tuple[int, float]:
    """(most trials running at once, mean number running over the sweep's wall time)."""
    t = sweep.trials
    if t.empty:
        return 0, 0.0
    return max(n for _, n in running_steps(t)), float(t["duration_s"].sum()) / max(sweep.wall_s, 1e-9)


def comparison_curves(sweep: Sweep, by: str) -> str:
    """The best trial against the seed recipe: val_acc by epoch, or by seconds into the trial."""
    recipe = sweep.seed_recipe
    ours, theirs = sweep.best(), recipe.best()
    f = Figure(530, 300, margin=(56, 16, 16, 44), label=f"Best trial against the seed recipe, by {by}")
    lines = []
    for who, s, row, colour in (("sweep best", sweep, ours, BEST), ("seed recipe", recipe, theirs, SEED)):
        curve = s.curves[s.curves["trial"] == row["trial"]]
        xvals = curve["epoch"] if by == "epoch" else curve["time_s"] - row["start_s"]
        lines.append((who, list(zip(xvals, curve["val_acc"], strict=True)), colour))
    xmax = max((x for _, pts, _ in lines for x, _ in pts), default=1)
    xs = _epoch_scale(f, int(xmax)) if by == "epoch" else Scale(0, xmax * 1.03, f.x0, f.x1)
    ys = acc_scale(sweep, f.y0, f.y1)
    ticks = range(1, max(int(xmax), 2) + 1) if by == "epoch" else None
    f.axes(xs, ys, "epoch" if by == "epoch" else "seconds since the trial started", "val_acc", xticks=ticks)
    for who, pts, colour in lines:
        px = [(xs(x), ys(y)) for x, y in pts]
        f.polyline(px, stroke=colour, class_="cmp", stroke_dasharray="6 4" if who == "seed recipe" else None,
                   title=f"{who}: best val_acc {max(y for _, y in pts):.4f}")
        for x, y in px:
            f.el("circle", cx=round(x, 1), cy=round(y, 1), r=3, fill=colour)
    return f.render(data_chart=f"compare-{by}")


def size_scatter(sweep: Sweep, sizes: pd.DataFrame, pick: dict, floor: float) -> str:
    """Every (trial, epoch) model: val_acc against nonzero parameters; the dashed line is
    the lowest val_acc allowed, and the smallest model above it is ringed."""
    f = Figure(WIDE, 340, label="val_acc against nonzero parameters, one dot per trial and epoch")
    most = sizes["nonzero_params"].max()
    unit, name = next((u, n) for u, n in ((1e6, "millions"), (1e3, "thousands"), (1, "")) if most >= u)
    xs = Scale(0, most / unit * 1.04, f.x0, f.x1 - 8)
    ys = acc_scale(sweep, f.y0, f.y1)
    f.axes(xs, ys, f"nonzero parameters{f' ({name})' if name else ''}", "val_acc")
    f.line(f.x0, ys(floor), f.x1, ys(floor), stroke=BEST, stroke_dasharray="6 4")
    for r in sizes.sort_values("sparsity").itertuples():
        chosen = r.trial == pick["trial"] and r.epoch == pick["epoch"]
        f.el("circle", cx=xs(r.nonzero_params / unit), cy=ys(r.val_acc), r=6.5 if chosen else 4,
             fill=PRUNED if r.sparsity > 0 else DENSE, class_="dot best" if chosen else "dot",
             data_trial=r.trial, title=f"trial {r.trial}, epoch {r.epoch}: val_acc {r.val_acc:.4f}, "
                                       f"{r.nonzero_params:,} nonzero parameters, sparsity {r.sparsity:.1%}")
    x, y = xs(pick["nonzero_params"] / unit), ys(pick["val_acc"])
    left = x > (f.x0 + f.x1) / 2  # keep the label inside the chart
    f.text(x - 10 if left else x + 10, y - 8, f"smallest within reach: trial {pick['trial']}",
           class_="callout", text_anchor="end" if left else None)
    return f.render(data_chart="sizes")


def anytime_curves(sweeps: list[tuple[str, Sweep, str, bool]]) -> str:
    """Best val_acc so far against seconds since each sweep started, one step line per
    sweep (label, sweep, colour, dashed), drawn on to the sweep's wall time."""
    f = Figure(WIDE, 340, margin=(56, 16, 16, 44), label="Best val_acc so far against wall-clock time")
    lines = []
    for label, sweep, colour, dashed in sweeps:
        points = list(sweep.anytime().itertuples(index=False))
        if points:
            lines.append((label, points, max(sweep.wall_s, points[-1][0]), colour, dashed))
    xmax = max((end for *_, end, _, _ in lines), default=1.0)
    values = [b for _, pts, *_ in lines for _, b in pts]
    ys = Scale(*padded(min(values, default=0.0), max(values, default=1.0), floor=0.0, ceil=1.0), f.y0, f.y1)
    xs = Scale(0, xmax * 1.02, f.x0, f.x1)
    f.axes(xs, ys, "seconds since the sweep started", "best val_acc so far")
    for label, points, end, colour, dashed in lines:
        steps, prev = [], None
        for t, best in points:
            if prev is not None:
                steps.append((xs(t), ys(prev)))
            steps.append((xs(t), ys(best)))
            prev = best
        steps.append((xs(end), ys(prev)))
        f.polyline(steps, stroke=colour, stroke_width=2, stroke_dasharray="6 4" if dashed else None,
                   class_="anytime", title=f"{label}: best val_acc {prev:.4f} at {points[-1][0]:.0f} s")
        for t, best in points:
            f.el("circle", cx=round(xs(t), 1), cy=round(ys(best), 1), r=3, fill=colour,
                 title=f"{label}: {best:.4f} at {t:.0f} s")
    return f.render(data_chart="anytime")
