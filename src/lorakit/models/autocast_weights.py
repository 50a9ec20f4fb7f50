"""Frozen Linear weights stored in autocast's dtype while a model computes under autocast.

Under ``torch.autocast`` a Linear's float32 weight is cast to bfloat16 (or float16) on every call,
and autocast keeps a cast only for weights that take gradients: a frozen base is cast again in every
forward. In a LoRA training step of SmolLM2 under bfloat16 on a CPU those casts took about 5% of
the step (torch.profiler's ``aten::copy_``: 167 ms before, 94 ms after, of ~1.4 s). Held in that
dtype for the while, the weights reach the products as the very operands autocast would have made
(both round to nearest even), so every result is bit for bit the same and the casts are gone. The
copies sit beside the float32 originals (half their bytes again), as autocast's casts did at a
step's peak.

Only the weights of modules that use them in ``F.linear`` alone are held: exactly ``nn.Linear``, and
lorakit's LoRA Linear without DoRA (DoRA takes the norm of the weight itself, outside autocast's
products); not weights that train, nor weights that are not float32 (autocast casts float32 alone).
The copy is the module's own: an output head tied to the embedding gets a half-precision weight of
its own while the embedding keeps the float32 one, whose lookup is no autocast op. Nothing may
write the weights while they are held (no merge): leaving puts the originals back and would drop
such a write.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from lorakit.core.layers.linear import Linear as LoraLinear


def active_autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast multiplies in on ``device`` now, or None outside autocast."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


@contextlib.contextmanager
def frozen_weights_in(model: nn.Module, dtype: torch.dtype | None) -> Iterator[int]:
    """Within: every frozen float32 weight and bias that only feeds ``F.linear`` is stored in ``dtype``
    (a half-precision autocast dtype; None or float32: nothing changes). Yields the bytes those copies
    take beside the float32 originals, which come back on leaving."""
    if dtype is None or dtype == torch.float32:
        yield 0
        return
    originals: list[tuple[nn.Module, str, nn.Parameter]] = []
    for module in model.modules():
        if not _feeds_only_linear(module):
            continue
        for name in ("weight", "bias"):
            param = module._parameters.get(name)
            if param is None or param.requires_grad or param.dtype != torch.float32:
                continue
            originals.append((module, name, param))
            module._parameters[name] = nn.Parameter(param.detach().to(dtype), requires_grad=False)
    try:
        yield sum(param.numel() * dtype.itemsize for _, _, param in originals)
    finally:
        for module, name, param in originals:
            module._parameters[name] = param


def _feeds_only_linear(module: nn.Module) -> bool:
    if type(module) is nn.Linear:
        return True
    return type(module) is LoraLinear and all(adapter.magnitude is None for adapter in module.lora.values())
