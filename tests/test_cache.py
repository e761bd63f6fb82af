"""sweeps/results/cache.py: the decoded caches on a node, listed with their sizes, and removed."""

from sweeps.results import cache
from trainables.data import DataHandle, scan

from conftest import write_image_folder

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def test_decoded_caches_are_listed_with_their_size_and_removed(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FTSWEEP_CACHE", str(tmp_path / "cache"))
    root = cache.decoded_root()
    root.mkdir(parents=True)
    keys = []
    for i, size in enumerate((16, 24)):
        data = scan(write_image_folder(tmp_path / f"data{i}", seed=i))
        keys.append(DataHandle(data, size, str(root), MEAN, STD).prepare(skip_bad=False).key)
    assert cache.main(["list"]) == 0
    out = capsys.readouterr().out
    for key in keys:
        assert key in out
    assert "16px" in out and "24px" in out and "2 decoded cache(s)" in out
    listed = {e["key"]: e for e in cache.caches()}
    assert all(listed[k]["bytes"] > 0 for k in keys)

    assert cache.main(["remove", keys[0]]) == 0
    assert {e["key"] for e in cache.caches()} == {keys[1]}
    assert cache.main(["remove", "nosuchkey"]) == 2
    assert cache.main(["remove"]) == 2  # neither KEY nor --all
    assert cache.main(["remove", "--all"]) == 0
    assert cache.caches() == []
