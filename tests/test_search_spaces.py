import random
import textwrap

import pytest

from search_spaces.loader import SpaceError, available, load_space
from trainables.config import TrialConfig


@pytest.mark.parametrize("name", available())
def test_every_shipped_space_loads_and_samples(name):
    space = load_space(name)
    rng = random.Random(0)
    for _ in range(20):
        cfg = space.sample(rng)
        assert isinstance(cfg, TrialConfig)
        for key, param in space.search.items():
            value = getattr(cfg, key)
            if param.type == "choice":
                assert value in param.values
            else:
                assert param.low <= value <= param.high


def test_shipped_spaces_say_what_the_brief_says():
    assert {"lr_decay", "seed_recipe", "smoke"} <= set(available())
    lr_decay = load_space("lr_decay")
    assert lr_decay.search["lr"].type == "loguniform"
    assert {"lr", "decay_power", "frozen_depth"} <= set(lr_decay.search)
    recipe = load_space("seed_recipe").config()
    assert (recipe.optimizer, recipe.lr, recipe.momentum, recipe.batch_size, recipe.max_epochs,
            recipe.decay_power, recipe.frozen_depth) == ("sgd", 0.001, 0.9, 32, 10, 0.0, 0)
    assert load_space("seed_recipe").search == {}


def write(tmp_path, text):
    path = tmp_path / "space.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


@pytest.mark.parametrize("text, culprit", [
    ("trials: 2\nsearch:\n  lr: {type: loguniform, low: 0.1, high: 0.01}\n", "search.lr: reversed bounds"),
    ("search:\n  lr: {type: gaussian, low: 0.1, high: 0.2}\n", "unknown distribution 'gaussian'"),
    ("search:\n  learning_rate: {type: uniform, low: 0.1, high: 0.2}\n", "unknown key search.learning_rate"),
    ("fixed:\n  lr: 0.1\n  epochs: 3\n", "unknown key fixed.epochs"),
    ("trails: 3\n", "unknown key trails"),
    ("fixed:\n  lr: -0.1\n", "lr must be > 0"),
    ("search:\n  lr: {type: uniform, low: 0.0, high: 0.1}\n", "lr must be > 0"),
    ("search:\n  lr: {type: uniform, low: 0.01, hi: 0.1}\n", "unknown key search.lr.hi"),
    ("fixed:\n  optimizer: lion\n", "optimizer must be one of sgd, adamw"),
    ("fixed:\n  batch_size: 3.5\n", "batch_size: expected an integer"),
    ("search: {lr: [1, 2}\n", "malformed YAML"),
    ("- just\n- a list\n", "expected a mapping"),
    ("asha: {grace_period: 0}\n", "grace_period >= 1"),
    ("search:\n  lr: {type: uniform, low: 0.01, high: 0.1}\nfixed:\n  lr: 0.1\n", "both searched and fixed"),
])
def test_bad_space_names_the_file_and_key(tmp_path, text, culprit):
    path = write(tmp_path, text)
    with pytest.raises(SpaceError) as err:
        load_space(path)
    assert path in str(err.value)
    assert culprit in str(err.value)


def test_unknown_space_name_lists_the_available_ones():
    with pytest.raises(SpaceError, match="unknown space 'lr_dacay'.*lr_decay"):
        load_space("lr_dacay")


def test_yaml_scientific_notation_and_user_path(tmp_path):
    # PyYAML reads 1e-3 (no dot) as a string; the loader coerces by the key's type.
    space = load_space(write(tmp_path, "search:\n  lr: {type: loguniform, low: 1e-3, high: 1e-1}\n"))
    assert space.search["lr"].low == pytest.approx(1e-3)
    assert space.name == "space"


def test_override_fixes_values():
    space = load_space("smoke").override(batch_size="16", max_epochs=2)
    assert space.config().batch_size == 16 and space.max_epochs == 2
    assert "lr" not in space.override(lr=0.1).search  # pinned: see the test below
    with pytest.raises(SpaceError, match="unknown trial config key"):
        space.override(epochs=3)


@pytest.mark.parametrize("kind", ["uniform", "loguniform"])
def test_a_fractional_distribution_on_an_integer_key_is_refused_at_load(tmp_path, kind):
    path = write(tmp_path, f"""
        search:
          batch_size: {{type: {kind}, low: 16, high: 64}}
    """)
    with pytest.raises(SpaceError, match=f"{path}: search.batch_size: {kind} draws fractional values.*integer key"):
        load_space(path)


def test_set_on_a_searched_key_takes_it_out_of_the_search_at_that_value():
    space = load_space("lr_decay")
    assert "frozen_depth" in space.search
    pinned = space.override(frozen_depth="0")
    assert "frozen_depth" not in pinned.search and pinned.fixed["frozen_depth"] == 0
    assert set(pinned.search) == set(space.search) - {"frozen_depth"}
    assert pinned.sample(random.Random(0)).frozen_depth == 0
    with pytest.raises(SpaceError, match="unknown trial config key 'frozen_dept'"):
        space.override(frozen_dept="0")
