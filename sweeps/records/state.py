"""What one sweep decided about its trials: why each one stopped, where it paused, how it ended.

One ``SweepState`` is made per sweep (``sweeps/run.py``'s ``execute``) and handed to the
scheduler, the MLflow callback, the signal handler, the live status line and the summary:
a stop records its reason here when it is decided, so no outcome is told by elimination.

Ray Tune pickles the Tuner with its callbacks and scheduler, and ``Tuner.restore`` brings
those copies back instead of taking new ones. A state therefore pickles as its sweep's key
and unpickles as the state that sweep has open in this process (``SweepState.open``).
"""

from __future__ import annotations

import contextlib
import signal
from typing import ClassVar

# Why a trial stopped before its own budget, as its MLflow ``stop_reason`` tag says.
ASHA, PATIENCE, TIME_BUDGET = "asha", "patience", "time_budget"
WAITED_AT_RUNG = "the sweep ended while the trial waited at a rung"


def not_promoted(rung: int) -> str:
    return f"not promoted from rung {rung}"


class SweepState:
    """The decisions of one sweep (see the module)."""

    _open: ClassVar[dict[str, SweepState]] = {}  # the sweeps this process runs now, by key

    def __init__(self, key: str = "", tracker=None):
        self.key = key
        self.tracker = tracker  # the sweep's SweepTracker: where the MLflow callback writes
        self.stops: dict[str, str] = {}  # trial id -> why a scheduler or the clock stopped it
        self.pauses: dict[str, list[int]] = {}  # trial id -> the rungs it paused at, in order
        self.paused: set[str] = set()  # trials waiting at a rung now
        self.signal: signal.Signals | None = None  # the Ctrl-C or SIGTERM that stopped the sweep
        self.ctrl_c = None  # while Tune fits: the sweep's signals.CtrlC, which wraps Tune's handler
        self.clock_ran_out = False  # --time-budget stopped the sweep

    # --- decisions, as they are taken ---------------------------------------------------
    def stop(self, trial_id: str, reason: str) -> None:
        self.stops.setdefault(trial_id, reason)
        self.paused.discard(trial_id)

    def pause(self, trial_id: str, rung: int) -> None:
        self.pauses.setdefault(trial_id, []).append(rung)
        self.paused.add(trial_id)

    def outcome(self, trial_id: str, last_result: dict, budget: int, errored: bool = False,
                paused: bool = False) -> tuple[str, str]:
        """A trial's outcome and stop reason, from what stopped it. ``budget`` is the
        trial's own epochs (``trial_budget``); ``paused``: it waits at a rung."""
        if errored or last_result.get("diverged"):  # the trial's own words, e.g. "loss became nan"
            return "errored", last_result.get("stop_reason") or ("diverged" if last_result.get("diverged") else "error")
        if int(last_result.get("epoch", 0)) >= budget:
            return "completed", ""
        reason = self.stops.get(trial_id)
        if reason == TIME_BUDGET:
            return "time_budget", reason
        if reason:
            return "stopped_early", reason
        if last_result.get("early_stopped"):
            return "stopped_early", PATIENCE
        if paused:
            return "paused", WAITED_AT_RUNG
        # It returned before its budget with no stop recorded: its own last epoch.
        return "completed", ""

    # --- one per sweep, also through Tune's pickles ---------------------------------------
    @contextlib.contextmanager
    def open(self):
        """Within it, a pickled copy of this state (a restored callback's) is this state."""
        if self.key in SweepState._open:
            raise RuntimeError(f"sweep {self.key} is running already in this process")
        SweepState._open[self.key] = self
        try:
            yield self
        finally:
            SweepState._open.pop(self.key, None)

    def __reduce__(self):  # see the module: a pickled state is the open state of its sweep
        return _open_state, (self.key,)

    def as_record(self) -> dict:
        """What a restored sweep must remember (the MLflow callback's state in Tune's snapshot)."""
        return {"stops": self.stops, "pauses": self.pauses}

    def restore(self, record: dict) -> None:
        for trial_id, reason in record.get("stops", {}).items():
            self.stops.setdefault(trial_id, reason)
        for trial_id, rungs in record.get("pauses", {}).items():
            self.pauses.setdefault(trial_id, list(rungs))


def _open_state(key: str) -> SweepState:
    try:
        return SweepState._open[key]
    except KeyError:  # unpickled outside the sweep's run: a state of its own, with nothing in it
        return SweepState(key)
