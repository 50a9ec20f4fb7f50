"""LoRA layer families and the lookup from a base module to the family that adapts it."""

from __future__ import annotations

import sys

from torch import nn

from lorakit.core.layers.adapter import LoraAdapter
from lorakit.core.layers.base import LoraLayer
from lorakit.core.layers.conv import Conv1d, Conv2d
from lorakit.core.layers.embedding import Embedding
from lorakit.core.layers.linear import Linear
from lorakit.core.layers.modules_to_save import ModulesToSave
from lorakit.core.layers.qalora import QALoraLinear
from lorakit.quant.linear import QuantLinear

_FAMILIES: dict[type, type] = {nn.Linear: Linear, nn.Conv1d: Conv1d, nn.Conv2d: Conv2d, nn.Embedding: Embedding,
                               QuantLinear: QALoraLinear}

SUPPORTED_TYPES = "nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, transformers' Conv1D and lorakit's QuantLinear"


def transformers_conv1d() -> type | None:
    """transformers' Conv1D class if transformers is loaded (a model can't hold one otherwise)."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def lora_class_for(module: nn.Module) -> type | None:
    """The LoRA layer class for ``module``, or None if lorakit cannot adapt it.

    Types match exactly: a subclass may change forward (a scaled embedding, a quantized linear),
    and adapting it as its parent would silently compute something else.
    """
    if isinstance(module, LoraLayer):
        return type(module)
    family = _FAMILIES.get(type(module))
    if family is not None:
        return family
    if type(module) is transformers_conv1d():
        from lorakit.core.layers.gpt2_conv1d import Conv1D

        return Conv1D
    return None


def is_linear(module: nn.Module) -> bool:
    """What "all-linear" targets: nn.Linear and transformers' Conv1D, bare or already adapted."""
    cls = lora_class_for(module)
    return cls is not None and cls.is_linear


__all__ = [
    "SUPPORTED_TYPES",
    "Conv1d",
    "Conv2d",
    "Embedding",
    "Linear",
    "LoraAdapter",
    "LoraLayer",
    "ModulesToSave",
    "QALoraLinear",
    "is_linear",
    "lora_class_for",
    "transformers_conv1d",
]
