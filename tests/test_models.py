"""Tests for trainables.models: names, weights, head replacement, stages and freezing."""

from __future__ import annotations

import socket
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import StochasticDepth

from trainables import models
from trainables.models import ModelError

UNSUPPORTED = {"googlenet", "inception_v3", "squeezenet1_0", "squeezenet1_1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # On 32x32 inputs intra-op threads cost more than they save, and on a busy machine
    # they can make a forward pass 100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------- names


def test_unknown_name_suggests_close_matches():
    with pytest.raises(
        ModelError, match="unknown model 'resnt18'; close matches: resnet18"
    ):
        models.check_model_name("resnt18")
    with pytest.raises(ModelError, match="resnet18"):
        models.build_model("resnt18", 5, "none")


def test_unknown_name_without_close_match_says_how_to_list():
    with pytest.raises(ModelError, match="classification_models"):
        models.check_model_name("zzzz")


def test_classification_models_excludes_other_tasks():
    names = models.classification_models()
    assert "resnet18" in names and "vit_b_16" in names
    assert "fasterrcnn_resnet50_fpn" not in names and "quantized_resnet18" not in names


def test_the_names_read_from_torchvisions_source_are_the_ones_it_registers():
    """The name check runs before Ray starts, without importing torchvision: it reads the
    builders from the source; torchvision's own registry must say the same."""
    from trainables import zoo

    folder = Path(torchvision.__file__).parent / "models"
    from_source = sorted(n for f in folder.glob("*.py") for n in zoo.BUILDER.findall(f.read_text()))
    assert from_source == sorted(torchvision.models.list_models(module=torchvision.models))
    assert models.classification_models() == from_source


def test_the_checks_before_ray_starts_import_neither_torch_nor_mlflow(tmp_path):
    """sweeps/run.py starts Ray as soon as the quick checks pass; importing torch,
    torchvision and MLflow (seconds) happens beside it, not before it."""
    import subprocess
    import sys

    code = ("import sys; from sweeps.cli import build_parser; from sweeps.plan.prepare import prepare\n"
            "class Done(Exception): pass\n"
            "def checked(): raise Done\n"
            "try: prepare(build_parser().parse_args(sys.argv[1:]), checked=checked)\n"
            "except Done: pass\n"
            "heavy = sorted(m for m in ('torch', 'torchvision', 'mlflow', 'ray.tune') if m in sys.modules)\n"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code, "--space", "lr_decay", "--tracking-uri",
                          f"sqlite:///{tmp_path}/m.db", "--storage", str(tmp_path / "s")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr[-2000:]


def test_the_stores_passed_without_asking_mlflow_are_mlflow_stores():
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    from sweeps.plan.prepare import COMMON_STORES

    assert COMMON_STORES <= set(_tracking_store_registry._registry)


# --------------------------------------------------------------------- weights


def _offline_hub(monkeypatch, tmp_path):
    """An empty hub cache and a download that fails like a dead network, noting its timeout."""
    timeouts = []

    def no_network(url, dst, *args, **kwargs):
        timeouts.append(socket.getdefaulttimeout())
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return timeouts


def test_imagenet_weights_offline_and_uncached(monkeypatch, tmp_path):
    timeouts = _offline_hub(monkeypatch, tmp_path)
    with pytest.raises(ModelError) as err:
        models.build_model("resnet18", 5, "imagenet")
    message = str(err.value)
    for part in (
        "'resnet18'",
        str(tmp_path / "checkpoints"),
        "--weights PATH",
        "--weights none",
    ):
        assert part in message
    assert timeouts == [models.DOWNLOAD_TIMEOUT_S]  # the download was tried, briefly
    assert socket.getdefaulttimeout() is None  # and the global timeout restored


def test_imagenet_weights_from_hub_cache(monkeypatch, tmp_path):
    _offline_hub(monkeypatch, tmp_path)
    url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    cached = tmp_path / "checkpoints" / url.rsplit("/", 1)[-1]
    cached.parent.mkdir()
    pretrained = torchvision.models.resnet18().state_dict()
    torch.save(pretrained, cached)
    model = models.build_model("resnet18", 5, "imagenet")
    assert torch.equal(
        model.layer1[0].conv1.weight, pretrained["layer1.0.conv1.weight"]
    )
    assert model.fc.out_features == 5


@pytest.mark.parametrize("file_classes", [1000, 5])
def test_path_weights_load_backbone_and_get_fresh_head(tmp_path, file_classes):
    path = tmp_path / "w.pt"
    saved = torchvision.models.resnet18(num_classes=file_classes).state_dict()
    torch.save(saved, path)
    model = models.build_model("resnet18", 5, str(path))
    assert torch.equal(model.layer1[0].conv1.weight, saved["layer1.0.conv1.weight"])
    assert torch.equal(model.bn1.running_var, saved["bn1.running_var"])
    assert isinstance(model.fc, nn.Linear) and model.fc.out_features == 5
    torchvision.models.get_model("resnet18", num_classes=5).load_state_dict(
        model.state_dict()
    )


def test_path_weights_of_another_model_name_the_keys_and_file(tmp_path):
    path = tmp_path / "resnet34.pt"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    with pytest.raises(
        ModelError, match=r"resnet34\.pt.*unexpected \(\d+\): layer1\.2\."
    ):
        models.build_model("resnet18", 5, str(path))

    path = tmp_path / "mobilenet.pt"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), path)
    with pytest.raises(
        ModelError, match=r"mobilenet\.pt.*missing \(\d+\): bn1\..*unexpected"
    ):
        models.build_model("resnet18", 5, str(path))


