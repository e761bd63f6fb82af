"""The decoded-image caches on this node: ``python sweeps/results/cache.py list|remove [KEY...|--all]``.

Every sweep decodes its dataset once into a cache under ``$FTSWEEP_CACHE/decoded``
(default ``~/.cache/ftsweep/decoded``), one folder per dataset content, split and image
size, that later sweeps on the same data reuse. ``list`` shows each with its size and
what its ``meta.json`` says; ``remove`` deletes the named ones (a key, or a unique start
of one) or ``--all``. A sweep that needs a removed cache decodes its dataset again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from trainables import node_cache  # noqa: E402


def decoded_root() -> Path:
    return node_cache.cache_root() / "decoded"


def caches(root: Path | None = None) -> list[dict]:
    """One entry per cache folder: key, path, bytes, last modified, and its meta.json
    (empty for a folder without one: a cache being built, or not a cache)."""
    root = root or decoded_root()
    if not root.is_dir():
        return []
    out = []
    for path in sorted(p for p in root.iterdir() if p.is_dir()):
        files = [f for f in path.rglob("*") if f.is_file()]
        try:
            meta = json.loads((path / "meta.json").read_text())
        except (OSError, ValueError):
            meta = {}
        out.append({"key": path.name, "path": str(path), "bytes": sum(f.stat().st_size for f in files),
                    "modified": max((f.stat().st_mtime for f in files), default=path.stat().st_mtime),
                    "meta": meta})
    return out


def describe(entry: dict) -> str:
    meta = entry["meta"]
    if not meta:
        what = "being built (or not a cache)" if entry["key"].startswith(".") else "no meta.json"
    else:
        counts = meta.get("counts", {})
        what = ", ".join(filter(None, [
            f"{meta['image_size']}px" if "image_size" in meta else "",
            f"decoded at {meta['decode_size']}px" if "decode_size" in meta else "",
            f"{len(meta['classes'])} classes" if "classes" in meta else "",
            f"{counts.get('train', '?')} train / {counts.get('val', '?')} val images" if counts else ""]))
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry["modified"]))
    return f"{entry['key']}  {human(entry['bytes']):>9}  {stamp}  {what}"


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def matching(entries: list[dict], keys: list[str]) -> list[dict]:
    """The caches named by ``keys`` (a whole key, or a start only one key has)."""
    chosen = []
    for key in keys:
        found = [e for e in entries if e["key"] == key] or [e for e in entries if e["key"].startswith(key)]
        if len(found) != 1:
            names = ", ".join(e["key"] for e in found) if found else "none; `list` shows them"
            raise LookupError(f"{key!r} names {len(found)} caches ({names})")
        chosen.append(found[0])
    return chosen


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sweeps/results/cache.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the decoded caches on this node with their sizes")
    rm = sub.add_parser("remove", help="remove decoded caches")
    rm.add_argument("keys", nargs="*", metavar="KEY", help="a cache's key, or a start of it only it has")
    rm.add_argument("--all", action="store_true", help="remove every decoded cache on this node")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    root = decoded_root()
    entries = caches(root)
    if args.command == "list":
        for entry in entries:
            print(describe(entry))
        print(f"{len(entries)} decoded cache(s), {human(sum(e['bytes'] for e in entries))} in {root}")
        return 0
    if args.all == bool(args.keys):
        print("error: remove takes KEY... or --all", file=sys.stderr)
        return 2
    try:
        chosen = entries if args.all else matching(entries, args.keys)
    except LookupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for entry in chosen:
        shutil.rmtree(entry["path"], ignore_errors=True)
        print(f"removed {entry['key']} ({human(entry['bytes'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
