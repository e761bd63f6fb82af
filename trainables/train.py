"""One fine-tuning trial: a function of its config and a data handle.

``run_trial`` knows nothing about Ray: it calls ``report(metrics, checkpoint_dir)`` after
every epoch and resumes from a checkpoint file when given one. ``trainables.ray_trial``
is the thin adapter that plugs it into Ray Tune.
"""

from __future__ import annotations

import itertools
import math
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from trainables import data as data_module
from trainables import features, prune
from trainables.config import TrialConfig
from trainables.data import DataHandle
from trainables.models import ModelError, build_model, freeze, set_train_mode, stages
from trainables.pipeline import Batches

Report = Callable[[dict, Path | None], None]
CHECKPOINT_FILE = "checkpoint.pt"


class TrialDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass(frozen=True)
class DeviceOptions:
    """How a trial uses its device: the autocast dtype (None: full precision), channels_last
    layout, and page-locked batches copied without blocking."""

    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    pin_memory: bool = False


def device_options(cfg: TrialConfig, device: torch.device) -> DeviceOptions:
    """On CUDA each is on unless the config turns it off (``amp``, ``channels_last``,
    ``pin_memory``): bf16 autocast where the GPU computes in bf16 (Ampere and later), else
    fp16 with a gradient scaler. On the CPU none is used."""
    if device.type != "cuda":
        return DeviceOptions()
    amp_dtype = None
    if cfg.amp:
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        amp_dtype = torch.bfloat16 if native_bf16 else torch.float16
    return DeviceOptions(amp_dtype, cfg.channels_last, cfg.pin_memory)


def run_trial(config: TrialConfig | dict, data: DataHandle, report: Report | None = None, *,
              resume_from: str | Path | None = None, threads: int | None = None,
              device: str | None = None, scratch: Path | None = None) -> dict:
    """Fine-tune one model, and with ``prune_amount > 0`` prune it and fine-tune it again to
    recover (``trainables.prune``); returns the last epoch's metrics. Each epoch's
    checkpoint is written to a temporary folder in ``scratch`` (default: the system's),
    handed to ``report`` and removed."""
    cfg = config if isinstance(config, TrialConfig) else TrialConfig.from_dict(config)
    if cfg.prune_amount > 0 and cfg.recovery_epochs < 1:
        raise ValueError(f"prune_amount={cfg.prune_amount} needs recovery_epochs >= 1: the pruned "
                         "model is trained and measured in the recovery epochs")
    if threads:
        torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS=1 in workers
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)

    model = build_model(cfg.model, len(data.classes), cfg.weights)
    staged = stages(model, cfg.model)
    if not staged.stages and cfg.dropout > 0:
        raise ModelError(f"dropout before the head is not available for {cfg.model}")
    freeze(staged, cfg.frozen_depth)
    model.to(device)
    options = device_options(cfg, device)
    if options.channels_last:
        model.to(memory_format=torch.channels_last)

    gen = torch.Generator().manual_seed(cfg.seed)
    decodes_before = data_module.DECODE_COUNT  # a cache built on this node by this trial counts
    train, val, start = make_batches(cfg, data, model, staged, device, gen, options)

    # Listed before any pruning: pruning re-registers each weight as weight_orig, which
    # would change the order the optimizer's saved state is matched by.
    params = [p for p in model.parameters() if p.requires_grad]
    prunable = prune.prunable(model)
    ckpt = None if resume_from is None else torch.load(Path(resume_from), map_location="cpu",
                                                       weights_only=True)
    state = {"epoch": 0, "best_val_acc": -1.0, "best_epoch": 0, "pruned": False,
             "phase_best_val_acc": -1.0, "phase_best_epoch": 0, "finetune_epochs": cfg.max_epochs}
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        state.update(ckpt["state"])
        if state["pruned"]:
            prunable = prune.restore_masks(model)
    optimizer = make_optimizer(cfg, params)
    scheduler = lr_schedule(cfg, optimizer, len(train), recovery=state["pruned"])
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        gen.set_state(ckpt["generator"])

    step = Step(model, staged, cfg, optimizer, scheduler, device, start, options)
    if ckpt is not None and ckpt.get("scaler"):  # fp16: resume at the loss scale it had found
        step.scaler.load_state_dict(ckpt["scaler"])
    metrics: dict = {}
    epoch = state["epoch"]
    while epoch < last_epoch(cfg, state):
        epoch += 1
        if epoch > state["finetune_epochs"] and not state["pruned"]:  # fine-tuned: prune, then recover
            prunable = prune.prune_global(model, cfg.prune_amount)
            scheduler = step.scheduler = lr_schedule(cfg, optimizer, len(train), recovery=True)
            state.update(pruned=True, phase_best_val_acc=-1.0)
        t0 = time.perf_counter()
        set_train_mode(model, staged, cfg.frozen_depth, training=True)
        try:
            train_loss, seen = step.train_epoch(train)
        except TrialDiverged as e:
            # Retrying from the last checkpoint would diverge again: stop, with the reason.
            # best_val_acc: the objective TPE and ASHA read; a diverging setting scores nothing
            metrics = {"epoch": epoch, "val_acc": 0.0, "best_val_acc": 0.0, "diverged": 1,
                       "stop_reason": str(e)}
            if report is None:
                raise
            report(metrics, None)
            return metrics
        train_s = time.perf_counter() - t0
        val_loss, val_acc = evaluate(step, val)
        if val_acc >= state["best_val_acc"]:  # of tied epochs the latest is best, as Ray keeps it
            state.update(best_val_acc=val_acc, best_epoch=epoch)
        if val_acc > state["phase_best_val_acc"]:  # patience counts within fine-tuning or recovery
            state.update(phase_best_val_acc=val_acc, phase_best_epoch=epoch)
        state["epoch"] = epoch
        metrics = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                   "val_acc": val_acc, "lr": optimizer.param_groups[0]["lr"],
                   "img_per_s": seen / train_s, "epoch_s": time.perf_counter() - t0,
                   "best_val_acc": state["best_val_acc"], "cached_stages": start,
                   "sparsity": prune.sparsity(prunable), "nonzero_params": prune.nonzero_params(model),
                   **bench_counters(step, decodes_before)}
        # Patience ends the phase it is in: fine-tuning goes on to pruning and recovery; only
        # in recovery (or without pruning) does it end the trial.
        patience_out = cfg.patience > 0 and epoch - state["phase_best_epoch"] >= cfg.patience
        stop = patience_out and (state["pruned"] or cfg.prune_amount <= 0)
        if patience_out and not stop:
            state["finetune_epochs"] = epoch
            metrics["finetune_stopped"] = 1
        if stop:
            metrics["early_stopped"] = 1
        with tempfile.TemporaryDirectory(prefix="ckpt-", dir=scratch) as tmp:
            save_checkpoint(Path(tmp) / CHECKPOINT_FILE, cfg, data, model, optimizer, scheduler, gen, state,
                            step.scaler)
            if report is not None:
                report(metrics, Path(tmp))
        if stop:
            break
    return metrics