def test_path_weights_shape_mismatch(tmp_path):
    path = tmp_path / "w.pt"
    state = torchvision.models.resnet18().state_dict()
    state["conv1.weight"] = torch.zeros(64, 1, 7, 7)  # a grayscale stem
    torch.save(state, path)
    with pytest.raises(ModelError, match=r"shape mismatch \(1\): conv1\.weight"):
        models.build_model("resnet18", 5, str(path))


def test_path_weights_missing_or_not_a_state_dict(tmp_path):
    with pytest.raises(ModelError, match="nope.pt"):
        models.build_model("resnet18", 5, str(tmp_path / "nope.pt"))
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": torchvision.models.resnet18().state_dict(), "epoch": 3}, path)
    with pytest.raises(ModelError, match="checkpoint.pt.*not a flat state_dict"):
        models.build_model("resnet18", 5, str(path))


def _shapes(model: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_every_supported_model_state_dict_matches_torchvision_with_num_classes():
    # On the meta device construction allocates nothing, so every model takes ~ms.
    # RegNet's constructor needs real tensors; one small RegNet stands for its family.
    names = [n for n in models.classification_models() if not n.startswith("regnet")]
    for name in names:
        if name in UNSUPPORTED:
            with pytest.raises(ModelError, match=name):
                models.build_model(name, 5, "none")
            continue
        with torch.device("meta"):
            built = models.build_model(name, 5, "none")
            reference = torchvision.models.get_model(name, num_classes=5)
        assert _shapes(built) == _shapes(reference), name
    built = models.build_model("regnet_x_400mf", 5, "none")
    torchvision.models.get_model("regnet_x_400mf", num_classes=5).load_state_dict(
        built.state_dict()
    )


# ---------------------------------------------------------------------- stages
# Each family: its registry name, the parameter/module name prefixes of stage i, and
# the stage count. A name belongs to a stage when it equals a prefix or extends it by ".".

VGG11_BLOCKS = [
    (0, 3),
    (3, 6),
    (6, 11),
    (11, 16),
    (16, 21),
]  # features indices per block


def _resnet_stage(i):
    return ["conv1", "bn1", "relu", "maxpool"] if i == 0 else [f"layer{i}"]


def _vgg_stage(i):
    return [f"features.{j}" for j in range(*VGG11_BLOCKS[i])]


def _features_stage(i):
    return [f"features.{i}"]


def _vit_stage(i):
    if i == 0:
        return ["conv_proj", "class_token", "encoder.pos_embedding", "encoder.dropout"]
    return [f"encoder.layers.encoder_layer_{i - 1}"]


def _small_vit(**kwargs):
    # vit_b_16 from the registry is 86M parameters at 224x224; this VisionTransformer has
    # the same structure and module names, so stages() treats it as "vit_b_16".
    return torchvision.models.VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
        num_classes=3,
        **kwargs,
    )


