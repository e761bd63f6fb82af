"""``--model`` takes any torchvision classification model: one model of each staged family
(ResNet, VGG, MobileNet, EfficientNet, ConvNeXt, ViT) trains through ``run_trial`` at
every legal ``frozen_depth``, with random weights, two training images and one step.

ViT runs at 224 px, the only size torchvision's VisionTransformer accepts for its
registry models. It is vit_b_32 rather than vit_b_16: the same staged view (embedding and
12 encoder layers) with a quarter of the tokens, ~2 s a depth instead of ~6. VGG and ViT,
~0.4 GB of weights between them and most of the file's time, carry the slow mark.
"""


import pytest
import torch

from trainables import models
from trainables.config import TrialConfig
from trainables.data import DataHandle, scan
from trainables.train import CHECKPOINT_FILE, run_trial

from conftest import write_image_folder

FAMILIES = [
    pytest.param("resnet18", 32, id="resnet"),
    pytest.param("vgg11", 32, id="vgg", marks=pytest.mark.slow),  # ~0.5 GB of weights: seconds a depth
    pytest.param("mobilenet_v3_small", 32, id="mobilenet"),
    pytest.param("efficientnet_b0", 32, id="efficientnet"),
    pytest.param("convnext_tiny", 32, id="convnext"),
    pytest.param("vit_b_32", 224, id="vit", marks=pytest.mark.slow),
]


@pytest.fixture(autouse=True)
def light():
    # One thread: tiny inputs gain nothing from more, and the machine is shared.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def stage_params(name: str, model) -> list[set[str]]:
    """The parameter names of each stage, then of pool and head together."""
    names = {id(p): n for n, p in model.named_parameters()}
    staged = models.stages(model, name)
    parts = [*staged.stages, torch.nn.ModuleList([staged.pool, staged.head])]
    return [{names[id(p)] for p in part.parameters()} for part in parts]


@pytest.mark.parametrize("name, size", FAMILIES)
def test_one_training_step_at_every_frozen_depth(name, size, tmp_path):
    folder = write_image_folder(tmp_path / "images", per_class=2, size=size)
    handle = DataHandle(scan(folder, val_fraction=0.5), size, str(tmp_path / "cache"))
    torch.manual_seed(0)  # as run_trial seeds itself: these are the weights it starts from
    initial = models.build_model(name, 2, "none")
    parts = stage_params(name, initial)
    initial = {k: v.clone() for k, v in initial.state_dict().items()}
    depths = models.num_stages(name) + 1
    assert len(parts) == depths

    for depth in range(depths):
        cfg = TrialConfig(model=name, weights="none", image_size=size, batch_size=2, max_epochs=1,
                          lr=0.01, momentum=0.0, frozen_depth=depth, seed=0)
        seen = []

        def report(metrics, ckpt_dir, seen=seen):
            seen.append((metrics, torch.load(ckpt_dir / CHECKPOINT_FILE, weights_only=True)["model"]))

        run_trial(cfg, handle, report, threads=1)
        (metrics, trained), = seen
        assert torch.isfinite(torch.tensor(metrics["train_loss"])) and 0 <= metrics["val_acc"] <= 1
        frozen = set().union(*parts[:depth])
        assert all(torch.equal(trained[k], initial[k]) for k in frozen), (name, depth)
        first_trained = parts[depth]  # the first stage after the frozen ones, or pool and head
        assert any(not torch.equal(trained[k], initial[k]) for k in first_trained), (name, depth)
