"""LoRA on transformers' Conv1D (GPT-2 and kin): a linear map whose weight is stored (in, out).

Imported only when a model holds such a layer, so the core needs no transformers.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D as HFConv1D

from lorakit.core.layers.adapter import LoraAdapter, share_base_parameters
from lorakit.core.layers.base import LoraLayer
from lorakit.core.layers.linear import WeightMerging, linear_adapter_update


class Conv1D(LoraLayer, WeightMerging, HFConv1D):
    """transformers' Conv1D with LoRA adapters; A is (r, in) and B (out, r), as for nn.Linear."""

    is_linear = True
    linear_adapter = True
    fan_in_fan_out = True
    weight_is_transposed = True  # (in, out)
    supports_dora = True
    supports_svd_init = True

    def __init__(self, nf: int, nx: int) -> None:
        HFConv1D.__init__(self, nf, nx)
        self._setup_lora()

    @classmethod
    def from_base(cls, base: HFConv1D) -> Conv1D:
        with torch.device("meta"):  # skip allocating and initialising a weight we replace
            layer = cls(base.nf, base.weight.shape[0])
        return share_base_parameters(base, layer)

    @classmethod
    def adapter_shapes(cls, module: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (r, module.weight.shape[0]), (module.nf, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._add_adapters(HFConv1D.forward(self, x), x)

    def adapter_update(self, x: torch.Tensor, adapter: LoraAdapter) -> torch.Tensor:
        return linear_adapter_update(x, adapter)

    def weight_output(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight

    def plain_module(self) -> HFConv1D:
        with torch.device("meta"):
            plain = HFConv1D(self.nf, self.weight.shape[0])
        return share_base_parameters(self, plain)
