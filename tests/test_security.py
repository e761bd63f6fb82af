"""Static checks of what the code base must never do."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("sweeps", "trainables", "dashboards", "search_spaces") for p in (ROOT / d).rglob("*.py")]


def test_every_torch_load_is_weights_only():
    calls = []
    for path in SOURCES:
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(", text):
            depth, end = 0, match.end() - 1
            for end in range(match.end() - 1, len(text)):  # to the matching parenthesis
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            call = text[match.start():end + 1]
            calls.append(call)
            assert "weights_only=True" in call, f"{path.name}: {call}"
    assert len(calls) >= 4  # the trial, the summary, the demo, the best-model loader


def test_servers_in_the_readme_bind_to_loopback():
    readme = (ROOT / "README.md").read_text()
    for line in readme.splitlines():
        if re.search(r"\b(mlflow (server|ui)|ray start --head)\b", line):
            assert "--host 0.0.0.0" not in line
            assert "127.0.0.1" in line, line


def test_ray_token_authentication_is_never_turned_off():
    for path in [*SOURCES, *(ROOT / "cluster").rglob("*"), ROOT / ".ci" / "run"]:
        if path.is_file():
            assert "RAY_AUTH_MODE=disabled" not in path.read_text(errors="ignore"), path
