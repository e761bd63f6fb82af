"""Data: scan an ImageFolder, decode it once into a uint8 cache, serve batches from it.

Decoding JPEGs is the most expensive thing a small fine-tuning trial does besides the
forward pass, and in a sweep every trial would decode the same files. So the driver
decodes every image once, its short side resized to ``decode_size(image_size)`` (the
image size / 0.875) and centre-cropped square, into one ``(N, D, D, 3)`` uint8 array per
split, stored as ``.npy`` under a key made of the dataset's fingerprint and both sizes.
Trials memory-map it: the pages are shared by every trial on a node. The batches a trial
reads from it are ``trainables.pipeline.Batches``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from trainables.geometry import CROP_RATIO, crop_size, decode_size  # noqa: F401 - also data's
from trainables.splits import stratified

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CACHE_VERSION = 4  # 2: decoded at image_size / 0.875, room for crops; 3: 16-bit scaled, EXIF;
#                   4: the centre square resampled

# Counts calls of decode_image in this process; tests use it to prove trials never decode.
DECODE_COUNT = 0


class DataError(ValueError):
    """A dataset that cannot be used; the message names every offending path."""


@dataclass(frozen=True)
class Split:
    paths: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.paths)


@dataclass(frozen=True)
class Dataset:
    """A scanned ImageFolder: classes, a train and a val split, and a fingerprint."""

    root: str
    classes: tuple[str, ...]
    train: Split
    val: Split
    fingerprint: str
    not_images: tuple[str, ...] = ()  # files in class folders without an image extension
    unusable: tuple[str, ...] = ()  # "path: reason" of image files no one can open (links, names)
    skipped: tuple[str, ...] = ()  # "path: reason" of files left out by --skip-bad-images

    def __len__(self) -> int:
        return len(self.train) + len(self.val)

    def without(self, bad: dict[str, str]) -> Dataset:
        """The dataset minus ``bad`` files (and the non-image files), noted in ``skipped``."""
        def keep(split: Split) -> Split:
            kept = [(p, y) for p, y in zip(split.paths, split.labels, strict=False) if p not in bad]
            return Split(tuple(p for p, _ in kept), tuple(y for _, y in kept))

        train, val = keep(self.train), keep(self.val)
        skipped = [*self.problems(), *(f"{shown(p)}: {r}" for p, r in bad.items())]
        return Dataset(self.root, self.classes, train, val, fingerprint(train, val), (), (),
                       self.skipped + tuple(skipped))

    def problems(self) -> list[str]:
        """The files found while listing that are not usable images, as "path: reason"."""
        return [f"{shown(p)}: not an image" for p in self.not_images] + list(self.unusable)


def shown(path: str) -> str:
    """A path as it can be printed: bytes that are not UTF-8 as \\x escapes."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def unusable_reason(path: Path) -> str | None:
    """Why an image file found while listing can never be opened, or None."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return "file name is not valid UTF-8"
    if not path.exists():  # a dangling link, or one that loops
        return "broken or looping symbolic link"
    return None


def is_hidden(path: Path) -> bool:
    return path.name.startswith(".") or path.name in ("Thumbs.db", "desktop.ini")


def _class_folder(folder: Path, problems: list[str], unusable: list[str]):
    """Classes, image paths, labels and non-image files of one ImageFolder directory; files no
    one can open go to ``unusable``."""
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not is_hidden(d))
    paths, labels, others = [], [], []
    for label, name in enumerate(classes):
        found = 0
        for p in sorted((folder / name).rglob("*")):
            if p.is_dir() or any(is_hidden(Path(part)) for part in p.relative_to(folder).parts):
                continue
            reason = unusable_reason(p)
            if reason:
                unusable.append(f"{shown(str(p))}: {reason}")
            elif p.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(str(p))
                labels.append(label)
                found += 1
            else:
                others.append(str(p))
        if not found:
            problems.append(f"{folder / name}: empty class folder (no images)")
    return classes, paths, labels, others


def scan(root: str | Path, val_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """Find the classes and images under ``root``.

    ``root/train`` and ``root/val`` are used as given when both exist; otherwise
    ``root`` is one ImageFolder split by a seeded stratified split. Every structural
    problem is reported at once, and with them every non-image and unreadable file, so one
    report names all there is to fix; without structural problems, unreadable images are
    found when decoding (``DataHandle.prepare``), which reads each file once anyway.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    problems: list[str] = []
    unusable: list[str] = []
    if (root / "train").is_dir() and (root / "val").is_dir():
        classes, train_paths, train_labels, others = _class_folder(root / "train", problems, unusable)
        val_classes, val_paths, val_labels, val_others = _class_folder(root / "val", problems, unusable)
        others += val_others
        for name in sorted(set(classes) ^ set(val_classes)):
            where = "train" if name in classes else "val"
            problems.append(f"{root / where / name}: class {name!r} is in {where} but not in "
                            f"{'val' if where == 'train' else 'train'}")
    else:
        classes, train_paths, train_labels, others = _class_folder(root, problems, unusable)
        val_paths, val_labels = [], []
    if len(classes) < 2:
        problems.append(f"{root}: need at least two class folders, found {len(classes)}")
    if problems:
        problems += [f"{shown(p)}: not an image" for p in others] + unusable
        problems += unreadable([*train_paths, *val_paths])
        raise DataError(_listing(root, problems))
    train, val = Split(tuple(train_paths), tuple(train_labels)), Split(tuple(val_paths), tuple(val_labels))
    if not val_paths:
        train, val = _stratified_split(root, train_paths, train_labels, val_fraction, seed)
    return Dataset(str(root), tuple(classes), train, val, fingerprint(train, val), tuple(others), tuple(unusable))


