"""LoRA on nn.Linear: y = x W^T + b + s * (dropout(x) A^T) B^T."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.config import LoraConfig
from lorakit.core.layers.adapter import LoraAdapter, share_base_parameters
from lorakit.core.layers.base import LoraLayer


def linear_adapter_update(x: torch.Tensor, adapter: LoraAdapter) -> torch.Tensor:
    """s * B(A(x)) for a linear map, in x's dtype; shared by nn.Linear, GPT-2's Conv1D and QA-LoRA.
    Computed in the adapter's dtype (float32 over a half-precision base, as PEFT does): more exact,
    and on a CPU these thin bfloat16 matmuls ran at half the speed of float32 ones."""
    h = F.linear(x.to(adapter.lora_A.dtype), adapter.lora_A) * adapter.scaling  # (..., r): scale the narrow tensor
    return F.linear(h, adapter.lora_B).to(x.dtype)  # (..., out)


class Linear(LoraLayer, nn.Linear):
    """nn.Linear with LoRA adapters, and a drop-in for loralib's ``lora.Linear(in, out, r=8)``."""

    is_linear = True
    linear_adapter = True
    supports_dora = True
    supports_svd_init = True

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
        layer = _bare(cls, base.in_features, base.out_features)
        layer._setup_lora()
        return share_base_parameters(base, layer)

    @classmethod
    def adapter_shapes(cls, module: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (r, module.in_features), (module.out_features, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._add_adapters(F.linear(x, self.weight, self.bias), x)

    def adapter_update(self, x: torch.Tensor, adapter: LoraAdapter) -> torch.Tensor:
        return linear_adapter_update(x, adapter)

    def weight_output(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def plain_module(self) -> nn.Linear:
        return share_base_parameters(self, _bare(nn.Linear, self.in_features, self.out_features))


def _bare(cls: type[nn.Linear], in_features: int, out_features: int) -> nn.Linear:
    """``cls`` (nn.Linear or a subclass) with no weight yet, without nn.Linear.__init__: its weight
    initialisation would be thrown away, and even on the meta device it runs a Python
    decomposition (~90 us a layer: half the time of loading an adapter onto a bare model)."""
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    module.in_features, module.out_features = in_features, out_features
    module.register_parameter("weight", None)
    module.register_parameter("bias", None)  # share_base_parameters takes the base's (or its None)
    return module
