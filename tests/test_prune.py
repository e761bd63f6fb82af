"""Pruning: global magnitude pruning of the trainable conv/linear weights after fine-tuning,
recovery with the masks held, plain checkpoints, sparsity metrics and the smallest model
within an accuracy drop of the best."""

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import torchvision
from mlflow.tracking import MlflowClient
from torch import nn
from torch.nn.utils import prune as torch_prune

from dashboards import report
from search_spaces.loader import load_space
from sweeps.plan.prepare import Plan
from sweeps.results.summary import smallest_within_drop
from sweeps.run import main
from trainables import prune
from trainables.config import TrialConfig
from trainables.data import DataHandle, scan
from trainables.models import build_model, freeze, stages
from trainables.train import run_trial

from conftest import collect, run_sweep


@pytest.fixture
def handle(image_folder, tmp_path):
    return DataHandle(scan(image_folder, val_fraction=0.5), 16, str(tmp_path / "cache"))


def tiny(**kw):
    base = dict(model="resnet18", weights="none", image_size=16, lr=0.05, batch_size=4, max_epochs=2,
                decay_power=1.0, frozen_depth=2, prune_amount=0.6, recovery_epochs=2, seed=0)
    return TrialConfig(**{**base, **kw})


def weights_of(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]


def pruned_names(model: nn.Module) -> set[str]:
    chosen = {id(m) for m, _ in prune.prunable(model)}
    return {n for n, m in model.named_modules() if id(m) in chosen}


# ------------------------------------------------------------------- the pruned set


def test_prunable_is_the_trainable_conv_and_linear_weights():
    model = build_model("resnet18", 3, "none")
    freeze(stages(model, "resnet18"), 3)  # stem, layer1, layer2 frozen
    names = pruned_names(model)
    convs_and_linears = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert names == {n for n in convs_and_linears if n.startswith(("layer3", "layer4", "fc"))}


def test_vit_attention_projections_are_left_out():
    # MultiheadAttention reads out_proj.weight without calling out_proj, so a mask hook on it
    # would never run; everything else that is a conv or linear layer is pruned.
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                               hidden_dim=16, mlp_dim=32, num_classes=3)
    names = pruned_names(vit)
    assert "conv_proj" in names and "heads.head" in names
    assert "encoder.layers.encoder_layer_0.mlp.0" in names
    assert not any("self_attention" in n for n in names)
    prune.prune_global(vit, 0.5)
    x = torch.randn(2, 3, 32, 32)
    vit(x).sum().backward()  # each pruned layer's mask is applied in its own forward
    vit(x).sum().backward()


def test_global_magnitude_pruning_uses_one_threshold_across_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    with torch.no_grad():
        model[2].weight.mul_(0.1)  # the linear layer's weights are mostly the smaller ones
    before = [m.weight.detach().clone() for m, _ in prune.prunable(model)]
    params = prune.prune_global(model, 0.5)
    total = sum(w.numel() for w in before)
    assert prune.sparsity(params) == pytest.approx(round(0.5 * total) / total)
    kept = torch.cat([b[m.weight_mask.bool()].abs() for b, (m, _) in zip(before, params, strict=True)])
    cut = torch.cat([b[~m.weight_mask.bool()].abs() for b, (m, _) in zip(before, params, strict=True)])
    assert kept.min() >= cut.max()
    per_layer = [1 - m.weight_mask.mean().item() for m, _ in params]
    assert per_layer[1] > 0.5 > per_layer[0]  # not 50% of each layer: 50% of all of them


def test_pruning_a_channels_last_model_keeps_its_layout_and_its_parameters():
    # Trials on CUDA train channels_last; torch's global pruning cannot flatten such weights.
    model = build_model("resnet18", 2, "none").to(memory_format=torch.channels_last)
    weight = model.layer1[0].conv1.weight
    params = prune.prune_global(model, 0.5)
    conv = model.layer1[0].conv1
    assert conv.weight_orig is weight  # the optimizer's parameter, still
    assert conv.weight_orig.is_contiguous(memory_format=torch.channels_last)
    assert prune.sparsity(params) == pytest.approx(0.5, abs=1e-6)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    model(x).sum().backward()
    assert bool((conv.weight_orig.grad[conv.weight_mask == 0] == 0).all())  # no gradient to pruned weights


