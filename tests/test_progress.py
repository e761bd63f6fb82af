import io
from types import SimpleNamespace

from sweeps.tune.progress import LiveStatus, counts, status_line


def trial(status, epoch=0, acc=None, trial_id="t"):
    result = {"epoch": epoch, **({"val_acc": acc} if acc is not None else {})}
    analysis = {"val_acc": {"max": acc}} if acc is not None else {}
    return SimpleNamespace(status=status, last_result=result, metric_analysis=analysis, trial_id=trial_id)


TRIALS = [trial("RUNNING", 1, 0.5, "a"), trial("PENDING"), trial("TERMINATED", 3, 0.9, "b"),
          trial("TERMINATED", 1, 0.4, "c"), trial("ERROR", 1, 0.2, "d")]


def test_counts_each_state_and_outcome():
    assert counts(TRIALS, max_epochs=3) == {"pending": 1, "running": 1, "completed": 1,
                                            "stopped_early": 1, "time_budget": 0, "errored": 1, "paused": 0}
    line = status_line(TRIALS, 3, total=8, elapsed=75)
    assert line.startswith("[01:15] 5/8 trials: 1 running, 1 pending, 1 completed, 1 stopped early")
    assert "best val_acc 0.9000 (trial b)" in line


def test_a_log_gets_a_line_only_when_something_changed():
    out = io.StringIO()
    live = LiveStatus(max_epochs=3, total=5, stream=out)
    for _ in range(3):
        live.report(TRIALS, done=False)
    live.report(TRIALS[:2], done=True)
    assert len(out.getvalue().splitlines()) == 2


def test_a_terminal_line_is_rewritten_in_place():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    live = LiveStatus(max_epochs=3, total=5, stream=out)
    live.report(TRIALS, done=False)
    live.report(TRIALS, done=True)
    assert out.getvalue().count("\r\x1b[K") == 2 and out.getvalue().count("\n") == 1