def unreadable(paths: list[str]) -> list[str]:
    """``path: reason`` for every image file PIL cannot read whole (truncated, not an image)."""
    def problem(path: str) -> str | None:
        try:
            with Image.open(path) as im:
                im.load()
        except Exception as e:  # PIL raises many types for broken files; each is a bad image
            return f"{path}: unreadable image ({type(e).__name__}: {e})"
        return None

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # PIL releases the GIL
        return [p for p in pool.map(problem, paths) if p]


def _listing(root, problems) -> str:
    shown = "\n  ".join(problems[:50])
    more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
    return f"{len(problems)} problem(s) in {root}:\n  {shown}{more}"


def _stratified_split(root, paths, labels, val_fraction, seed) -> tuple[Split, Split]:
    if not 0 < val_fraction < 1:
        raise DataError(f"val fraction must be between 0 and 1, got {val_fraction}")
    counts = np.bincount(labels) if labels else np.array([])
    if len(counts) and counts.min() < 2:
        raise DataError(f"{root}: every class needs at least 2 images for a train/val split")
    train, val = stratified(labels, val_fraction, seed)
    return (Split(tuple(paths[i] for i in train), tuple(labels[i] for i in train)),
            Split(tuple(paths[i] for i in val), tuple(labels[i] for i in val)))


def fingerprint(*splits: Split) -> str:
    """Identifies the dataset's content by path, size and modification time of every file."""
    h = hashlib.sha256()
    for split in splits:
        for path, label in zip(split.paths, split.labels, strict=False):
            st = os.stat(path)
            h.update(f"{path}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        h.update(b"--split--")
    return h.hexdigest()[:16]


def decode_image(path: str, size: int) -> np.ndarray:
    """Decode one image to RGB, resize its short side to ``size`` and centre-crop."""
    global DECODE_COUNT
    DECODE_COUNT += 1
    with Image.open(path) as im:  # an animation or a multi-page TIFF: its first frame
        im = to_rgb(im)
    # Resample only the centre square: resizing the whole image first would make a 1 x 60000
    # strip 256 x 15 million pixels (11 GB) on its way to 256 x 256.
    side = min(im.size)
    left, top = (im.width - side) / 2, (im.height - side) / 2
    im = im.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side),
                   reducing_gap=None)
    return np.asarray(im, dtype=np.uint8)


