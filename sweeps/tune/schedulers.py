"""Schedulers that pause a trial at a rung and resume it from its checkpoint when promoted.

``PromotionScheduler`` is asynchronous successive halving with promotion (as Syne Tune's
promotion-based Hyperband): a trial that reaches a rung goes on only if it is among the top
1/η of the trials that reached that rung; otherwise it is paused, its checkpoint kept.
When a lane frees, the best promotable paused trial (highest rung first, then best
objective) is resumed before a new trial starts. Stopping-based ASHA throws away the epochs
of every trial it stops; here a trial cut at a rung can still come back when later trials
turn out worse.

``TopKScheduler`` is the one-epoch-top-k baseline: every trial trains to its single rung
(one epoch by default) and pauses; once all of them have, the best k are resumed and train
to the full budget, the rest end there.

Both rebuild their rungs after ``Tuner.restore`` from the results each trial recorded (and
bring the searcher up to date with the restored trials, sweeps/tune/restored.py), and
put the trials that were waiting at a rung back in PAUSED (Tune's restore makes every
unfinished trial PENDING).
"""

from __future__ import annotations

import math

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher

from sweeps.records.state import SweepState, not_promoted
from sweeps.tune import restored


def rung_milestones(grace_period: int, reduction_factor: float, max_t: int) -> list[int]:
    """``grace_period · η^k`` below ``max_t``, as ASHA's rungs."""
    out, t = [], grace_period
    while t < max_t:
        if not out or int(t) > out[-1]:
            out.append(int(t))
        t *= reduction_factor
    return out


