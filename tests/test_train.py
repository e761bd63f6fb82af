import math

import pytest
import torch

from trainables.config import TrialConfig
from trainables.data import DataHandle, scan
from trainables.train import DeviceOptions, Step, TrialDiverged, device_options, run_trial

from conftest import collect

EPOCH_KEYS = {"epoch", "val_acc", "val_loss", "train_loss", "lr", "img_per_s"}


@pytest.fixture
def handle(image_folder, tmp_path):
    return DataHandle(scan(image_folder, val_fraction=0.5), 16, str(tmp_path / "cache"))


def tiny(**kw):
    base = dict(model="resnet18", weights="none", image_size=16, lr=0.05, batch_size=4,
                max_epochs=3, decay_power=2.0, seed=0)
    return TrialConfig(**{**base, **kw})


def test_reports_every_epoch_with_a_polynomial_lr_over_the_whole_budget(handle):
    seen = []
    cfg = tiny()
    run_trial(cfg, handle, collect(seen), threads=1)
    assert [m["epoch"] for m in seen] == [1, 2, 3]
    assert all(EPOCH_KEYS <= set(m) for m in seen)
    for m in seen:  # stepped per iteration: after epoch e of E, lr = lr0 * (1 - e/E) ** power
        assert m["lr"] == pytest.approx(cfg.lr * (1 - m["epoch"] / cfg.max_epochs) ** cfg.decay_power, abs=1e-9)
    assert torch.get_num_threads() == 1


def test_checkpoint_holds_what_a_resume_needs_and_resuming_changes_nothing(handle, tmp_path):
    straight, resumed = [], []
    run_trial(tiny(), handle, collect(straight, tmp_path), threads=1)
    ckpt = torch.load(tmp_path / "epoch1.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "state", "config", "classes"} <= set(ckpt)
    assert ckpt["state"]["epoch"] == 1 and ckpt["config"] == tiny().to_dict()
    run_trial(tiny(), handle, collect(resumed), resume_from=tmp_path / "epoch1.pt", threads=1)
    assert [m["epoch"] for m in resumed] == [2, 3]
    for a, b in zip(straight[1:], resumed, strict=False):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
        assert a["lr"] == pytest.approx(b["lr"])


def test_same_seed_same_run_other_seed_other_run(handle):
    a, b, c = [], [], []
    run_trial(tiny(max_epochs=1), handle, collect(a), threads=1)
    run_trial(tiny(max_epochs=1), handle, collect(b), threads=1)
    run_trial(tiny(max_epochs=1, seed=1), handle, collect(c), threads=1)
    assert a[0]["train_loss"] == pytest.approx(b[0]["train_loss"], rel=1e-6)
    assert a[0]["train_loss"] != pytest.approx(c[0]["train_loss"], rel=1e-6)


def test_frozen_stages_do_not_change(handle, tmp_path):
    run_trial(tiny(frozen_depth=2, max_epochs=1), handle, collect([], tmp_path), threads=1)
    trained = torch.load(tmp_path / "epoch1.pt", weights_only=True)["model"]
    torch.manual_seed(0)
    from trainables.models import build_model

    initial = build_model("resnet18", 2, "none").state_dict()
    for name in ("conv1.weight", "layer1.0.conv1.weight", "layer1.0.bn1.running_mean"):
        torch.testing.assert_close(trained[name], initial[name])
    assert not torch.equal(trained["layer2.0.conv1.weight"], initial["layer2.0.conv1.weight"])


def test_a_diverging_trial_says_so(handle):
    with pytest.raises(TrialDiverged, match="loss became"):
        run_trial(tiny(lr=1e12, decay_power=0.0, max_epochs=2), handle, threads=1)


def test_patience_stops_when_val_acc_stops_improving(handle):
    seen = []
    # every stage frozen (BatchNorm in eval mode) and lr ~0: val_acc cannot move after epoch 1
    run_trial(tiny(lr=1e-9, max_epochs=6, patience=2, frozen_depth=5), handle, collect(seen), threads=1)
    assert len(seen) == 3 and seen[-1]["early_stopped"] == 1


def test_adamw_label_smoothing_and_l1_are_accepted(handle):
    seen = []
    run_trial(tiny(optimizer="adamw", lr=1e-3, label_smoothing=0.1, l1=1e-5, max_epochs=1),
              handle, collect(seen), threads=1)
    assert seen[0]["train_loss"] > 0


def test_on_cuda_amp_channels_last_and_pinned_memory_are_on_and_each_can_be_turned_off(monkeypatch):
    cuda = torch.device("cuda")  # only the decision: this machine needs no GPU for it
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert device_options(tiny(), cuda) == DeviceOptions(torch.bfloat16, True, True)
    assert device_options(tiny(amp=False), cuda) == DeviceOptions(None, True, True)
    assert device_options(tiny(channels_last=False), cuda) == DeviceOptions(torch.bfloat16, False, True)
    assert device_options(tiny(pin_memory=False), cuda) == DeviceOptions(torch.bfloat16, True, False)
    # GPUs before Ampere only emulate bf16: fp16, whose gradients the step scales
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert device_options(tiny(), cuda).amp_dtype == torch.float16
    assert device_options(tiny(), torch.device("cpu")) == DeviceOptions()


def test_an_fp16_step_scales_its_loss_and_still_trains():
    from trainables.models import build_model, stages

    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 2, (8,))

    def train(options, steps=8):
        torch.manual_seed(0)
        model = build_model("resnet18", 2, "none")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0)
        step = Step(model, stages(model, "resnet18"), tiny(), optimizer, scheduler, torch.device("cpu"),
                    options=options)
        return step, [step.train_epoch([(x, y)])[0] for _ in range(steps)]

    fp16, half_losses = train(DeviceOptions(amp_dtype=torch.float16))
    full, full_losses = train(DeviceOptions())
    assert not full.scaler.is_enabled()
    # the scaler started at 2**16 and halved on each step whose fp16 gradients overflowed
    assert fp16.scaler.is_enabled() and math.log2(fp16.scaler.get_scale()).is_integer()
    assert fp16.scaler.get_scale() < 2.0 ** 16
    assert half_losses[0] == pytest.approx(full_losses[0], rel=1e-2)  # the same forward pass, in fp16
    assert half_losses[-1] < 0.5 * half_losses[0]  # the steps it took were unscaled and trained


