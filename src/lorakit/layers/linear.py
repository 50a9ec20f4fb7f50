"""LoRA on nn.Linear: y = x W^T + b + s * (dropout(x) A^T) B^T."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.config import LoraConfig
from lorakit.layers.base import (
    LoraAdapter,
    LoraLayer,
    RowPlan,
    lora_delta,
    share_base_parameters,
)


def linear_adapter_output(result: torch.Tensor, x: torch.Tensor, adapter: LoraAdapter) -> torch.Tensor:
    """result + s * B(A(dropout(x))) for a linear map; shared by nn.Linear and GPT-2's Conv1D."""
    a = adapter.lora_A.to(x.dtype)  # (r, in); a no-op unless the base runs in half precision
    b = adapter.lora_B.to(x.dtype)  # (out, r)
    h = F.linear(adapter.dropout(x), a) * adapter.scaling  # (..., r): scale the narrow tensor
    return result + F.linear(h, b)  # (..., out)


def stacked_rows_output(layer: LoraLayer, result: torch.Tensor, x: torch.Tensor, plan: RowPlan) -> torch.Tensor:
    """result + each row's own adapter, for every row at once: x (B, ..., in) times the segments'
    A matrices concatenated along the rank (R = sum of their ranks), a 0/1 mask keeping each row's
    own block, times the matching B columns (scaling folded in). Shared by nn.Linear and Conv1D."""
    if id(layer) not in plan.stacks:
        plan.stacks[id(layer)] = _stack(layer, plan)
    stack = plan.stacks[id(layer)]
    if stack is None:  # no segment's adapter targets this layer
        return result
    a, b, mask = stack  # (R, in), (out, R), (B, R)
    h = F.linear(x, a.to(x.dtype))  # (B, ..., R)
    h = h * mask.to(h.dtype).view(mask.shape[0], *[1] * (h.dim() - 2), mask.shape[1])
    return result + F.linear(h, b.to(x.dtype))  # (B, ..., out)


def _stack(layer: LoraLayer, plan: RowPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    blocks = [(s, layer.lora[s.adapter]) for s in plan.segments if s.adapter in layer.lora]
    if not blocks:
        return None
    a = torch.cat([adapter.lora_A for _, adapter in blocks])  # (R, in)
    b = torch.cat([adapter.lora_B * adapter.scaling for _, adapter in blocks], dim=1)  # (out, R)
    mask = torch.zeros(plan.rows, a.shape[0], dtype=torch.bool, device=a.device)
    offset = 0
    for segment, adapter in blocks:
        mask[segment.start:segment.stop, offset:offset + adapter.r] = True
        offset += adapter.r
    return a, b, mask


class Linear(LoraLayer, nn.Linear):
    """nn.Linear with LoRA adapters, and a drop-in for loralib's ``lora.Linear(in, out, r=8)``."""

    is_linear = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        adapter_name: str = "default",
        config: LoraConfig | None = None,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup_with_adapter(r, alpha, dropout, adapter_name, config)

    @classmethod
    def from_base(cls, base: nn.Linear) -> Linear:
        """A bare LoRA layer over ``base``'s own Parameters (nothing copied)."""
        layer = cls(base.in_features, base.out_features, r=0, bias=base.bias is not None, device="meta")
        return share_base_parameters(base, layer)

    @classmethod
    def adapter_shapes(cls, module: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (r, module.in_features), (module.out_features, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._add_adapters(F.linear(x, self.weight, self.bias), x)

    def _adapter_output(self, result: torch.Tensor, x: torch.Tensor, adapter: LoraAdapter) -> torch.Tensor:
        return linear_adapter_output(result, x, adapter)

    def _stacked_rows_output(self, result: torch.Tensor, x: torch.Tensor, plan: RowPlan) -> torch.Tensor:
        return stacked_rows_output(self, result, x, plan)

    def _delta_weight(self, adapter: LoraAdapter) -> torch.Tensor:
        return lora_delta(adapter.lora_A, adapter.lora_B, adapter.scaling)  # (out, in)

    def plain_module(self) -> nn.Linear:
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        return share_base_parameters(self, plain)
