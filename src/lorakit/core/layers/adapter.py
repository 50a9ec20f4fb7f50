"""One adapter's matrices, and the update they add: the LoRA maths (Hu et al. 2021).

W' = W + s * B @ A, with A (r, in[, k...]) and B (out, r[, 1...]) and s = alpha / r (alpha / sqrt(r)
with rsLoRA). Forward never forms B @ A (each family computes s * B(A(dropout(x))) from the narrow
side); only merging forms the update, here, and lays it out as the weight it goes into.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.core.config import LoraConfig
from lorakit.core.layers.dropout import RowKeyedDropout

# Every adapter without dropout shares this one: it holds nothing, and making one per adapter cost a
# tenth of an adapter load.
_NO_DROPOUT = nn.Identity()


class LoraAdapter(nn.Module):
    """One adapter's trainable pair on one layer: A (r, in...) and B (out, r...)."""

    def __init__(
        self,
        a_shape: tuple[int, ...],
        b_shape: tuple[int, ...],
        scaling: float,
        dropout: float,
        config: LoraConfig,
        device: torch.device,
        dtype: torch.dtype,
        zeroed: bool = True,
    ) -> None:
        super().__init__()
        # zeroed=False leaves the memory as allocated, for a caller that fills every element (a load).
        make = torch.zeros if zeroed else torch.empty
        # Written straight into the module's tables: nn.Module.__setattr__ looks each name up in all
        # of them first, and loading an adapter builds one LoraAdapter per layer (210 for SmolLM2).
        # DoRA's magnitude vector m (core/layers/dora.py) is set by the layer for a DoRA adapter.
        self._parameters.update(lora_A=nn.Parameter(make(a_shape, device=device, dtype=dtype)),
                                lora_B=nn.Parameter(make(b_shape, device=device, dtype=dtype)), magnitude=None)
        self._modules["dropout"] = RowKeyedDropout(dropout) if dropout > 0 else _NO_DROPOUT
        self.__dict__.update(
            dora_factor_cache=None,  # DoRA's m / ||W + sBA|| as last computed without autograd: (inputs' versions, factor)
            scaling=scaling,
            config=config,  # the LoraConfig it came from: save_adapter writes it back out
        )

    def train(self, mode: bool = True) -> LoraAdapter:
        self.dora_factor_cache = None  # edits through .data bypass the version counters; train()/eval() clear
        return super().train(mode)

    @property
    def r(self) -> int:
        return self.lora_A.shape[0]

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}"


def lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """s * B @ A in float32 (or wider) as (out, in * k...), for A (r, in, k...) and B (out, r, 1...).

    The one place the update is formed; only merging needs it (forward never forms it). Each
    family lays it out like its weight: a view for convolutions, a transpose for embeddings and
    GPT-2's Conv1D.
    """
    dtype = torch.promote_types(lora_A.dtype, torch.float32)
    return (lora_B.to(dtype).flatten(1) @ lora_A.to(dtype).flatten(1)) * scaling


def delta_in_weight_layout(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                           transposed: bool) -> torch.Tensor:
    """The update laid out as the weight it merges into: (out, in, k...) for a convolution (A has
    kernel dimensions), (in, out) for a weight stored transposed, else (out, in). The one rule for
    layout, used by the model merge (each layer) and the state-dict merge (each file entry) alike."""
    delta = lora_delta(lora_A, lora_B, scaling)
    if lora_A.dim() > 2:
        return delta.view(lora_B.shape[0], *lora_A.shape[1:])
    return delta.T if transposed else delta


def share_base_parameters(source: nn.Module, target: nn.Module) -> nn.Module:
    """Make ``target`` (built on the meta device) use ``source``'s weight and bias Parameters."""
    target.weight = source.weight
    if "bias" in target._parameters:
        target.bias = source.bias
    target.train(source.training)
    return target