FAMILIES = {
    "resnet18": (_resnet_stage, 5),
    "vgg11": (_vgg_stage, 5),
    "mobilenet_v3_small": (_features_stage, 13),
    "efficientnet_b0": (_features_stage, 9),
    "convnext_tiny": (_features_stage, 8),
    "vit_b_16": (_vit_stage, 3),  # the small ViT: embedding + 2 encoder layers
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    name = request.param
    torch.manual_seed(0)
    model = (
        _small_vit()
        if name == "vit_b_16"
        else models.build_model(name, num_classes=3, weights="none")
    )
    stage_prefixes, count = FAMILIES[name]
    return name, model, stage_prefixes, count


def _in(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_stages_cover_every_parameter_once(family):
    name, model, _, count = family
    staged = models.stages(model, name)
    assert len(staged.stages) == count
    parts = [*staged.stages, staged.pool, staged.head]
    ids = [id(p) for part in parts for p in part.parameters()]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())


def test_head_is_the_models_final_layer(family):
    name, model, _, _ = family
    staged = models.stages(model, name)
    assert isinstance(staged.head, nn.Linear) and staged.head.out_features == 3
    assert any(m is staged.head for m in model.modules())


def test_staged_forward_equals_model_forward(family):
    name, model, _, _ = family
    staged = models.stages(model, name)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        split = staged.forward_head(
            staged.forward_stages(staged.forward_stages(x, 0, 2), 2)
        )
        torch.testing.assert_close(staged.forward(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(split, expected, rtol=1e-5, atol=1e-5)


def test_freeze_trains_exactly_the_stages_after_frozen_depth(family):
    name, model, stage_prefixes, count = family
    staged = models.stages(model, name)
    all_params = {n for n, _ in model.named_parameters()}
    try:
        for depth in range(count + 1):
            frozen = [p for i in range(depth) for p in stage_prefixes(i)]
            models.freeze(staged, depth)
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            assert trainable == {n for n in all_params if not _in(n, frozen)}, depth

            models.set_train_mode(model, staged, depth)
            leaves = [
                (n, m) for n, m in model.named_modules() if not list(m.children())
            ]
            assert {n for n, m in leaves if not m.training} == {
                n for n, _ in leaves if _in(n, frozen)
            }, depth
            # the mode matters: some leaf behaves differently in training
            assert any(
                isinstance(m, (nn.BatchNorm2d, nn.Dropout, StochasticDepth))
                for _, m in leaves
            )
    finally:
        models.freeze(staged, 0)


def test_set_train_mode_eval_turns_everything_off(family):
    name, model, _, _ = family
    staged = models.stages(model, name)
    models.set_train_mode(model, staged, 1, training=False)
    assert not any(m.training for m in model.modules())


def test_num_stages_matches_stages():
    for name, (_, count) in FAMILIES.items():
        if name != "vit_b_16":
            assert models.num_stages(name) == count
    assert models.num_stages("vit_b_16") == 13  # embedding + 12 encoder layers
    assert models.num_stages("vgg19_bn") == 5
    assert models.num_stages("mobilenet_v2") == 19


def test_mobilenet_v2_staged_forward_equals_model_forward():
    model = models.build_model("mobilenet_v2", 3, "none").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            models.stages(model, "mobilenet_v2").forward(x), model(x)
        )


def test_vit_with_pre_logits_keeps_them_in_pool():
    model = _small_vit(representation_size=8).eval()
    staged = models.stages(model, "vit_b_16")
    assert staged.head is model.heads.head
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(staged.forward(x), model(x))


def test_forward_head_dropout_only_when_training():
    model = models.build_model("resnet18", 3, "none").eval()
    staged = models.stages(model, "resnet18")
    feats = staged.forward_stages(torch.randn(2, 3, 32, 32))
    with torch.no_grad():
        plain = staged.forward_head(feats)
        torch.testing.assert_close(staged.forward_head(feats, dropout=0.9), plain)
        assert not torch.allclose(
            staged.forward_head(feats, dropout=0.9, training=True), plain
        )


def test_unsupported_family_for_stages():
    with pytest.raises(
        ModelError,
        match="not supported for 'regnet_x_400mf'; supported families: resnet",
    ):
        models.num_stages("regnet_x_400mf")
    # Other models still train end to end: no stages, the whole model is the head.
    model = models.build_model("shufflenet_v2_x0_5", 3, "none").eval()
    staged = models.stages(model, "shufflenet_v2_x0_5")
    assert staged.stages == [] and staged.head is model
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(staged.forward(x), model(x))
    with pytest.raises(ModelError, match="0..0"):
        models.freeze(staged, 1)


@pytest.mark.parametrize("depth", [-1, 6])
def test_freeze_out_of_range_names_the_range(depth):
    staged = models.stages(models.build_model("resnet18", 3, "none"), "resnet18")
    with pytest.raises(ModelError, match=rf"frozen_depth={depth}.*5 stages.*0\.\.5"):
        models.freeze(staged, depth)


# ---------------------------------------------------------------- normalization


def test_normalization():
    assert models.normalization("resnet18", "imagenet") == (
        (0.485, 0.456, 0.406),
        (0.229, 0.224, 0.225),
    )
    assert models.normalization("vit_b_16", "none") == (
        models.IMAGENET_MEAN,
        models.IMAGENET_STD,
    )
    with pytest.raises(ModelError):
        models.normalization("resnt18", "imagenet")
