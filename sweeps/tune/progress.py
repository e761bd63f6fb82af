"""A live status line for a sweep, refreshed in place instead of Tune's tables."""

from __future__ import annotations

import sys
import time

from ray.tune import ProgressReporter

from sweeps.records.format import METRIC, OUTCOMES
from sweeps.records.tracking import outcome_of, trial_budget


def counts(trials, max_epochs: int, tagged: dict[str, str] | None = None) -> dict[str, int]:
    """Trials by state: pending, running, paused at a rung (a pausing scheduler), and the
    outcomes of finished trials (as MLflow tagged them, ``tagged`` by trial id, else judged
    against each trial's own budget)."""
    out = {"pending": 0, "running": 0, **dict.fromkeys(OUTCOMES, 0)}
    tagged = tagged or {}
    for t in trials:
        if t.status == "PAUSED":
            out["paused"] += 1
        elif t.status == "PENDING":
            out["pending"] += 1
        elif t.status == "RUNNING":
            out["running"] += 1
        else:
            config = getattr(t, "config", None)
            budget = trial_budget(config) if config else max_epochs
            out[tagged.get(t.trial_id) or outcome_of(t.last_result or {}, t.status == "ERROR", budget)] += 1
    return out


def best(trials) -> tuple[float, str, int] | None:
    scored = [(t.metric_analysis[METRIC]["max"], t) for t in trials if METRIC in t.metric_analysis]
    if not scored:
        return None
    value, trial = max(scored, key=lambda s: s[0])
    return value, trial.trial_id, int(trial.last_result.get("epoch", 0))


def status_line(trials, max_epochs: int, total: int, elapsed: float, tagged: dict | None = None) -> str:
    c = counts(trials, max_epochs, tagged)
    found = best(trials)
    best_text = (f"best val_acc {found[0]:.4f} (trial {found[1]})" if found else "best val_acc -")
    return (f"[{int(elapsed) // 60:02d}:{int(elapsed) % 60:02d}] {len(trials)}/{total} trials: "
            f"{c['running']} running, {f'{n} paused, ' if (n := c['paused']) else ''}"
            f"{c['pending']} pending, {c['completed']} completed, "
            f"{c['stopped_early']} stopped early, "
            f"{f'{n} cut by the time budget, ' if (n := c['time_budget']) else ''}"
            f"{c['errored']} errored | {best_text}")


class LiveStatus(ProgressReporter):
    """One line rewritten in place on a terminal; in a log (not a TTY), a line only when
    the counts change, so a 50-trial sweep writes tens of lines, not thousands."""

    def __init__(self, max_epochs: int, total: int, stream=None, state=None):
        self.max_epochs, self.total, self.state = max_epochs, total, state
        self._stream = stream  # None: sys.stdout when writing (Tune pickles the reporter)
        self.tty = self.stream.isatty()
        self.start = time.time()
        self.last_line, self.last_report = "", 0.0

    @property
    def stream(self):
        return self._stream or sys.stdout

    def __getstate__(self):
        return {**self.__dict__, "_stream": None}

    def setup(self, start_time=None, total_samples=None, metric=None, mode=None, **kwargs):
        self.start = start_time or self.start

    def should_report(self, trials, done: bool = False) -> bool:
        return done or time.time() - self.last_report >= (0.5 if self.tty else 1.0)

    def report(self, trials, done: bool, *sys_info) -> None:
        self.last_report = time.time()
        tracker = self.state.tracker if self.state is not None else None
        line = status_line(trials, self.max_epochs, self.total, self.last_report - self.start,
                           tracker.outcomes if tracker is not None else None)
        if self.tty:
            self.stream.write("\r\x1b[K" + line + ("\n" if done else ""))
        elif line.split("] ", 1)[1] != self.last_line.split("] ", 1)[-1]:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.last_line = line
