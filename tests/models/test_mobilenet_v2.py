"""MobileNetV2 in plain PyTorch: torchvision's parameter names and ImageNet weights, checked, and
LoRA on all its convolutions, depthwise ones included."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit.models import mobilenet_v2
from lorakit.models.mobilenet_v2 import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MobileNetV2,
    imagenet_mobilenet_v2,
)
from tests.conftest import randomize_adapters


@pytest.fixture(scope="module")
def imagenet():
    return imagenet_mobilenet_v2()


def _imagenet_input(image) -> torch.Tensor:
    """torchvision's evaluation transform: shorter side to 256, centre 224 crop, normalised."""
    x = torch.tensor(image).permute(2, 0, 1).float().div(255)[None]  # (1, 3, H, W)
    scale = 256 / min(x.shape[-2:])
    x = F.interpolate(x, size=[round(s * scale) for s in x.shape[-2:]], mode="bilinear", antialias=True)
    top, left = (x.shape[-2] - 224) // 2, (x.shape[-1] - 224) // 2
    x = x[..., top:top + 224, left:left + 224]
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def test_the_architecture_is_torchvisions_and_its_imagenet_weights_classify_real_photos(imagenet):
    from skimage import data

    convs = [m for m in imagenet.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 52 and sum(c.groups == c.in_channels > 1 for c in convs) == 17  # depthwise
    assert sum(p.numel() for p in imagenet.parameters()) == 3_504_872
    with torch.no_grad():
        cat = imagenet(_imagenet_input(data.chelsea())).softmax(-1)
        coffee = imagenet(_imagenet_input(data.coffee())).softmax(-1)
    assert cat.argmax() == 285 and cat.max() > 0.5  # ImageNet's "Egyptian cat"
    assert coffee.argmax() == 967 and coffee.max() > 0.9  # "espresso"


def test_a_weights_file_that_is_not_torchvisions_is_refused(monkeypatch):
    monkeypatch.setattr(mobilenet_v2, "WEIGHTS_SHA256", "0" * 64)
    with pytest.raises(mobilenet_v2.WeightsError, match="is not torchvision's mobilenet_v2"):
        imagenet_mobilenet_v2()


def test_lora_on_every_convolution_merges_into_a_plain_mobilenet_v2(imagenet, tmp_path):
    """Depthwise convolutions included: the merged state dict loads into a fresh MobileNetV2 with
    strict=True and computes what the adapted model did."""
    model = copy.deepcopy(imagenet)
    model.classifier[1] = nn.Linear(1280, 10)
    base_state = copy.deepcopy(model.state_dict())
    targets = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=targets, modules_to_save=["classifier"]))
    randomize_adapters(model, std=0.05)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = model(x)
        lorakit.save_adapter(model, tmp_path)
        plain = MobileNetV2(num_classes=10).eval()
        plain.load_state_dict(lorakit.merge_adapter_into_state_dict(base_state, tmp_path), strict=True)
        torch.testing.assert_close(plain(x), adapted, rtol=1e-4, atol=1e-4)
        fresh = MobileNetV2(num_classes=10).eval()
        fresh.load_state_dict(base_state)
        torch.testing.assert_close(lorakit.load_adapter(fresh, tmp_path)(x), adapted, rtol=1e-5, atol=1e-5)