class PromotionScheduler(restored.CatchUpOnRestore, FIFOScheduler):
    """Asynchronous successive halving that pauses instead of stopping (see the module)."""

    def __init__(self, time_attr: str, metric: str, mode: str, max_t: int, grace_period: int = 1,
                 reduction_factor: float = 3.0, state: SweepState | None = None):
        super().__init__()
        self.state = state or SweepState()  # where its pauses and stops are recorded
        self._time_attr, self._metric, self._mode = time_attr, metric, mode
        self.max_t, self.reduction_factor = max_t, reduction_factor
        self.milestones = rung_milestones(grace_period, reduction_factor, max_t)
        self.rungs: dict[int, dict[str, float]] = {m: {} for m in self.milestones}  # trial id -> score
        self.promoted: dict[int, set[str]] = {m: set() for m in self.milestones}
        self._replayed = False

    def set_search_properties(self, metric, mode, **spec) -> bool:
        self._metric = self._metric or metric
        self._mode = self._mode or mode
        return True

    # --- decisions -----------------------------------------------------------------------
    def score(self, result: dict) -> float:
        value = float(result[self._metric])
        return value if self._mode == "max" else -value

    def record(self, trial_id: str, rung: int, score: float) -> None:
        self.rungs[rung][trial_id] = score

    def quota(self, rung: int) -> int:
        """How many of the trials that reached ``rung`` may go on from it."""
        return math.floor(len(self.rungs[rung]) / self.reduction_factor)

    def promotable(self, rung: int, trial_id: str) -> bool:
        if trial_id in self.promoted[rung]:
            return False
        ranked = sorted(self.rungs[rung].items(), key=lambda kv: -kv[1])
        return trial_id in {t for t, _ in ranked[:self.quota(rung)]}

    def on_trial_result(self, tune_controller, trial, result) -> str:
        if self._time_attr not in result or self._metric not in result:
            return TrialScheduler.CONTINUE
        t = int(result[self._time_attr])
        if t >= self.max_t:
            return TrialScheduler.STOP
        if t not in self.rungs:
            return TrialScheduler.CONTINUE
        self.record(trial.trial_id, t, self.score(result))
        if trial.trial_id in self.promoted[t]:  # seen again after a restore: it went on before
            return TrialScheduler.CONTINUE
        if self.promotable(t, trial.trial_id) and self.goes_on_now(tune_controller, trial, t):
            self.promoted[t].add(trial.trial_id)
            return TrialScheduler.CONTINUE
        self.state.pause(trial.trial_id, t)
        return TrialScheduler.PAUSE

    def goes_on_now(self, tune_controller, trial, rung: int) -> bool:
        """A promotable trial at its rung keeps its lane, unless a paused trial deserves it
        more (promotable from a higher rung, or from this rung with a better score)."""
        mine = (rung, self.rungs[rung][trial.trial_id])
        return all(key <= mine for key, _ in self.candidates(tune_controller.get_trials()))

    def candidates(self, trials) -> list[tuple[tuple[int, float], Trial]]:
        """Paused trials that may be resumed now, keyed by (rung, score)."""
        out = []
        for t in trials:
            if t.status == Trial.PAUSED:
                rung = self.rung_of(t)
                if rung is not None and self.promotable(rung, t.trial_id):
                    out.append(((rung, self.rungs[rung][t.trial_id]), t))
        return out

    def rung_of(self, trial) -> int | None:
        t = int((trial.last_result or {}).get(self._time_attr, 0))
        return t if t in self.rungs else None

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        trials = tune_controller.get_trials()
        if not self._replayed:
            self._replayed = True
            restored.forget_unlisted(tune_controller)
            self.replay(tune_controller, trials)
        self.sync(tune_controller, trials)
        found = self.candidates(trials)
        if found:
            (rung, _), trial = max(found, key=lambda kv: kv[0])
            self.promoted[rung].add(trial.trial_id)
            self.state.paused.discard(trial.trial_id)
            return trial
        self.end_hopeless(tune_controller, trials)
        pending = [t for t in trials if t.status == Trial.PENDING]
        # a trial resumed earlier but still waiting for its lane goes before a new one
        pending.sort(key=lambda t: -int((t.last_result or {}).get(self._time_attr, 0)))
        return pending[0] if pending else None

    def sync(self, tune_controller, trials) -> None:
        """Tell the search's lane limiter which trials wait at a rung: they hold no lane."""
        waiting = {t.trial_id for t in trials if t.status == Trial.PAUSED}
        self.state.paused = set(waiting)
        limiter = lane_limiter(tune_controller)
        if limiter is not None:
            limiter.paused = waiting

    # --- the end -------------------------------------------------------------------------
    def end_hopeless(self, tune_controller, trials) -> None:
        """End the paused trials no future result can promote: no new trial will come, and
        every trial still to run is at or past their rung. They end stopped early, as ASHA
        would have stopped them."""
        if not _search_finished(tune_controller):
            return
        active = [int((t.last_result or {}).get(self._time_attr, 0)) for t in trials
                  if t.status in (Trial.PENDING, Trial.RUNNING)]
        lowest = min(active, default=math.inf)
        for t in trials:
            rung = self.rung_of(t) if t.status == Trial.PAUSED else None
            if rung is not None and rung <= lowest and not self.promotable(rung, t.trial_id):
                self.stop_paused(tune_controller, t, rung)

    def stop_paused(self, tune_controller, trial, rung: int) -> None:
        self.state.stop(trial.trial_id, not_promoted(rung))
        result = trial.last_result
        result["stop_reason"] = not_promoted(rung)
        # the searcher learns the trial's score (stop_trial tells it none for a paused trial)
        tune_controller.search_alg.on_trial_complete(trial.trial_id, result=result)
        tune_controller.stop_trial(trial)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self.state.paused.discard(trial.trial_id)

    # --- restore -------------------------------------------------------------------------
    def replay(self, tune_controller, trials) -> int:
        """Rebuild the rungs from every trial's recorded results, and put back in PAUSED the
        unfinished trials whose last result is a rung they did not go on from."""
        replayed = 0
        for trial in trials:
            results = restored.recorded_results(trial)
            last = max((int(r.get(self._time_attr, 0)) for r in results), default=0)
            for r in results:
                t = int(r.get(self._time_attr, 0))
                if t in self.rungs and self._metric in r:
                    self.record(trial.trial_id, t, self.score(r))
                    if last > t:
                        self.promoted[t].add(trial.trial_id)
                    replayed += 1
            if trial.status == Trial.PENDING and last in self.rungs and trial.trial_id not in self.promoted[last]:
                tune_controller._set_trial_status(trial, Trial.PAUSED)
                self.state.paused.add(trial.trial_id)
        if replayed:
            waiting = sum(t.status == Trial.PAUSED for t in trials)
            print(f"{type(self).__name__}: rungs rebuilt from {replayed} results recorded before the restart; "
                  f"{waiting} trials paused at a rung")
        return replayed

    def debug_string(self) -> str:
        return f"{type(self).__name__}: rungs {self.milestones}, " + ", ".join(
            f"{m}: {len(self.rungs[m])} reached, {len(self.promoted[m])} promoted" for m in self.milestones)


