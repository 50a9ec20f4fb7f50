"""Merging a LoRA layer's adapters into its weight (zero added latency) and taking them out again.

The merged weight is W + the sum of the merged adapters' updates, added in float32 (float64
for float64 weights) and rounded once to the weight's dtype, however many adapters and merge
calls. A bf16/fp16 weight keeps its unmerged self beside it while merged (one copy of the
merged layers' weights): rounding to 8 bits of mantissa is not invertible, so subtracting the
update again would not give the original back, and every merge/unmerge cycle (each
``disable_adapters`` block on a merged model) would drift. Unmerging puts that copy back, bit
for bit. A float32 weight keeps no copy; its unmerge subtracts, within a float32 rounding.
DoRA's change depends on W itself, so each merged adapter's change is taken against the unmerged W
(core/layers/dora.py), and a layer holding a DoRA adapter keeps its unmerged weight too.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from lorakit.core.layers.adapter import LoraAdapter
from lorakit.core.layers.dora import dora_weight_change
from lorakit.errors import MergeError


class Merging:
    """The merge half of LoraLayer: needs ``weight``, ``lora``, ``active_adapters``, ``merged_adapters``,
    ``weight_is_transposed`` and ``_delta_weight`` from it."""

    def _merge_dtype(self) -> torch.dtype:
        return torch.promote_types(self.weight.dtype, torch.float32)

    def _keeps_unmerged_weight(self) -> bool:
        # DoRA's change depends on the unmerged W, so a layer with a DoRA adapter keeps it too.
        dora = any(adapter.magnitude is not None for adapter in self.lora.values())
        return dora or self.weight.dtype in (torch.float16, torch.bfloat16)

    def _weight_change(self, adapter: LoraAdapter, unmerged: torch.Tensor) -> torch.Tensor:
        """What merging ``adapter`` adds to the ``unmerged`` weight, in the merge dtype."""
        delta = self._delta_weight(adapter).to(self._merge_dtype())
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

    def _to_merge(self, names: Iterable[str] | None) -> list[str]:
        names = self.active_adapters if names is None else tuple(names)
        return [n for n in names if n in self.lora and n not in self.merged_adapters]
