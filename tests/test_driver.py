"""The Ray Tune wiring, without starting Ray."""

import json
from types import SimpleNamespace

from pyarrow import fs
from ray import tune

from search_spaces.loader import load_space
from sweeps.tune.driver import ResumableASHA, param_space


def test_asha_rungs_are_rebuilt_from_recorded_results(tmp_path):
    """Tune does not snapshot the scheduler; a resumed sweep replays what trials recorded."""
    def trial(name, accs):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "result.json").write_text("".join(
            json.dumps({"training_iteration": i + 1, "val_acc": a}) + "\n" for i, a in enumerate(accs)))
        return SimpleNamespace(trial_id=name, last_result={"val_acc": accs[-1]}, storage=SimpleNamespace(
            storage_filesystem=fs.LocalFileSystem(), trial_fs_path=str(folder), trial_dir_name=name))

    asha = ResumableASHA(time_attr="training_iteration", metric="val_acc", mode="max", max_t=9,
                         grace_period=1, reduction_factor=3)
    done = [trial("a", [0.9, 0.95, 0.97]), trial("b", [0.5]), trial("c", [0.6])]
    fresh = SimpleNamespace(trial_id="new", last_result={}, storage=None)  # nothing reported yet
    assert asha.replay([*done, fresh]) == 5
    rung_1 = dict(asha._brackets[0]._rungs)[1]
    assert rung_1 == {"a": 0.9, "b": 0.5, "c": 0.6}
    assert dict(asha._brackets[0]._rungs)[3] == {"a": 0.97}
    # A trial arriving after the restart is judged against the replayed rung: 0.55 is cut.
    assert asha._brackets[0].on_result(SimpleNamespace(trial_id="d"), 1, 0.55) == "STOP"



def test_param_space_searches_the_space_and_fixes_the_rest():
    space = load_space("lr_decay")
    params = param_space(space)
    assert isinstance(params["lr"], tune.search.sample.Float)
    assert isinstance(params["frozen_depth"], tune.search.sample.Integer)
    assert params["frozen_depth"].upper == 5  # randint excludes its upper bound: 0..4
    assert params["max_epochs"] == 6 and params["optimizer"] == "sgd"