def last_epoch(cfg: TrialConfig, state: dict) -> int:
    """The trial's last epoch: recovery follows fine-tuning, which patience may have ended early."""
    return state["finetune_epochs"] + cfg.recovery_epochs if cfg.prune_amount > 0 else cfg.max_epochs


def bench_counters(step: Step, decodes_before: int) -> dict:
    """For the benchmarks: when training began, images decoded inside this trial, threads."""
    return {"first_step_time": step.first_step_time,
            "decodes_in_trial": data_module.DECODE_COUNT - decodes_before,
            "threads": torch.get_num_threads()}


def make_batches(cfg: TrialConfig, data: DataHandle, model, staged, device, gen,
                 options: DeviceOptions | None = None):
    """Train and val batches on ``device``, and the first stage they enter: 0 for images, k
    when the frozen prefix's cached outputs stand in for the images (``trainables.features``).

    The host gathers uint8 batches (page-locked with ``pin_memory``) in a background thread;
    cropping, augmenting and normalising run on the device (``trainables.pipeline``)."""
    options = options or DeviceOptions()
    train_x, train_y = data.arrays("train")
    val_x, val_y = data.arrays("val")
    mean, std, start = data.mean, data.std, 0
    if features.applies(cfg, staged):
        model.eval()  # the frozen prefix as training will see it
        cached = features.prefix_features(cfg, data, staged, device)
        if cached is not None:
            train_x, val_x, mean, std, start = cached["train"], cached["val"], None, None, cfg.frozen_depth
    on_device = dict(crop=cfg.image_size, device=device, pin_memory=options.pin_memory,
                     dtype=options.amp_dtype, channels_last=options.channels_last)
    train = Batches(train_x, train_y, cfg.batch_size, mean=mean, std=std, shuffle=True, fold_single=True,
                    augment_strength=cfg.augment_strength, hflip=cfg.hflip, generator=gen, **on_device)
    val = Batches(val_x, val_y, cfg.batch_size * 2, mean=mean, std=std, shuffle=False, **on_device)
    return train, val, start