class TopKScheduler(PromotionScheduler):
    """Every trial trains to one rung (``rung`` epochs) and waits there; when all have, the
    best ``k`` train on to the full budget and the rest end."""

    def __init__(self, time_attr: str, metric: str, mode: str, max_t: int, k: int = 3, rung: int = 1,
                 state: SweepState | None = None):
        super().__init__(time_attr, metric, mode, max_t, grace_period=rung, reduction_factor=2.0, state=state)
        self.milestones = [rung] if rung < max_t else []
        self.rungs = {m: {} for m in self.milestones}
        self.promoted = {m: set() for m in self.milestones}
        self.k = k
        self._complete = False  # every trial has reached the rung (or ended before it)

    def quota(self, rung: int) -> int:
        return self.k if self._complete else 0

    def goes_on_now(self, tune_controller, trial, rung: int) -> bool:
        return False  # even the last to arrive waits: the lanes take the best k in order

    def choose_trial_to_run(self, tune_controller):
        trials = tune_controller.get_trials()
        if self.milestones and not self._complete:
            rung = self.milestones[0]
            below = [t for t in trials if t.status in (Trial.PENDING, Trial.RUNNING)
                     and int((t.last_result or {}).get(self._time_attr, 0)) < rung]
            self._complete = self._replayed and _search_finished(tune_controller) and not below
        return super().choose_trial_to_run(tune_controller)

    def debug_string(self) -> str:
        return f"TopKScheduler: top {self.k} of rung {self.milestones} " + super().debug_string()


class LaneLimiter(ConcurrencyLimiter):
    """At most ``max_concurrent`` trials hold a lane; a trial paused at a rung holds none.

    Ray Tune's limiter counts every suggested trial until it ends, paused ones too, so with
    all lanes' trials paused it would suggest nothing and the sweep would wait forever. The
    scheduler tells it which trials are paused (``paused``) before every step that starts
    trials.
    """

    def __init__(self, searcher: Searcher, max_concurrent: int):
        super().__init__(searcher, max_concurrent)
        self.paused: set[str] = set()

    def suggest(self, trial_id: str):
        if len(self.live_trials - self.paused) >= self.max_concurrent:
            return None
        suggestion = self.searcher.suggest(trial_id)
        if suggestion not in (None, Searcher.FINISHED):
            self.live_trials.add(trial_id)
            self.num_unfinished_live_trials += 1
        return suggestion


def lane_limiter(tune_controller) -> LaneLimiter | None:
    searcher = getattr(tune_controller.search_alg, "searcher", None)
    while searcher is not None and not isinstance(searcher, LaneLimiter):
        searcher = getattr(searcher, "searcher", None)
    return searcher


def _search_finished(tune_controller) -> bool:
    return tune_controller.search_alg.is_finished()


def pausing_scheduler(settings: dict, *, time_attr: str, metric: str, mode: str, max_t: int,
                      state: SweepState | None = None):
    """The pausing scheduler a space's ``scheduler:`` section names (search_spaces/loader.py checked it)."""
    kind = settings["type"]
    if kind == "promotion":
        return PromotionScheduler(time_attr, metric, mode, max_t,
                                  grace_period=min(settings["grace_period"], max_t),
                                  reduction_factor=settings["reduction_factor"], state=state)
    if kind == "top_k":
        return TopKScheduler(time_attr, metric, mode, max_t, k=settings["k"], rung=settings["rung"], state=state)
    raise ValueError(f"not a pausing scheduler: {kind}")


PAUSING = ("promotion", "top_k")


def resumes_from_checkpoint(trainable) -> bool:
    """Whether a trainable can continue from a checkpoint: a class Trainable that loads one,
    or a function trainable whose code (or a function it defines) calls ``get_checkpoint``."""
    import inspect

    from ray.tune import Trainable

    target = inspect.unwrap(trainable)
    if inspect.isclass(target):
        return issubclass(target, Trainable) and target.load_checkpoint is not Trainable.load_checkpoint
    code = getattr(target, "__code__", None)
    stack = [code] if code is not None else []
    while stack:
        code = stack.pop()
        if "get_checkpoint" in code.co_names:
            return True
        stack.extend(c for c in code.co_consts if inspect.iscode(c))
    return False
