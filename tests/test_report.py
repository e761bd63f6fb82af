"""The sweep report: a real smoke sweep and a seed_recipe run read back from MLflow, the HTML
checked as a file and as a page in headless Chromium, the CSV/Parquet exports and the artifact."""

import dataclasses
import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from dashboards import report
from dashboards.frame import Searched, load_sweep
from dashboards.importance import param_importances
from dashboards.report import build_html

from conftest import ROOT, run_sweep

CHROMIUM = "/usr/bin/chromium"
SEARCHED = {"lr", "decay_power", "frozen_depth"}
slow = pytest.mark.slow


@pytest.fixture(scope="module")
def sweep(cache_dir, tmp_path_factory):
    """A smoke sweep and a 2-epoch seed_recipe run in one experiment, then the report of the sweep."""
    cwd = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{cwd}/mlflow.db"
    common = ["--tracking-uri", uri, "--storage", str(cwd / "results"), "--experiment", "report-test"]
    proc = run_sweep(["--space", "smoke", "--name", "smoke-report", *common], cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(Path(proc.stdout.strip().splitlines()[-1]).read_text())
    recipe = run_sweep(["--space", "seed_recipe", "--max-epochs", "2", "--name", "recipe-report", *common],
                       cwd)
    assert recipe.returncode == 0, recipe.stdout[-3000:] + recipe.stderr[-3000:]
    out = cwd / "out" / "report.html"
    made = subprocess.run([sys.executable, str(ROOT / "dashboards" / "report.py"), "--tracking-uri", uri,
                           "--sweep", "smoke-report", "--out", str(out)],
                          cwd=cwd, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    return {"summary": summary, "client": MlflowClient(uri), "uri": uri, "out": out, "cwd": cwd}


@pytest.fixture(scope="module")
def frame(sweep):
    return load_sweep(sweep["client"], "smoke-report")


@slow
def test_frame_has_one_row_per_trial_with_config_metrics_and_outcome(sweep, frame):
    summary = sweep["summary"]
    trials = frame.trials
    assert len(trials) == sum(summary["trials"].values())
    assert sorted(trials["trial"]) == list(range(1, len(trials) + 1))
    expected = {"trial", "outcome", "epochs", "best_val_acc", "best_epoch", "final_val_acc", "final_val_loss",
                "start", "end", "duration_s", "run_id", "max_epochs", "batch_size", *SEARCHED}
    assert expected <= set(trials.columns)
    assert trials["outcome"].value_counts().to_dict() == {k: v for k, v in summary["trials"].items() if v}
    assert trials["best_val_acc"].max() == pytest.approx(summary["best"]["val_acc"])
    assert frame.best()["run_id"] == summary["best"]["run_id"]
    assert set(frame.searched) == SEARCHED and frame.searched["lr"].type == "loguniform"
    lo, hi = frame.searched["lr"].bounds
    assert trials["lr"].between(lo, hi).all() and trials["frozen_depth"].dtype.kind == "i"
    # the curves agree with the rows: as many epochs as the trial ran, its best is the row's
    for row in trials.itertuples():
        curve = frame.curves[frame.curves["trial"] == row.trial]
        assert list(curve["epoch"]) == list(range(1, row.epochs + 1))
        assert curve["val_acc"].max() == pytest.approx(row.best_val_acc)
        assert row.epochs == 3 if row.outcome == "completed" else row.epochs < 3
        assert 0 <= row.start_s < row.end_s <= frame.wall_s + 1
    recipe = frame.seed_recipe
    assert recipe is not None and recipe.name == "recipe-report"
    assert len(recipe.trials) == 1 and recipe.trials.loc[0, "epochs"] == 2 and not recipe.searched


@slow
def test_report_is_one_self_contained_file_with_every_section(sweep):
    text = sweep["out"].read_text()
    refs = Tags.of(text)
    for tag, attrs in refs.tags:
        for key in ("src", "href", "xlink:href"):
            assert not str(attrs.get(key, "")).startswith(("http:", "https:", "//")), (tag, attrs)
    assert "http://" not in text and "https://" not in text
    assert not [a for t, a in refs.tags if t == "link" or (t == "script" and "src" in a)]
    for anchor in ("curves", "params", "importance", "timeline", "seed", "trials"):
        assert refs.with_attr("id", anchor), anchor
    charts = {a["data-chart"] for t, a in refs.tags if t == "svg" and "data-chart" in a}
    assert {"curves", "parallel", "importance", "timeline", "compare-epoch", "compare-seconds",
            *(f"param-{k}" for k in SEARCHED)} <= charts
    n = sum(sweep["summary"]["trials"].values())
    assert len(refs.with_class("curve")) == n
    assert len(refs.with_attr("data-trial")) >= 4 * n  # curves, dots, lines, lanes and rows of each trial
    assert "fANOVA" in text and "recipe-report" in text


@slow
def test_table_exported_as_csv_and_parquet_next_to_the_report(sweep, frame):
    out, trials = sweep["out"], frame.trials
    parquet = pd.read_parquet(out.with_suffix(".parquet"))
    pd.testing.assert_frame_equal(parquet, trials, check_dtype=False)
    csv = pd.read_csv(out.with_suffix(".csv"))
    assert list(csv.columns) == list(trials.columns)
    for col in ("trial", "epochs", "best_val_acc", "lr", "frozen_depth", "duration_s"):
        assert csv[col].tolist() == pytest.approx(trials[col].tolist()), col
    assert csv["outcome"].tolist() == trials["outcome"].tolist()


@slow
def test_report_logged_to_the_sweeps_parent_run(sweep):
    client, parent = sweep["client"], sweep["summary"]["parent_run_id"]
    logged = {Path(f.path).name for f in client.list_artifacts(parent, "report")}
    assert logged == {"report.html", "report.csv", "report.parquet"}
    local = client.download_artifacts(parent, "report/report.html", str(sweep["cwd"] / "fetched"))
    assert Path(local).read_text() == sweep["out"].read_text()


@slow
def test_report_of_a_sweep_with_an_errored_and_a_running_trial(frame):
    """A trial that failed before its first epoch, and one still running, as a live sweep has them."""
    frame = dataclasses.replace(frame, trials=frame.trials.copy())
    t = frame.trials
    failed, running = t["trial"].iloc[-1], t["trial"].iloc[0]
    t.loc[t["trial"] == failed, ["outcome", "best_val_acc", "epochs"]] = ["errored", float("nan"), 0]
    t.loc[t["trial"] == running, "outcome"] = "running"
    t.loc[t["trial"] == t["trial"].iloc[1], "outcome"] = "time_budget"  # cut by --time-budget
    frame.curves = frame.curves[frame.curves["trial"] != failed]
    text = build_html(frame)
    assert "1 errored" in text and "1 running" in text and "1 time budget" in text
    page = Tags.of(text)
    assert len(page.with_class("curve")) == len(t) - 1  # no curve for a trial without an epoch
    assert len(page.with_class("span")) == len(t)  # but it is on the timeline


@slow
def test_unknown_sweep_exits_2_naming_the_sweeps_there(sweep, capsys):
    assert report.main(["--sweep", "no-such-sweep", "--tracking-uri", sweep["uri"], "--no-log"]) == 2
    err = capsys.readouterr().err
    assert "no-such-sweep" in err and "smoke-report" in err and "recipe-report" in err


@slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(),
                    reason=f"{CHROMIUM} not installed (apt-get install -y chromium; CI installs it)")
def test_report_renders_in_headless_chromium(sweep, frame, tmp_path):
    url = sweep["out"].resolve().as_uri()
    dom = chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", url).stdout
    page = Tags.of(dom)
    body = next(a for t, a in page.tags if t == "body")
    assert body.get("data-rendered") == "ok" and not body.get("data-errors"), body
    assert len([1 for t, a in page.tags if t == "svg" and "chart" in a.get("class", "").split()]) >= 9
    # the script sorted the table by best val_acc, best first
    trials = frame.trials.set_index("trial")
    order = [int(a["data-trial"]) for t, a in page.tags if t == "tr" and "data-trial" in a]
    accs = [trials.loc[t, "best_val_acc"] for t in order]
    assert sorted(order) == sorted(trials.index) and accs == sorted(accs, reverse=True)
    assert [a for t, a in page.tags if t == "th" and a.get("aria-sort") == "descending"]

    shot = tmp_path / "report.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1400,3000", "--hide-scrollbars", url)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1400, 3000)
    colours = image.getcolors(maxcolors=1 << 20)
    assert len(colours) > 50, "the screenshot is (nearly) blank"
    # the outcome colours of curves, bars and legends were painted, not just text
    painted = sum(n for n, c in colours if any(sum(abs(a - b) for a, b in zip(c, ref, strict=True)) < 30
                                                for ref in ((37, 99, 235), (245, 158, 11))))
    assert painted > 500


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile / 'chromium-profile'}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