def save_checkpoint(path: Path, cfg: TrialConfig, data: DataHandle, model, optimizer, scheduler,
                    gen, state: dict, scaler) -> None:
    """Everything a resume needs, plus what explains the run: config, classes, preprocessing."""
    torch.save({"model": prune.plain_state_dict(model), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "generator": gen.get_state(),
                "scaler": scaler.state_dict(),
                "state": state, "config": cfg.to_dict(), "classes": list(data.classes),
                "image_size": data.image_size, "mean": list(data.mean), "std": list(data.std)}, path)


def lr_schedule(cfg: TrialConfig, optimizer, steps_per_epoch: int, recovery: bool = False):
    """``lr_t = lr * (1 - t/T) ** decay_power`` stepped per batch, over the fine-tuning epochs.

    Recovery after pruning gets a fresh schedule of the same shape over the recovery
    epochs, back from the trial's lr (as learning-rate rewinding does): the fine-tuning
    schedule has decayed to zero by then, so continuing it would not train at all.
    """
    epochs = cfg.recovery_epochs if recovery else cfg.max_epochs
    if recovery:
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr
    return torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=epochs * steps_per_epoch,
                                                 power=cfg.decay_power)


def make_optimizer(cfg: TrialConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


class Step:
    """The forward/backward of one batch, with the trial's precision and penalties."""

    def __init__(self, model, staged, cfg: TrialConfig, optimizer, scheduler, device, start=0,
                 options: DeviceOptions | None = None):
        self.model, self.staged, self.cfg, self.start = model, staged, cfg, start
        self.optimizer, self.scheduler, self.device = optimizer, scheduler, device
        self.options = options or device_options(cfg, device)
        amp = self.options.amp_dtype
        self.autocast = torch.autocast(device.type, dtype=amp) if amp else nullcontext()
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
        if self.scaler.is_enabled():  # the schedule counts every batch, a skipped step too
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        self.first_step_time = 0.0  # wall clock of the first optimizer step
        self.penalised = [p for n, p in model.named_parameters()
                          if p.requires_grad and p.ndim > 1] if cfg.l1 > 0 else []

    def to_device(self, x, y):
        """Batches from ``Batches`` are on the device already; plain tensors are moved."""
        if x.device != self.device:
            if self.options.pin_memory:
                x, y = x.pin_memory(), y.pin_memory()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.options.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def logits(self, x, training: bool):
        with self.autocast:
            feats = self.staged.forward_stages(x, start=self.start)  # start > 0: x is cached features
            return self.staged.forward_head(feats, self.cfg.dropout, training).float()

    def train_epoch(self, batches) -> tuple[float, int]:
        """Mean training loss and images seen. The loss is summed on the device and read
        once, at the end: a read per step would make the host wait for the device every
        step. A NaN or infinite loss makes the sum so, and stops the trial here."""
        lr = self.optimizer.param_groups[0]["lr"]
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        seen = 0
        batches = iter(batches)
        for x, y in itertools.islice(batches, 1):  # the first step, timed for the benchmarks
            total += self.train_step(x, y)
            seen += len(y)
            self.first_step_time = self.first_step_time or time.time()
        for x, y in batches:
            total += self.train_step(x, y)
            seen += len(y)
        value = _read(total)[0] / max(seen, 1)
        if not math.isfinite(value):
            raise TrialDiverged(f"training loss became {value} in an epoch that began at lr {lr:.3g}")
        return value, seen

    def train_step(self, x, y) -> torch.Tensor:
        """One optimizer step; returns the batch's summed loss, detached, on the device."""
        x, y = self.to_device(x, y)
        loss = F.cross_entropy(self.logits(x, True), y, label_smoothing=self.cfg.label_smoothing)
        summed = loss.detach().double() * len(y)
        if self.penalised:
            loss = loss + self.cfg.l1 * sum(p.abs().sum() for p in self.penalised)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)  # skipped when fp16 gradients overflowed
        self.scaler.update()
        self.scheduler.step()
        return summed


def _read(*values: torch.Tensor) -> list[float]:
    """The one place the loop reads numbers back from the device (a synchronisation)."""
    return torch.stack([v.double() for v in values]).tolist()


@torch.no_grad()
def evaluate(step: Step, batches) -> tuple[float, float]:
    """Mean cross-entropy (without label smoothing) and accuracy over ``batches``."""
    step.model.eval()
    loss = torch.zeros((), dtype=torch.float64, device=step.device)
    correct = torch.zeros((), dtype=torch.int64, device=step.device)
    n = 0
    for x, y in batches:
        x, y = step.to_device(x, y)
        logits = step.logits(x, False)
        loss += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        n += len(y)
    loss_sum, correct_sum = _read(loss, correct)  # read once, after the last batch
    return loss_sum / max(n, 1), correct_sum / max(n, 1)
