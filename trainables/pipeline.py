"""The input pipeline of a trial: the host gathers, the device transforms.

The host's share of a batch is what only the host can do: pick the images (a seeded
shuffle, sorted indices so the memory-mapped cache is read sequentially), copy their
uint8 pixels into one (page-locked on CUDA) tensor, draw the random crop parameters, and
hand the batch over. A background thread does that for the next batch while the current
one trains. Everything per pixel (cropping, resizing, flipping, normalising) happens on
the trial's device, a batch at a time (``DeviceStage``), where it costs a fraction of the
forward pass instead of most of a CPU core.

The cache holds images at a short side of ``image_size / CROP_RATIO`` (torchvision's
resize-256/crop-224), so training has room for RandomResizedCrop and validation, the
feature cache, prediction and export all take the same centre ``image_size`` crop.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from trainables.geometry import CROP_RATIO, crop_size, decode_size  # noqa: F401 - the cache's geometry, also ours

RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range, as torchvision's default


class HostBatch(NamedTuple):
    images: torch.Tensor  # (B, D, D, 3) uint8, or cached float features
    labels: torch.Tensor  # (B,) int64
    crops: np.ndarray | torch.Tensor | None  # (B, 5) int: top, left, height, width, flip; None: centre crop


def crop_params(n: int, side: int, strength: float, hflip: bool,
                generator: torch.Generator | None) -> np.ndarray:
    """RandomResizedCrop's parameters for ``n`` square ``side`` images at once.

    torchvision's algorithm, vectorised: up to 10 tries of a scale in
    ``[1 - 0.92 * strength, 1]`` (strength 1: 0.08, the reference recipe) and a
    log-uniform aspect ratio, the first crop that fits wins, else the whole (square)
    image; then a uniform position, and a flip with probability 1/2 when ``hflip``.
    """
    tries = 10
    u = torch.rand((n, tries, 2), generator=generator, dtype=torch.float64)
    pos = torch.rand((n, 3), generator=generator, dtype=torch.float64)
    area = side * side * (1 - 0.92 * strength + 0.92 * strength * u[..., 0])
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= side) & (h > 0) & (h <= side)
    first = fits.to(torch.int8).argmax(1)  # the first try that fits (0 when none does)
    ok = fits.any(1)
    pick = torch.arange(n)
    w = torch.where(ok, w[pick, first], torch.full((n,), float(side), dtype=torch.float64))
    h = torch.where(ok, h[pick, first], torch.full((n,), float(side), dtype=torch.float64))
    top = torch.floor(pos[:, 0] * (side - h + 1))
    left = torch.floor(pos[:, 1] * (side - w + 1))
    flip = (pos[:, 2] < 0.5) if hflip else torch.zeros(n, dtype=torch.bool)
    return torch.stack([top, left, h, w, flip.double()], 1).to(torch.int64).numpy()


class DeviceStage:
    """uint8 NHWC batches on the device -> normalised float NCHW model inputs.

    With crop parameters: every image's crop resized to ``size`` and flipped; on a GPU for
    the whole batch in two batched matrix products (``resized_crops``), on the CPU image by
    image (``resized_crop``). Without: the centre ``size`` crop, which is what validation
    and prediction see.
    """

    def __init__(self, size: int, mean, std, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None, channels_last: bool = False):
        self.size, self.dtype = size, dtype or torch.float32
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
        self.layout = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor, crops: np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2)
        if crops is None:
            x = center_crop(x, self.size).float()
        elif x.device.type == "cpu":  # no launch cost to save; the per-image path does less work
            x = torch.cat([resized_crop(img, *p, self.size) for img, p in zip(x.float(), crops.tolist(), strict=True)])
        else:  # Batches moved them here without blocking; an array given directly is copied now
            x = resized_crops(x.float(), torch.as_tensor(crops, device=x.device), self.size)
        x = (x - self.mean) / self.std
        return x.to(self.dtype).contiguous(memory_format=self.layout)


def resized_crops(x: torch.Tensor, crops: torch.Tensor, size: int) -> torch.Tensor:
    """Per image ``b``: crop ``crops[b] = (top, left, height, width, flip)`` of NCHW float
    ``x``, resize it to ``size`` x ``size`` and flip it when asked, for all images at once.

    Antialiased bilinear resizing is separable, so each image's result is ``Wy @ img @ Wx.T``
    with its own row and column weight matrices (the flip reverses ``Wx``'s rows): two
    batched matmuls instead of a kernel launch per image. The weights are those of
    ``F.interpolate(..., mode="bilinear", antialias=True)``, which
    ``torchvision.transforms.v2.functional.resized_crop`` uses (tests compare the two).
    """
    crops = crops.to(torch.float64)
    wy = _resize_weights(crops[:, 0], crops[:, 2], size, x.shape[-2])
    wx = _resize_weights(crops[:, 1], crops[:, 3], size, x.shape[-1])
    wx = torch.where(crops[:, 4, None, None] > 0, wx.flip(1), wx)
    wy, wx = wy.to(x.dtype)[:, None], wx.to(x.dtype)[:, None]
    return torch.matmul(torch.matmul(wy, x), wx.transpose(-1, -2))


def resized_crop(img: torch.Tensor, top: int, left: int, h: int, w: int, flip: int, size: int) -> torch.Tensor:
    """One CHW float image's crop, resized to ``size`` and flipped: ``(1, C, size, size)``."""
    out = F.interpolate(img[None, :, top:top + h, left:left + w], size=(size, size), mode="bilinear",
                        align_corners=False, antialias=True)
    return out.flip(-1) if flip else out


def _resize_weights(start: torch.Tensor, length: torch.Tensor, size: int, side: int) -> torch.Tensor:
    """``(B, size, side)``: row i holds the weights output pixel i gives the input pixels,
    zero outside ``[start, start + length)``; PyTorch's antialiased bilinear filter."""
    scale = (length / size)[:, None, None]
    out = torch.arange(size, device=start.device, dtype=torch.float64)[None, :, None]
    pos = torch.arange(side, device=start.device, dtype=torch.float64)[None, None, :] - start[:, None, None]
    inv = torch.where(scale >= 1, 1 / scale, torch.ones_like(scale))  # downscaling widens the filter
    w = torch.clamp(1 - ((pos + 0.5 - scale * (out + 0.5)) * inv).abs(), min=0)
    w = w * ((pos >= 0) & (pos < length[:, None, None]))
    return w / w.sum(-1, keepdim=True)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The centre ``size`` crop of NCHW ``x``, placed as torchvision's center_crop does."""
    top = int(round((x.shape[-2] - size) / 2.0))
    left = int(round((x.shape[-1] - size) / 2.0))
    return x[..., top:top + size, left:left + size]


class Batches:
    """Seeded mini-batches from cached uint8 NHWC images, cropped, optionally augmented and
    normalised on ``device``; or, with ``mean=None``, from cached float features, as they are.

    ``crop`` is the model's input size; by default the one the images were decoded for
    (``crop_size``). Iterating yields ``(x, y)`` on ``device``; ``host_batches()`` yields
    the host's share alone (what the benchmark times). With ``fold_single``, a last batch
    of one image joins the batch before it: BatchNorm cannot train on a single value per
    channel (a 1x1 feature map). Every image is still seen once an epoch.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, *,
                 mean, std, shuffle: bool, augment_strength: float = 0.0, hflip: bool = True,
                 generator: torch.Generator | None = None, crop: int | None = None,
                 device: torch.device | str = "cpu", pin_memory: bool = False,
                 dtype: torch.dtype | None = None, channels_last: bool = False, prefetch: int = 2,
                 fold_single: bool = False):
        self.images, self.labels = images, torch.as_tensor(np.asarray(labels))
        self.fold_single = fold_single
        self.batch_size, self.shuffle, self.generator = batch_size, shuffle, generator
        self.strength, self.hflip = augment_strength, hflip
        self.device, self.pin_memory, self.prefetch = torch.device(device), pin_memory, prefetch
        self.stage = None
        if mean is not None:
            size = crop or crop_size(images.shape[1])
            self.stage = DeviceStage(size, mean, std, self.device, dtype, channels_last)

    def __len__(self) -> int:
        return len(self._bounds())

    def _bounds(self) -> list[tuple[int, int]]:
        n, size = len(self.labels), self.batch_size
        bounds = [(start, min(start + size, n)) for start in range(0, n, size)]
        if self.fold_single and len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
            bounds[-2:] = [(bounds[-2][0], n)]
        return bounds

    @property
    def augments(self) -> bool:
        return self.stage is not None and self.strength > 0

    def host_batches(self) -> Iterator[HostBatch]:
        """The epoch's batches as the host prepares them. The random draws (order, crops)
        are made here, before the first batch, so they never depend on thread timing."""
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        crops = (crop_params(n, self.images.shape[1], self.strength, self.hflip, self.generator)
                 if self.augments else None)
        return self._gather(order.numpy(), crops)

    def _gather(self, order: np.ndarray, crops: np.ndarray | None) -> Iterator[HostBatch]:
        for start, end in self._bounds():
            idx = np.sort(order[start:end])  # sorted: sequential mmap reads
            if self.pin_memory:  # straight into page-locked memory: one copy, then async DMA
                x = torch.empty((len(idx), *self.images.shape[1:]), dtype=_torch_dtype(self.images),
                                pin_memory=True)
                np.take(self.images, idx, axis=0, out=x.numpy())
            else:
                x = torch.from_numpy(self.images[idx])
            mine = None if crops is None else crops[start:start + len(idx)]
            if mine is not None and self.pin_memory:  # page-locked, for a copy that does not block
                mine = torch.from_numpy(mine).pin_memory()
            yield HostBatch(x, self.labels[idx], mine)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        host = self.host_batches()
        for x, y, crops in (prefetch(host, self.prefetch) if self.prefetch else host):
            x = x.to(self.device, non_blocking=self.pin_memory)
            y = y.to(self.device, non_blocking=self.pin_memory)
            if isinstance(crops, torch.Tensor):  # pinned: queued behind x, no wait for the device
                crops = crops.to(self.device, non_blocking=True)
            yield (x if self.stage is None else self.stage(x, crops)), y


def _torch_dtype(a: np.ndarray) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=a.dtype)).dtype


class _Failed(NamedTuple):
    error: BaseException


_DONE = object()


def prefetch(items: Iterable, depth: int = 2) -> Iterator:
    """``items``, produced up to ``depth`` ahead by a daemon thread.

    The producer's exception is raised here; when the consumer stops early (a closed or
    collected generator, an exception in the loop), the thread is told to stop and joined.
    """
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            put(_Failed(e))

    thread = threading.Thread(target=produce, name="ftsweep-batches", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()
