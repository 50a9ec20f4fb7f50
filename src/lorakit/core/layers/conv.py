"""LoRA on nn.Conv1d and nn.Conv2d, grouped and depthwise ones included.

The update is low-rank in the kernel seen as a matrix, (out, in / groups * k...):
B @ A with A (r, in / groups, k...) and B (out, r, 1...). For an ordinary convolution A is itself
a convolution, with the base layer's kernel, stride, padding and dilation, into r channels, and B
a pointwise (1x1) convolution from r channels to the outputs, so forward never forms B @ A.
A grouped convolution's inputs do not reach every output, so there the update is formed (it is as
small as the kernel: 96 x 9 numbers for a depthwise 3x3 over 96 channels) and run as one more
convolution with the base's groups. PEFT instead gives a grouped layer a dense A over all inputs
and a grouped B, which needs r to be a multiple of groups (r >= 96 for that depthwise layer) and
cannot be merged; lorakit's update merges exactly, and its files differ from PEFT's for such layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.config import LoraConfig
from lorakit.core.layers.adapter import (
    LoraAdapter,
    delta_in_weight_layout,
    share_base_parameters,
)
from lorakit.core.layers.base import LoraLayer
from lorakit.core.layers.linear import WeightMerging


class _ConvLora(LoraLayer, WeightMerging):
    """What Conv1d and Conv2d share; each names its torch class and its pointwise convolution."""

    supports_dora = True

    _torch_conv: type  # nn.Conv1d or nn.Conv2d
    _pointwise: staticmethod  # F.conv1d or F.conv2d, for B

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: int | str | tuple[int, ...] = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        adapter_name: str = "default",
        config: LoraConfig | None = None,
    ) -> None:
        self._torch_conv.__init__(
            self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype
        )
        self._setup_with_adapter(r, alpha, dropout, adapter_name, config)

    @classmethod
    def from_base(cls, base: nn.Conv1d | nn.Conv2d) -> _ConvLora:
        with torch.device("meta"):  # skip allocating and initialising a weight we replace
            layer = cls(**conv_kwargs(base), r=0)
        return share_base_parameters(base, layer)

    @classmethod
    def adapter_shapes(cls, module: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        ones = (1,) * len(module.kernel_size)
        return (r, module.in_channels // module.groups, *module.kernel_size), (module.out_channels, r, *ones)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._add_adapters(self._conv_forward(x, self.weight, self.bias), x)

    def adapter_update(self, x: torch.Tensor, adapter: LoraAdapter) -> torch.Tensor:
        if self.groups > 1:  # the update, (out, in / groups, k...), as a convolution with the base's groups
            delta = delta_in_weight_layout(adapter.lora_A, adapter.lora_B, adapter.scaling, transposed=False)
            return self._conv_forward(x, delta.to(x.dtype), None)
        a = adapter.lora_A.to(x.dtype)  # (r, in, k...)
        b = adapter.lora_B.to(x.dtype)  # (out, r, 1...)
        # The base layer's own _conv_forward applies its stride, padding (mode), and dilation to A.
        h = self._conv_forward(x, a, None) * adapter.scaling  # (N, r, L...)
        return self._pointwise(h, b)  # (N, out, L...)

    def weight_output(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight, None)

    def per_output_channel(self, values: torch.Tensor) -> torch.Tensor:
        return values.view(1, -1, *(1,) * len(self.kernel_size))  # (1, out, 1...) over (N, out, L...)

    def plain_module(self) -> nn.Module:
        with torch.device("meta"):
            plain = self._torch_conv(**conv_kwargs(self))
        return share_base_parameters(self, plain)


def conv_kwargs(conv: nn.Conv1d | nn.Conv2d) -> dict:
    """The constructor arguments that rebuild ``conv``'s shape and behaviour."""
    return {
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": conv.kernel_size,
        "stride": conv.stride,
        "padding": conv.padding,
        "dilation": conv.dilation,
        "groups": conv.groups,
        "bias": conv.bias is not None,
        "padding_mode": conv.padding_mode,
    }


class Conv2d(_ConvLora, nn.Conv2d):
    """nn.Conv2d with LoRA adapters; a drop-in like ``lorakit.Conv2d(3, 16, 3, r=4)``."""

    _torch_conv = nn.Conv2d
    _pointwise = staticmethod(F.conv2d)


class Conv1d(_ConvLora, nn.Conv1d):
    """nn.Conv1d with LoRA adapters; a drop-in like ``lorakit.Conv1d(8, 16, 3, r=4)``."""

    _torch_conv = nn.Conv1d
    _pointwise = staticmethod(F.conv1d)