def test_nonzero_params_counts_the_whole_model_and_plain_state_dict_is_what_remove_leaves():
    torch.manual_seed(0)
    model = build_model("resnet18", 3, "none")
    freeze(stages(model, "resnet18"), 2)
    dense = sum(int(torch.count_nonzero(p)) for p in model.parameters())  # BatchNorm biases start at 0
    assert prune.nonzero_params(model) == dense
    zero_already = sum(int((m.weight == 0).sum()) for m, _ in prune.prunable(model))  # pruned first
    params = prune.prune_global(model, 0.3)
    pruned = round(0.3 * sum(m.weight.numel() for m, _ in params))
    assert prune.nonzero_params(model) == dense - pruned + zero_already  # frozen weights count too

    plain, nonzero = prune.plain_state_dict(model), prune.nonzero_params(model)
    for module, name in params:
        torch_prune.remove(module, name)  # makes the masks permanent: what recovery cannot have
    removed = model.state_dict()
    assert set(plain) == set(removed)
    for key, value in removed.items():
        assert torch.equal(plain[key], value), key
    reference = torchvision.models.get_model("resnet18", num_classes=3)
    reference.load_state_dict(plain, strict=True)
    assert prune.nonzero_params(reference) == nonzero


# ------------------------------------------------------------------------ the trial


def test_a_trial_prunes_after_fine_tuning_and_recovers_with_the_masks_held(handle, tmp_path):
    seen, cfg = [], tiny()
    run_trial(cfg, handle, collect(seen, tmp_path), threads=1)
    assert [m["epoch"] for m in seen] == [1, 2, 3, 4] == list(range(1, cfg.total_epochs + 1))
    dense, pruned = seen[:2], seen[2:]
    assert all(m["sparsity"] == 0 for m in dense)
    assert all(m["sparsity"] == pytest.approx(0.6, abs=1e-4) for m in pruned)
    assert dense[0]["nonzero_params"] == dense[1]["nonzero_params"] > pruned[0]["nonzero_params"]
    assert pruned[0]["nonzero_params"] == pruned[1]["nonzero_params"]
    # Recovery restarts the schedule: back to lr, decaying to zero over the recovery epochs.
    assert [m["lr"] for m in seen] == pytest.approx([cfg.lr / 2, 0.0, cfg.lr / 2, 0.0], abs=1e-9)

    first, last = weights_of(tmp_path / "epoch3.pt"), weights_of(tmp_path / "epoch4.pt")
    model = torchvision.models.get_model("resnet18", num_classes=2)
    model.load_state_dict(last, strict=True)  # masks folded in: plain torchvision keys
    assert prune.nonzero_params(model) == pruned[1]["nonzero_params"]
    trained = [k for k in last if k.startswith(("layer2", "layer3", "layer4", "fc")) and k.endswith("weight")
               and last[k].ndim > 1]
    for key in trained:
        assert torch.equal(first[key] == 0, last[key] == 0), key  # pruned weights stayed zero
    assert any(not torch.equal(first[k], last[k]) for k in trained)  # while the others trained
    dense_weights = weights_of(tmp_path / "epoch2.pt")
    assert torch.equal(last["layer1.0.conv1.weight"], dense_weights["layer1.0.conv1.weight"])  # frozen
    assert bool((last["layer1.0.conv1.weight"] != 0).all())


def test_resuming_in_recovery_keeps_the_masks_and_continues_the_same_run(handle, tmp_path):
    straight, resumed = [], []
    run_trial(tiny(), handle, collect(straight, tmp_path), threads=1)
    run_trial(tiny(), handle, collect(resumed), resume_from=tmp_path / "epoch3.pt", threads=1)
    assert [m["epoch"] for m in resumed] == [4]
    for key in ("train_loss", "val_loss", "lr", "sparsity", "nonzero_params"):
        assert resumed[0][key] == pytest.approx(straight[3][key], rel=1e-5, abs=1e-9), key