def to_rgb(im: Image.Image) -> Image.Image:
    """An 8-bit RGB image as a viewer shows ``im``: upright, its full range kept.

    PIL's own ``convert("RGB")`` clips wider pixels (a 16-bit PNG comes out almost white),
    so 16/32-bit integers are scaled from 0..65535 and float images from 0..1 (or clipped
    to 0..255 when they go beyond 1) first. The EXIF orientation a camera wrote is applied.
    """
    im.load()
    im = ImageOps.exif_transpose(im)  # a phone's portrait photo is stored sideways
    if im.mode.startswith("I;16") or im.mode == "I":
        wide = np.asarray(im, dtype=np.float64)
        im = Image.fromarray((np.clip(wide, 0, 65535) / 257 + 0.5).astype(np.uint8), "L")
    elif im.mode == "F":
        wide = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if wide.max(initial=0) <= 1:
            wide = wide * 255
        im = Image.fromarray((np.clip(wide, 0, 255) + 0.5).astype(np.uint8), "L")
    elif im.mode in ("P", "PA") and ("transparency" in im.info or im.mode == "PA"):
        im = im.convert("RGBA")  # palette transparency is lost by a direct RGB convert
    return im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, L, LA, 1, RGBA: PIL's own conversion


@dataclass(frozen=True)
class DataHandle:
    """What a trial receives: where the decoded cache lives, and how to rebuild it.

    Small and picklable, so Ray ships it to every trial; the pixels stay on the node.
    """

    dataset: Dataset
    image_size: int
    cache_dir: str
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.dataset.classes

    @property
    def decode_size(self) -> int:
        """The cached images' side: room around the centre ``image_size`` crop."""
        return decode_size(self.image_size)

    @property
    def key(self) -> str:
        return f"{self.dataset.fingerprint}-{self.image_size}px-d{self.decode_size}-v{CACHE_VERSION}"

    @property
    def path(self) -> Path:
        return Path(self.cache_dir) / self.key

    def ensure(self, workers: int | None = None) -> Path:
        """Build the cache on this node unless a whole one is there; one builder per node."""
        if cache_problem(self.path) is not None:
            self.prepare(skip_bad=False, workers=workers)
        return self.path

    def prepare(self, skip_bad: bool, workers: int | None = None, log=None) -> DataHandle:
        """Decode every image once into the cache; this is also the validation pass.

        Unreadable or truncated images, and files that are not images, stop it with the
        full list, or with ``skip_bad`` are left out: the returned handle's dataset no
        longer has them and lists them in ``dataset.skipped``. A cache that is there but
        damaged (a truncated or corrupt file) is rebuilt, with a message naming it.
        """
        log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        try:
            Path(self.cache_dir).mkdir(parents=True, exist_ok=True)
            lock = open(Path(self.cache_dir) / f"{self.key}.lock", "w")  # noqa: SIM115
        except OSError as e:
            raise DataError(f"cache folder {self.cache_dir} cannot be written "
                            f"({e.strerror or type(e).__name__}); pass a writable one") from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # a second builder waits, then finds it done
            problem = cache_problem(self.path)
            if problem is None:
                return self
            if self.path.exists():
                log(f"decoded cache {problem}: rebuilding it")
                trash = Path(tempfile.mkdtemp(dir=self.cache_dir, prefix=f".{self.key}.bad."))
                os.replace(self.path, trash / "cache")  # readers that mapped it keep their pages
                shutil.rmtree(trash, ignore_errors=True)
            return _build(self, workers or os.cpu_count() or 1, skip_bad)

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Memory-mapped ``(N, D, D, 3)`` uint8 images and int64 labels of a split."""
        path = self.ensure()
        return (np.load(path / f"{split}_x.npy", mmap_mode="r"),
                np.load(path / f"{split}_y.npy"))


CACHE_FILES = ("train_x.npy", "train_y.npy", "val_x.npy", "val_y.npy")


def cache_problem(path: Path) -> str | None:
    """What is wrong with the decoded cache at ``path`` (naming the file), or None when it
    is whole: meta.json parses, and every array's file is as long as its header says."""
    meta = path / "meta.json"
    if not meta.exists():
        return f"{path} is missing" if not path.exists() else f"{meta} is missing"
    try:
        counts = json.loads(meta.read_text())["counts"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{meta} is corrupt ({type(e).__name__})"
    for name in CACHE_FILES:
        f = path / name
        try:
            with open(f, "rb") as fh:
                version = np.lib.format.read_magic(fh)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read(fh)
                expected = fh.tell() + math.prod(shape) * dtype.itemsize
            size = f.stat().st_size
        except (OSError, ValueError, TypeError) as e:
            return f"{f} is unreadable or corrupt ({type(e).__name__}: {e})"
        if size != expected:
            return f"{f} is truncated or corrupt ({size} bytes, its header says {expected})"
        if not shape or shape[0] != counts.get(name.split("_")[0]):
            return f"{f} holds {shape[0] if shape else 0} rows, meta.json says {counts}"
    return None


def decode_for(path: str, image_size: int) -> np.ndarray:
    """Decode one image as the cache holds it for a model input of ``image_size``: short side
    ``decode_size(image_size)``, centre-cropped square. Prediction decodes with this too, and
    takes the centre crop with the same ``Batches``, so it sees what validation saw."""
    return decode_image(path, decode_size(image_size))


def _try_decode(path: str, image_size: int) -> np.ndarray | str:
    try:
        return decode_for(path, image_size)
    except Exception as e:  # PIL raises many types for broken files; each is a bad image
        return f"unreadable image ({type(e).__name__}: {e})"


def _decode_split(split: Split, image_size: int, workers: int, out_path: Path) -> dict[str, str]:
    size = decode_size(image_size)
    out = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.uint8, shape=(len(split), size, size, 3))
    bad = {}
    # PIL releases the GIL while decoding and resizing, so threads use every core.
    with ThreadPoolExecutor(workers) as pool:
        for i, (path, img) in enumerate(zip(split.paths, pool.map(lambda p: _try_decode(p, image_size),
                                                                   split.paths), strict=False)):
            if isinstance(img, str):
                bad[path] = img
            else:
                out[i] = img
    if bad:  # rewrite without the bad rows (rare: only with --skip-bad-images)
        good = [i for i, p in enumerate(split.paths) if p not in bad]
        kept = np.ascontiguousarray(out[good])
        del out
        np.save(out_path, kept)
    else:
        out.flush()
        del out
    return bad


