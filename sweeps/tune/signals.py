"""Ctrl-C and SIGTERM during a sweep: noted, so an interrupted sweep is never called a success.

The signal is recorded on the sweep's state (sweeps/records/state.py), which the callback
holds: ``Tuner.restore`` brings back the first run's callback, whose state is this run's.
"""

from __future__ import annotations

import contextlib
import signal
import threading

from ray.tune import Callback

from sweeps.records.state import SweepState


class CtrlC:
    """Notes a Ctrl-C (SIGINT) or a SIGTERM during ``Tuner.fit()``. Ray Tune catches SIGINT,
    saves its state and returns as if the sweep had ended; without this note the driver
    would call an interrupted sweep a success. A SIGTERM (``kill``, a cluster's scheduler)
    is stopped the same way instead of killing the driver mid-write; a second one kills.
    Its ``callback()``'s ``setup`` runs once Tune's own handler is in place, and wraps it;
    leaving the ``with`` restores the handlers from before."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, state: SweepState):
        self.state = state

    @property
    def caught(self) -> signal.Signals | None:
        return self.state.signal

    def __enter__(self):
        # None: a handler not set from Python; the default is what restoring can give back
        self._before = {sig: signal.getsignal(sig) or signal.SIG_DFL for sig in self.SIGNALS}
        self.state.ctrl_c = self
        return self

    def __exit__(self, *exc):
        self.state.ctrl_c = None
        if threading.current_thread() is threading.main_thread():
            for sig, handler in self._before.items():
                signal.signal(sig, handler)

    def callback(self) -> NoteSignals:
        return NoteSignals(self.state)

    def wrap_tune_handler(self):
        tune_handler = signal.getsignal(signal.SIGINT)

        def note(sig, frame):
            self.state.signal = self.state.signal or signal.Signals(sig)
            if sig == signal.SIGTERM:
                signal.signal(signal.SIGTERM, self._before[signal.SIGTERM])  # a second one kills
            if callable(tune_handler):
                tune_handler(sig, frame)  # Tune's: stop, save, restore the SIGINT handler from before
            else:
                raise KeyboardInterrupt

        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                signal.signal(sig, note)


class Terminated(BaseException):
    """A SIGTERM outside ``Tuner.fit()`` (while the sweep ends): it stops the driver as Ctrl-C's
    KeyboardInterrupt does, so the sweep's MLflow run is ended KILLED instead of left RUNNING."""


@contextlib.contextmanager
def sigterm_raises():
    """Within it, SIGTERM raises ``Terminated`` in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(sig, frame):
        raise Terminated(signal.Signals(sig).name)

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


class NoteSignals(Callback):
    """Ray Tune callback: once Tune's own SIGINT handler is in place (``setup``), the sweep's
    ``CtrlC`` wraps it."""

    def __init__(self, state: SweepState):
        self.state = state

    def setup(self, **info):
        if self.state.ctrl_c is not None:
            self.state.ctrl_c.wrap_tune_handler()
