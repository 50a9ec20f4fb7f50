"""QA-LoRA on a group-wise quantized Linear (Xu et al., 2023): the adapter sees the input summed
over each quantization group, so A is (r, in / g) and B (out, r):

    y = W~ x + s * B A pool(x),   pool(x)_l = sum of x over group l

B A pool(x) is the product of x with a weight update that is constant over every group of g
inputs: s * (B A)_{j,l} for each input i of group l. Adding it to W~ = scale * q + min only shifts
each group's min, min'_{j,l} = min_{j,l} + s * (B A)_{j,l}: codes and scales stay as they are, the
merged layer is still N-bit and computes what the trained one did, up to rounding min' to its dtype.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lorakit.core.layers.adapter import LoraAdapter, lora_delta
from lorakit.core.layers.base import LoraLayer
from lorakit.core.layers.linear import linear_adapter_update
from lorakit.errors import MergeError
from lorakit.quant.groupwise import QuantizedWeight
from lorakit.quant.linear import QuantLinear


class QALoraLinear(LoraLayer, QuantLinear):
    is_linear = True

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        QuantLinear.__init__(self, weight, bias)
        self._setup_lora()
        self._unmerged_mins: torch.Tensor | None = None  # the mins before the first merge: unmerge restores them

    @classmethod
    def from_base(cls, base: QuantLinear) -> QALoraLinear:
        """A bare QA-LoRA layer over ``base``'s own codes, scales, mins and bias (nothing copied)."""
        layer = cls(base.quantized)
        layer.bias = base.bias
        layer.use_kernel = base.use_kernel
        layer.train(base.training)
        return layer

    @classmethod
    def adapter_shapes(cls, module: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (r, module.in_features // module.group_size), (module.out_features, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._add_adapters(QuantLinear.forward(self, x), x)

    def _adapter_placement(self) -> tuple[torch.device, torch.dtype]:
        return self.scales.device, torch.float32

    def adapter_output(self, result: torch.Tensor, x: torch.Tensor, adapter: LoraAdapter) -> torch.Tensor:
        pooled = x.unflatten(-1, (-1, self.group_size)).sum(dim=-1)  # (..., in / g)
        return result + linear_adapter_update(adapter.dropout(pooled), adapter)

    def _group_delta(self, adapter: LoraAdapter) -> torch.Tensor:
        """(out, in / g): the update's value on each group, s * B @ A in float32."""
        return lora_delta(adapter.lora_A, adapter.lora_B, adapter.scaling)

    def _delta_weight(self, adapter: LoraAdapter) -> torch.Tensor:
        """The dense (out, in) update, each group's value repeated over its g inputs."""
        return self._group_delta(adapter).repeat_interleave(self.group_size, dim=1)

    def plain_module(self) -> QuantLinear:
        plain = QuantLinear(self.quantized)
        plain.bias = self.bias
        plain.use_kernel = self.use_kernel
        return plain

    # --- merge: shift the mins; codes and scales never change -----------------------------

    @torch.no_grad()
    def merged_weight_is_finite(self, names: Iterable[str] | None = None) -> bool:
        return bool(torch.isfinite(self._shifted_mins(self._to_merge(names))).all())

    @torch.no_grad()
    def merge(self, names: Iterable[str] | None = None) -> None:
        to_merge = self._to_merge(names)
        if not to_merge:
            return
        shifted = self._shifted_mins(to_merge)
        if not torch.isfinite(shifted).all():
            raise MergeError("merging would make a group's min NaN or infinite")
        if self._unmerged_mins is None:
            self._unmerged_mins = self.mins.clone()
        self.mins.copy_(shifted)
        self.merged_adapters += to_merge

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._unmerged_mins is not None:
            self.mins.copy_(self._unmerged_mins)
        self._unmerged_mins = None
        self.merged_adapters.clear()

    def _shifted_mins(self, names: list[str]) -> torch.Tensor:
        """The mins with ``names`` merged on top of what is merged now, from the unmerged mins: one
        rounding in all, however many merge calls."""
        if self._unmerged_mins is not None:
            mins, names = self._unmerged_mins.float(), self.merged_adapters + names
        else:
            mins = self.mins.float()
        for name in names:
            mins = mins + self._group_delta(self.lora[name])
        return mins.to(self.mins.dtype)