def _build(handle: DataHandle, workers: int, skip_bad: bool) -> DataHandle:
    ds = handle.dataset
    tmp = Path(tempfile.mkdtemp(dir=handle.cache_dir, prefix=f".{handle.key}."))
    try:
        bad = {}
        for name in ("train", "val"):
            bad |= _decode_split(getattr(ds, name), handle.image_size, workers, tmp / f"{name}_x.npy")
        if (bad or ds.problems()) and not skip_bad:
            problems = ds.problems() + [f"{shown(p)}: {r}" for p, r in bad.items()]
            raise DataError(_listing(ds.root, problems) +
                            "\nfix or remove them, or pass --skip-bad-images to leave them out")
        if bad or ds.problems():
            handle = replace(handle, dataset=ds.without(bad))
            if cache_problem(handle.path) is None:
                return handle
            shutil.rmtree(handle.path, ignore_errors=True)  # a damaged one: replaced below
        for name in ("train", "val"):
            np.save(tmp / f"{name}_y.npy", np.asarray(getattr(handle.dataset, name).labels, dtype=np.int64))
        meta = {"classes": list(handle.classes), "image_size": handle.image_size,
                "decode_size": handle.decode_size, "fingerprint": handle.dataset.fingerprint,
                "decodes": len(ds), "counts": {name: len(getattr(handle.dataset, name))
                                               for name in ("train", "val")}}
        (tmp / "meta.json").write_text(json.dumps(meta))
        os.replace(tmp, handle.path)  # atomic: a reader sees no cache or a whole one
        return handle
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
