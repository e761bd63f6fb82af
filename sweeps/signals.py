"""Ctrl-C and SIGTERM during a sweep: noted, so an interrupted sweep is never called a success.

A module of its own, not ``run.py``: Ray Tune pickles its callbacks with the sweep's state
(and ``Tuner.restore`` brings back the first run's), so the callback must be a class that
pickles by reference and holds nothing; it finds the sweep's ``CtrlC`` through ``active``.
"""

from __future__ import annotations

import signal
import threading

from ray.tune import Callback


class CtrlC:
    """Notes a Ctrl-C (SIGINT) or a SIGTERM during ``Tuner.fit()``. Ray Tune catches SIGINT,
    saves its state and returns as if the sweep had ended; without this note the driver
    would call an interrupted sweep a success. A SIGTERM (``kill``, a cluster's scheduler)
    is stopped the same way instead of killing the driver mid-write; a second one kills.
    Its ``callback()``'s ``setup`` runs once Tune's own handler is in place, and wraps it;
    leaving the ``with`` restores the handlers from before."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    active: CtrlC | None = None  # the sweep this driver process runs now

    def __init__(self):
        self.caught: signal.Signals | None = None

    def __enter__(self):
        # None: a handler not set from Python; the default is what restoring can give back
        self._before = {sig: signal.getsignal(sig) or signal.SIG_DFL for sig in self.SIGNALS}
        CtrlC.active = self
        return self

    def __exit__(self, *exc):
        CtrlC.active = None
        if threading.current_thread() is threading.main_thread():
            for sig, handler in self._before.items():
                signal.signal(sig, handler)

    def callback(self) -> NoteSignals:
        return NoteSignals()

    def wrap_tune_handler(self):
        tune_handler = signal.getsignal(signal.SIGINT)

        def note(sig, frame):
            self.caught = self.caught or signal.Signals(sig)
            if sig == signal.SIGTERM:
                signal.signal(signal.SIGTERM, self._before[signal.SIGTERM])  # a second one kills
            if callable(tune_handler):
                tune_handler(sig, frame)  # Tune's: stop, save, restore the SIGINT handler from before
            else:
                raise KeyboardInterrupt

        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                signal.signal(sig, note)


class NoteSignals(Callback):
    """Ray Tune callback: once Tune's own SIGINT handler is in place (``setup``), the active
    ``CtrlC`` wraps it."""

    def setup(self, **info):
        if CtrlC.active is not None:
            CtrlC.active.wrap_tune_handler()