def test_a_ray_trial_takes_as_many_threads_as_cpus_ray_assigned_it(handle, monkeypatch):
    # Ray sets OMP_NUM_THREADS=1 in its workers; the trial sets torch's own count.
    import ray
    from ray import tune

    from trainables import ray_trial

    context = type("Context", (), {"get_assigned_resources": lambda self: {"CPU": 2.0}})()
    monkeypatch.setattr(ray, "get_runtime_context", lambda: context)
    monkeypatch.setattr(tune, "get_checkpoint", lambda: None)
    reports = []
    monkeypatch.setattr(tune, "report", lambda metrics, checkpoint=None: reports.append(metrics))
    monkeypatch.setenv("FTSWEEP_CACHE", str(handle.cache_dir))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ray_trial.trainable(tiny(max_epochs=1).to_dict(), handle)
    finally:
        torch.set_num_threads(before)
    assert [r["threads"] for r in reports] == [2]


def test_a_last_training_batch_of_one_joins_the_batch_before_it(image_folder, tmp_path):
    """At 32 px resnet18's layer4 maps are 1x1: BatchNorm cannot train on a batch of one.
    The last image of the epoch trains with the batch before it; validation sees every image."""
    data = DataHandle(scan(image_folder, val_fraction=0.5), 32, str(tmp_path / "cache"))
    n_train = len(data.dataset.train)
    cfg = tiny(image_size=32, batch_size=n_train - 1, max_epochs=1, frozen_depth=0)  # batches n-1, then 1
    seen = []
    run_trial(cfg, data, collect(seen), threads=1)  # before: "Expected more than 1 value per channel"
    assert len(seen) == 1 and math.isfinite(seen[0]["train_loss"])

    from trainables.pipeline import Batches

    x, y = data.arrays("train")
    folded = Batches(x, y, n_train - 1, mean=data.mean, std=data.std, shuffle=True, fold_single=True)
    assert len(folded) == 1 and [len(b) for b, _ in folded] == [n_train]
    val_x, val_y = data.arrays("val")
    val = Batches(val_x, val_y, len(val_y) - 1, mean=data.mean, std=data.std, shuffle=False)
    assert sum(len(b) for b, _ in val) == len(val_y)  # validation never folds nor drops


def test_of_tied_epochs_the_trial_names_the_latest_as_its_best(handle, tmp_path):
    """An lr too small to change a prediction: every epoch ties on val_acc. The trial's best
    epoch is the last, as the checkpoint Ray Tune keeps on a tie and the report name it."""
    seen = []
    from trainables.models import num_stages

    frozen = num_stages("resnet18")  # BatchNorm's running statistics frozen too
    run_trial(tiny(lr=1e-12, max_epochs=3, frozen_depth=frozen), handle, collect(seen, tmp_path), threads=1)
    assert len({m["val_acc"] for m in seen}) == 1
    assert torch.load(tmp_path / "epoch3.pt", weights_only=True)["state"]["best_epoch"] == 3
