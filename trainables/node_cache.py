"""This node's cache folder ($FTSWEEP_CACHE): decoded images, splits, model checks, scratch."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("FTSWEEP_CACHE", Path.home() / ".cache" / "ftsweep"))


def keep_in_cache(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` in the cache, whole or not at all (a reader sees the old
    file or the new one). A cache that cannot be written only costs the next sweep time."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):  # a cache path that is not a folder has no temp file either
            tmp.unlink(missing_ok=True)