def test_patience_in_recovery_counts_from_the_pruning(handle):
    # Only the head trains (no BatchNorm statistics move) and lr 1e-9 barely moves it, so
    # val_acc never improves within a phase. Counted from the dense best at epoch 1,
    # patience 2 would stop at epoch 3, the first recovery epoch.
    seen = []
    run_trial(tiny(lr=1e-9, frozen_depth=5, patience=2, prune_amount=0.1, recovery_epochs=4), handle,
              collect(seen), threads=1)
    assert [m["epoch"] for m in seen] == [1, 2, 3, 4, 5]
    assert seen[-1]["early_stopped"] == 1 and seen[2]["sparsity"] > 0


def test_patience_in_fine_tuning_goes_on_to_pruning_and_recovery(handle, tmp_path):
    # val_acc never improves (lr 1e-9, only the head trains): patience 2 ends fine-tuning at
    # epoch 3 of 6; the model is then pruned and recovers for its 3 epochs, epochs 4-6.
    cfg = tiny(lr=1e-9, frozen_depth=5, patience=2, prune_amount=0.1, max_epochs=6, recovery_epochs=3)
    seen, resumed = [], []
    run_trial(cfg, handle, collect(seen, tmp_path), threads=1)
    assert [m["epoch"] for m in seen] == [1, 2, 3, 4, 5, 6]
    assert seen[2]["finetune_stopped"] == 1 and "early_stopped" not in seen[2]
    assert seen[2]["sparsity"] == 0 and seen[3]["sparsity"] > 0
    assert seen[-1]["early_stopped"] == 1  # patience in recovery ends the trial
    run_trial(cfg, handle, collect(resumed), resume_from=tmp_path / "epoch3.pt", threads=1)
    assert [m["epoch"] for m in resumed] == [4, 5, 6]
    assert [m["sparsity"] for m in resumed] == [m["sparsity"] for m in seen[3:]]


def test_pruning_without_recovery_is_refused(handle, tmp_path, monkeypatch, capsys, cache_dir):
    with pytest.raises(ValueError, match="recovery_epochs >= 1"):
        run_trial(tiny(recovery_epochs=0), handle, threads=1)
    monkeypatch.chdir(tmp_path)
    assert main(["--space", "smoke", "--set", "prune_amount=0.5"]) == 2
    assert "prune_amount > 0 needs recovery_epochs >= 1" in capsys.readouterr().err


def test_a_searched_prune_amount_counts_its_recovery_epochs():
    space = load_space("pruning")
    assert space.config().total_epochs == space.config().max_epochs  # prune_amount's default is 0
    plan = SimpleNamespace(space=space)
    assert Plan.total_epochs.fget(plan) == space.config().max_epochs + space.config().recovery_epochs


# --------------------------------------------------------------- smallest within drop


def model_at(trial, epoch, val_acc, nonzero):
    return {"trial_id": trial, "epoch": epoch, "val_acc": val_acc, "nonzero_params": nonzero}


def test_smallest_within_drop_picks_the_fewest_nonzero_params_within_reach_of_the_best():
    models = [model_at("a", 2, 0.90, 1000), model_at("a", 4, 0.88, 250),  # a dense, then pruned
              model_at("b", 2, 0.91, 1000), model_at("b", 4, 0.85, 100),
              model_at("c", 2, 0.89, 1000), model_at("c", 4, 0.89, 300)]
    assert smallest_within_drop(models, 0.0) == models[2]
    assert smallest_within_drop(models, 0.02) == models[5]  # c at 300 params; c dense is as good but bigger
    assert smallest_within_drop(models, 0.03) == models[1]  # 0.91 - 0.03: the boundary counts
    assert smallest_within_drop(models, 0.06) == models[3]
    assert smallest_within_drop([], 0.01) is None


