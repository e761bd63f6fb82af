"""The input pipeline at 224 px: ``python benchmarks/bench_pipeline.py --out pipeline.json``.

On a generated ImageFolder of JPEG photos (``make_photo_folder``: 500x375 px crops of
scikit-image's sample photos, 16 classes), decode once into the cache, then time the
host's share of one trial's pipeline on one CPU thread, and, for information, the
device stage run on this CPU. Needs torch, torchvision, Pillow and scikit-image only.
``DEFINITIONS`` says what each figure counts and goes into the JSON with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry",
          "hubble_deep_field", "colorwheel", "retina", "logo", "moon", "grass", "gravel", "brick",
          "coins", "clock")  # scikit-image sample photos that ship with the package
SIZE = (500, 375)
MIN_IMAGES = 80  # 16 classes, and a stratified val split of 20% with one image of each

DEFINITIONS = {
    "pipeline_img_per_s": "Host side of one trial's pipeline (trainables.pipeline.Batches.host_batches "
                          "through prefetch's hand-over queue), batch 64, 224 px, RandomResizedCrop "
                          "parameters drawn, torch.set_num_threads(1), one producer thread: the seeded "
                          "shuffle, sorted gather of uint8 images from the memory-mapped cache, labels, "
                          "page-locking when CUDA is present (not on a machine without it), the hand-over; "
                          "the device stage and the model are excluded. Images / second over --epochs "
                          "epochs of the training split after one warm-up epoch (page cache warm).",
    "device_stage_cpu_img_per_s": "For information: trainables.pipeline.DeviceStage on this CPU, one "
                                  "thread: per-image RandomResizedCrop to 224 px (antialiased bilinear) + "
                                  "flip + normalise, batch 64, on already gathered batches.",
    "device_stage_cpu_eval_img_per_s": "For information: the same for the validation path (centre 224 "
                                       "crop + normalise).",
    "decode_img_per_s": "Images / second of DataHandle.prepare on an empty cache folder: JPEG decode, "
                        "resize of the short side to 256 (224 / 0.875), centre crop, write to the "
                        ".npy cache, with the thread pool's default of all cores (cpu_count here).",
    "cache_bytes_per_image": "Bytes of the decoded cache's image files (train_x.npy + val_x.npy) / images.",
}
BOUNDS = {"pipeline_img_per_s": (">=", 5000.0)}


def _photo(name: str):
    import numpy as np
    import skimage.data
    from PIL import Image

    img = np.asarray(getattr(skimage.data, name)())
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    return Image.fromarray(np.ascontiguousarray(img[..., :3]).astype(np.uint8))


def make_photo_folder(root: str | Path, counts: list[int] | int = 250, classes: int = 16,
                      seed: int = 0, quality: int = 90) -> Path:
    """An ImageFolder of 500x375 JPEGs: class c holds random crops of sample photo c (flipped,
    colour-shifted), ``counts`` images per class (a list: per class). Idempotent."""
    import numpy as np
    from PIL import Image

    root = Path(root)
    counts = [counts] * classes if isinstance(counts, int) else list(counts)
    if (root / ".complete").exists():
        return root
    rng = np.random.default_rng(seed)
    for c, n in enumerate(counts):
        photo = _photo(PHOTOS[c % len(PHOTOS)])
        folder = root / f"class{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            w, h = photo.size
            scale = rng.uniform(0.4, 1.0)
            cw, ch = max(8, int(w * scale)), max(8, int(min(h, w * scale * 0.75)))
            left, top = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
            im = photo.crop((left, top, left + cw, top + ch)).resize(SIZE, Image.Resampling.BILINEAR)
            if rng.random() < 0.5:
                im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            gain = rng.uniform(0.7, 1.3, 3)
            pixels = np.clip(np.asarray(im, dtype=np.float32) * gain, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=quality)
    (root / ".complete").touch()
    return root


def measure(work: Path, images: int = 4000, image_size: int = 224, batch_size: int = 64,
            epochs: int = 2, log=print) -> dict:
    """The figures of ``DEFINITIONS`` on ``images`` generated JPEGs under ``work``."""
    import numpy as np
    import torch

    from trainables.data import DataHandle, scan
    from trainables.pipeline import Batches, DeviceStage, crop_params, prefetch

    classes = 16
    log(f"[pipeline] generating {images} JPEGs of {SIZE[0]}x{SIZE[1]} px in {classes} classes")
    folder = make_photo_folder(work / "photos", [images // classes + (c < images % classes)
                                                 for c in range(classes)], classes)
    shutil.rmtree(work / "cache", ignore_errors=True)  # decoding is timed from an empty cache
    handle = DataHandle(scan(folder, val_fraction=0.2, seed=0), image_size, str(work / "cache"))
    log(f"[pipeline] decoding them at {image_size} px (short side {handle.decode_size})")
    started = time.perf_counter()
    handle.prepare(skip_bad=False)
    decode_s = time.perf_counter() - started
    cache_bytes = sum((handle.path / f"{s}_x.npy").stat().st_size for s in ("train", "val"))

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, y = handle.arrays("train")
        gen = torch.Generator().manual_seed(0)
        batches = Batches(x, y, batch_size, mean=handle.mean, std=handle.std, shuffle=True,
                          augment_strength=1.0, generator=gen, crop=image_size,
                          pin_memory=torch.cuda.is_available())
        for _ in prefetch(batches.host_batches()):  # warm-up: the page cache, the allocator
            pass
        log(f"[pipeline] host side, {epochs} epochs of {len(y)} images, one thread")
        started = time.perf_counter()
        for _ in range(epochs):
            for _ in prefetch(batches.host_batches()):
                pass
        host_s = time.perf_counter() - started
        stage = DeviceStage(image_size, handle.mean, handle.std)
        sample = [torch.from_numpy(np.array(x[i * batch_size:(i + 1) * batch_size]))
                  for i in range(max(1, min(8, len(x) // batch_size)))]
        crops = [crop_params(len(b), x.shape[1], 1.0, True, gen) for b in sample]
        timed = {}
        for name, params in (("train", crops), ("eval", [None] * len(sample))):
            started = time.perf_counter()
            for b, p in zip(sample, params, strict=True):
                stage(b, p)
            timed[name] = sum(len(b) for b in sample) / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(before)
    total = len(handle.dataset)
    return {"pipeline_img_per_s": epochs * len(y) / host_s,
            "device_stage_cpu_img_per_s": timed["train"],
            "device_stage_cpu_eval_img_per_s": timed["eval"],
            "decode_img_per_s": total / decode_s, "cache_bytes_per_image": cache_bytes / total,
            "pipeline": {"images": total, "train_images": len(y), "image_size": image_size,
                         "decode_size": handle.decode_size, "batch_size": batch_size,
                         "pinned": torch.cuda.is_available(), "decode_s": decode_s,
                         "cpu_count": os.cpu_count()}}


def targets(figures: dict) -> dict:
    return {k: {"value": figures[k], "target": f"{op} {bound:g}",
                "pass": figures[k] >= bound if op == ">=" else figures[k] <= bound}
            for k, (op, bound) in BOUNDS.items()}


def report(work: Path, images: int = 4000, **kw) -> dict:
    """The figures with their targets, definitions and machine: what the JSON holds."""
    import torch

    figures = measure(work, images, **kw)
    return {**figures, "targets": targets(figures), "definitions": DEFINITIONS,
            "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__,
                        "cuda": torch.cuda.is_available(), "platform": platform.platform()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/bench_pipeline.py", description=__doc__.split("\n\n")[1])
    p.add_argument("--out", required=True, metavar="FILE.json", help="where the figures go")
    p.add_argument("--images", type=int, default=4000, metavar="N",
                   help=f"JPEGs to generate, >= {MIN_IMAGES} (default 4000)")
    p.add_argument("--image-size", type=int, default=224, metavar="N", help="pixels (default 224)")
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="default 64")
    p.add_argument("--epochs", type=int, default=2, metavar="N", help="timed epochs (default 2)")
    p.add_argument("--work-dir", metavar="DIR", help="keep the JPEGs and cache here (default: a "
                   "temporary folder, removed at the end)")
    args = p.parse_args(argv)
    if min(args.image_size, args.batch_size, args.epochs) < 1 or args.images < MIN_IMAGES:
        print(f"error: --images must be >= {MIN_IMAGES} (a val split of every class) and the other "
              "numbers >= 1", file=sys.stderr)
        return 2
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="ftsweep-pipeline-")).resolve()
    try:
        figures = report(work, args.images, image_size=args.image_size, batch_size=args.batch_size,
                         epochs=args.epochs)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    for key in DEFINITIONS:
        print(f"{key:34} {figures[key]:12.1f}")
    print(Path(args.out).resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