class Tags(HTMLParser):
    """Every start tag of a page with its attributes, in document order."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    @classmethod
    def of(cls, text: str) -> "Tags":
        parser = cls()
        parser.feed(text)
        return parser

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def with_attr(self, key: str, value: str | None = None) -> list[dict]:
        return [a for _, a in self.tags if key in a and (value is None or a[key] == value)]

    def with_class(self, name: str) -> list[dict]:
        return [a for _, a in self.tags if name in a.get("class", "").split()]


# --- importance: the notes instead of numbers when there is nothing to measure (fast) -----------

SPACE = {"lr": Searched("lr", "loguniform", [1e-3, 0.1]),
         "frozen_depth": Searched("frozen_depth", "int", [0, 2])}


def trial_rows(rows):
    keys = ("lr", "frozen_depth", "best_val_acc")
    return pd.DataFrame([dict(zip(keys, r, strict=True), outcome="completed") for r in rows])


def test_importance_names_the_parameter_that_explains_val_acc():
    rows = [(lr, depth, 0.5 + 4 * lr) for lr in (0.001, 0.005, 0.01, 0.05, 0.09) for depth in (0, 1, 2)]
    scores, note = param_importances(trial_rows(rows), SPACE)
    assert max(scores, key=scores.get) == "lr" and sum(scores.values()) == pytest.approx(1)
    assert "fANOVA" in note


@pytest.mark.parametrize("rows, says", [
    ([(0.01, 1, 0.9)], "at least 2"),
    ([(0.01, 1, 0.9), (0.02, 2, 0.9)], "same val_acc"),
    ([(0.01, 1, 0.9), (0.01, 1, 0.8)], "same values"),
    ([(0.5, 1, 0.9), (0.7, 1, 0.8)], "at least 2"),  # outside the searched range: left out
])
def test_importance_explains_why_it_has_no_numbers(rows, says):
    scores, note = param_importances(trial_rows(rows), SPACE)
    assert scores == {} and says in note


def test_searched_param_parsed_from_the_parent_runs_param():
    assert Searched.parse("lr", "loguniform[0.001, 0.2]") == Searched("lr", "loguniform", [0.001, 0.2])
    assert Searched.parse("optimizer", "choice['sgd', 'adamw']").bounds == ["sgd", "adamw"]



def _sweep_with_curve(name, points, wall_s):
    """A Sweep whose trials reported (seconds since its start, val_acc) = ``points``."""
    from types import SimpleNamespace

    from dashboards.frame import Sweep

    curves = pd.DataFrame({"trial": [i % 2 + 1 for i in range(len(points))],
                           "epoch": [i // 2 + 1 for i in range(len(points))],
                           "val_acc": [v for _, v in points], "time_s": [t for t, _ in points]})
    parent = SimpleNamespace(data=SimpleNamespace(tags={"ftsweep.sweep": name, "space": name}, params={}),
                             info=SimpleNamespace(run_name=name, start_time=0, end_time=wall_s * 1000))
    return Sweep(parent, pd.DataFrame(), curves, {})


def test_anytime_curve_is_the_best_so_far_at_each_improvement():
    s = _sweep_with_curve("a", [(30.0, 0.5), (10.0, 0.4), (20.0, 0.6), (40.0, 0.55), (50.0, 0.7)], 60)
    curve = s.anytime()
    assert list(zip(curve["time_s"], curve["best"], strict=True)) == [(10.0, 0.4), (20.0, 0.6), (50.0, 0.7)]


def test_two_sweeps_on_one_anytime_chart():
    from dashboards import charts

    a = _sweep_with_curve("asha", [(10.0, 0.4), (20.0, 0.6)], 60)
    b = _sweep_with_curve("promotion", [(15.0, 0.5), (40.0, 0.8)], 50)
    svg = charts.anytime_curves([("asha", a, "#111111", False), ("promotion", b, "#222222", False)])
    page = Tags.of(svg)
    lines = page.with_class("anytime")
    assert len(lines) == 2
    assert [a["stroke"] for a in lines] == ["#111111", "#222222"]
    # a step line: up at each new best, flat until the next one and on to the sweep's wall time
    first = [tuple(map(float, p.split(","))) for p in lines[0]["points"].split()]
    assert len(first) == 4 and first[0][1] == first[1][1] and first[1][0] == first[2][0]
    assert "promotion: best val_acc 0.8000 at 40 s" in svg


@slow
def test_report_draws_a_compared_sweep_on_the_anytime_chart(sweep, tmp_path):
    out = tmp_path / "compare.html"
    assert report.main(["--sweep", "smoke-report", "--compare", "recipe-report", "--tracking-uri", sweep["uri"],
                        "--out", str(out), "--no-log"]) == 0
    page = Tags.of(out.read_text())
    assert page.with_attr("id", "anytime")
    # the sweep, the compared run, and the experiment's seed recipe (here the same run, dashed)
    assert len(page.with_class("anytime")) == 3
    assert report.main(["--sweep", "smoke-report", "--compare", "no-such-sweep", "--tracking-uri", sweep["uri"],
                        "--no-log"]) == 2


def test_of_tied_epochs_the_latest_is_the_best():
    import pandas as pd

    from dashboards.frame import best_epoch

    curve = pd.DataFrame({"epoch": [1, 2, 3, 4], "val_acc": [0.5, 0.9, 0.9, 0.7]})
    assert int(best_epoch(curve)["epoch"]) == 3
    assert best_epoch(curve.iloc[:0]) is None
