"""torchvision's classification models by name, known without importing torchvision.

Importing torchvision takes seconds (it imports ``torch._dynamo``), and the model name is
checked before Ray starts, so the names are read from the source files of
``torchvision.models`` (every classification builder is a top-level function marked
``@register_model()``); when that finds nothing (another layout), torchvision is asked.
``tests/test_models.py`` checks the two lists agree.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import re
from pathlib import Path

BUILDER = re.compile(r"^@register_model\(\)\n(?:@.*\n)*def (\w+)\(", re.M)


class ModelError(ValueError):
    """User-facing problem with a model name, weights, or frozen_depth. Message names the culprit."""


@functools.cache
def classification_models() -> list[str]:
    spec = importlib.util.find_spec("torchvision")
    folder = Path(spec.origin).parent / "models" if spec and spec.origin else None
    names = sorted(n for f in folder.glob("*.py") for n in BUILDER.findall(f.read_text())) if folder else []
    if names:
        return names
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_model_name(name: str) -> None:
    models = classification_models()
    if name in models:
        return
    close = difflib.get_close_matches(name, models, n=5)
    hint = (
        f"close matches: {', '.join(close)}"
        if close
        else "list them with: python -c 'import trainables.zoo as z; print(z.classification_models())'"
    )
    raise ModelError(f"unknown model {name!r}; {hint}")