def test_the_report_names_the_smallest_model_and_draws_every_model():
    sizes = pd.DataFrame([model_at(1, 2, 0.90, 11_000_000), model_at(1, 4, 0.86, 3_000_000),
                          model_at(2, 2, 0.91, 11_000_000), model_at(2, 4, 0.895, 5_000_000)])
    sizes = sizes.rename(columns={"trial_id": "trial"}).assign(sparsity=[0, 0.8, 0, 0.6])
    sweep = SimpleNamespace(curves=sizes[["val_acc"]], seed_recipe=None)
    html = report.size_section(sweep, sizes, 0.02)
    assert "<b>trial 2 at epoch 4</b>" in html and "45% of the best model" in html
    assert html.count("<circle") == 4 and html.count('class="dot best"') == 1
    assert report.size_section(sweep, None, 0.02) == ""  # a sweep that did not prune


def test_max_acc_drop_must_be_a_val_acc_difference(tmp_path, monkeypatch, capsys, cache_dir):
    monkeypatch.chdir(tmp_path)
    assert main(["--space", "pruning", "--max-acc-drop", "5"]) == 2
    assert "--max-acc-drop must be between 0 and 1" in capsys.readouterr().err


@pytest.mark.slow
def test_a_pruning_sweep_logs_sizes_and_names_the_smallest_model(mlflow_server, cache_dir, tmp_path):
    proc = run_sweep(["--space", "smoke", "--trials", "2", "--max-epochs", "1", "--name", "prune-itest",
                      "--set", "prune_amount=0.7", "--set", "recovery_epochs=1", "--max-acc-drop", "0.05",
                      "--tracking-uri", mlflow_server, "--storage", str(tmp_path / "results")], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(Path(proc.stdout.strip().splitlines()[-1]).read_text())
    client = MlflowClient(mlflow_server)
    runs = {r.info.run_id: r for r in client.search_runs(
        [summary["experiment_id"]], f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'")}
    assert len(runs) == 2
    pruned = 0
    for run_id in runs:  # ASHA may stop one trial after epoch 1, before it is pruned
        sparsity = {m.step: m.value for m in client.get_metric_history(run_id, "sparsity")}
        nonzero = {m.step: m.value for m in client.get_metric_history(run_id, "nonzero_params")}
        assert sparsity[1] == 0 and nonzero[1] > 0
        if 2 in sparsity:
            assert sparsity[2] == pytest.approx(0.7, abs=1e-4) and nonzero[2] < nonzero[1]
            pruned += 1
    assert pruned >= 1  # ASHA lets the first trial at a rung go on

    smallest = summary["smallest_within_drop"]
    assert smallest["max_acc_drop"] == 0.05 and smallest["best_val_acc"] == summary["best"]["val_acc"]
    assert smallest["val_acc"] >= smallest["best_val_acc"] - 0.05
    assert smallest["nonzero_params"] <= smallest["best_nonzero_params"]
    logged = client.get_metric_history(smallest["run_id"], "nonzero_params")
    assert {m.step: m.value for m in logged}[smallest["epoch"]] == smallest["nonzero_params"]

    best_dir = Path(summary["best"]["checkpoint"]).parent
    meta = json.loads((best_dir / "meta.json").read_text())
    model = torchvision.models.get_model(meta["model"], num_classes=len(meta["classes"]))
    model.load_state_dict(torch.load(best_dir / "model.pt", weights_only=True), strict=True)

    # The report names the same model, by the same rule, from MLflow alone.
    out = tmp_path / "report.html"
    assert report.main(["--sweep", "prune-itest", "--tracking-uri", mlflow_server, "--out", str(out),
                        "--no-log", "--max-acc-drop", "0.05"]) == 0
    text = out.read_text()
    number = runs[smallest["run_id"]].data.tags["ftsweep.trial_number"]
    assert f"<b>trial {number} at epoch {smallest['epoch']}</b>" in text
    chart = text[text.index('data-chart="sizes"'):]
    chart = chart[:chart.index("</svg>")]
    epochs = sum(len(client.get_metric_history(run_id, "val_acc")) for run_id in runs)
    assert chart.count("<circle") == epochs and chart.count('class="dot best"') == 1  # a dot per model
