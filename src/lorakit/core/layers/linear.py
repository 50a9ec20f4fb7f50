"""LoRA on nn.Linear, forward and merge in one file.

Forward: y = x W^T + b + s * (dropout(x) A^T) B^T, never forming B @ A.
Merge:   W <- W + s * B @ A, added in float32 and rounded once to W's dtype; unmerge takes it out.

The merge rules (``WeightMerging``) are written once, here, and every family whose weight takes the
update as it is (convolutions, embeddings, GPT-2's Conv1D) mixes them in: their weights differ only
in layout, which each family's ``_delta_weight`` gives. A bf16/fp16 weight keeps its unmerged self
beside it while merged (one copy of the merged layers' weights): rounding to 8 bits of mantissa is
not invertible, so subtracting the update again would not give the original back, and every
merge/unmerge cycle (each ``disable_adapters`` block on a merged model) would drift. Unmerging puts
that copy back, bit for bit; a float32 weight keeps no copy and subtracts, within a float32
rounding. DoRA's change depends on W itself (core/layers/dora.py), so each merged DoRA adapter's
change is taken against the unmerged W, which such a layer keeps too.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.config import LoraConfig
from lorakit.core.layers.adapter import LoraAdapter, share_base_parameters
from lorakit.core.layers.base import LoraLayer
from lorakit.core.layers.dora import dora_weight_change
from lorakit.errors import MergeError


def linear_adapter_update(x: torch.Tensor, adapter: LoraAdapter) -> torch.Tensor:
    """s * B(A(x)) for a linear map, in x's dtype; shared by nn.Linear, GPT-2's Conv1D and QA-LoRA.
    Computed in the adapter's dtype (float32 over a half-precision base, as PEFT does): more exact,
    and on a CPU these thin bfloat16 matmuls ran at half the speed of float32 ones. Under autocast the
    products run in its dtype whatever x's is (float64 aside, which autocast leaves), so x is not
    widened first: that copy, and its own copy back in backward, would change no value."""
    autocast = torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64
    widened = x if autocast else x.to(adapter.lora_A.dtype)
    h = F.linear(widened, adapter.lora_A) * adapter.scaling  # (..., r): scale the narrow tensor
    return F.linear(h, adapter.lora_B).to(x.dtype)  # (..., out)


class WeightMerging:
    """Merging adapters into a LoRA layer's weight and out again: mixed into each family beside
    LoraLayer, whose ``weight``, ``lora``, ``merged_adapters``, ``weight_is_transposed``,
    ``_delta_weight`` and ``_to_merge`` it uses."""

    def _merge_dtype(self) -> torch.dtype:
        return torch.promote_types(self.weight.dtype, torch.float32)

    def _keeps_unmerged_weight(self) -> bool:
        dora = any(adapter.magnitude is not None for adapter in self.lora.values())
        return dora or self.weight.dtype in (torch.float16, torch.bfloat16)

    def _weight_change(self, adapter: LoraAdapter, unmerged: torch.Tensor) -> torch.Tensor:
        """What merging ``adapter`` adds to the ``unmerged`` weight, in the merge dtype."""
        delta = self._delta_weight(adapter).to(self._merge_dtype())  # s * B @ A, laid out like the weight
        if adapter.magnitude is None:
            return delta
        return dora_weight_change(unmerged, delta, adapter.magnitude, self.weight_is_transposed)

    def _merged_weight(self, names: list[str]) -> torch.Tensor:
        """The weight with ``names`` merged on top of what is merged now, from the unmerged weight
        when one is kept: one rounding in all."""
        kept = getattr(self, "lora_unmerged_weight", None)
        base, names = (kept, self.merged_adapters + names) if kept is not None else (self.weight, names)
        if kept is None and self.merged_adapters and any(self.lora[n].magnitude is not None for n in names):
            raise MergeError("a DoRA adapter merges against the unmerged weight; unmerge before merging it")
        base = base.to(self._merge_dtype())
        total = None
        for name in names:
            change = self._weight_change(self.lora[name], base)
            total = change if total is None else total + change
        return base if total is None else base + total

    @torch.no_grad()
    def merged_weight_is_finite(self, names: Iterable[str] | None = None) -> bool:
        """Whether merging ``names`` (default: the active adapters) would give a finite weight."""
        return bool(torch.isfinite(self._merged_weight(self._to_merge(names)).to(self.weight.dtype)).all())

    @torch.no_grad()
    def merge(self, names: Iterable[str] | None = None) -> None:
        """Add the active adapters (or ``names``) into the weight; already merged ones are skipped."""
        names = self._to_merge(names)
        if not names:
            return
        if not self.merged_adapters and self._keeps_unmerged_weight():
            # A non-persistent buffer: it follows .to(), and state_dict() never holds it.
            self.register_buffer("lora_unmerged_weight", self.weight.detach().clone(), persistent=False)
        self.weight.copy_(self._merged_weight(names))
        self.merged_adapters += names

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take every merged adapter out again: the kept unmerged weight back, bit for bit, or (float32)
        the updates subtracted, last merged first."""
        kept = getattr(self, "lora_unmerged_weight", None)
        if kept is not None:
            self.weight.copy_(kept)
            del self._buffers["lora_unmerged_weight"]
            self.merged_adapters.clear()
        while self.merged_adapters:
            delta = self._delta_weight(self.lora[self.merged_adapters.pop()]).to(self._merge_dtype())
            self.weight.copy_(self.weight.to(delta.dtype) - delta)


class Linear(LoraLayer, WeightMerging, nn.Linear):
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
        return (r, module.in_features), (module.out_features, r)  # A (r, in), B (out, r)

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
