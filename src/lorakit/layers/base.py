"""The adapter (A, B, scaling, dropout) and the bookkeeping every LoRA layer family shares.

A LoRA layer *is* its base layer type (``lorakit.Linear`` subclasses ``nn.Linear``) holding the
same weight and bias Parameters, so ``q_proj.weight`` keeps its name and ``isinstance`` checks
in model code still hold. Adapters live beside the weight in ``layer.lora[<adapter name>]``.

A family (linear, conv, embedding) supplies four things:
- ``adapter_shapes(module, r)``: shapes of A and B for a base module of that family;
- ``_adapter_output(result, x, adapter)``: ``result + s * B(A(dropout(x)))``, never forming B @ A;
- ``weight_is_transposed``: whether its weight is laid out as the transpose of B @ A, which is all
  merging needs to know (``delta_in_weight_layout``);
- ``plain_module()``: the base module type again, sharing the same Parameters.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.config import LoraConfig, lora_scaling
from lorakit.errors import MergeError
from lorakit.layers.dropout import RowKeyedDropout


@dataclass(frozen=True)
class RowSegment:
    """Rows start:stop of a batch (dim 0) use adapter ``adapter``; None is the base model alone."""

    adapter: str | None
    start: int
    stop: int


class RowPlan:
    """Which rows of the batch use which adapter (segments cover rows 0..B in order).

    By default each LoRA layer adds each segment's adapter with one pair of matmuls on that
    segment's rows. ``stacked``: linear layers instead stack the segments' adapters and do every
    segment's pair with two batched matmuls: four operations per layer whatever the number of
    adapters, where the loop costs four per segment. The stacks are built on a layer's first use
    and kept in ``stacks``, so they are built once for as long as the batch's composition lasts
    (the engine's decoding steps), and a plan made when the rows change takes over ``earlier``'s
    stacks for the adapters still there. That pays when the plan serves many passes of few tokens
    per row; for a single pass (a prompt) the copy of every adapter it costs buys nothing.
    """

    def __init__(self, segments: tuple[RowSegment, ...], stacked: bool = False, earlier: RowPlan | None = None) -> None:
        self.segments = segments
        self.stacked = stacked and len(segments) > 1
        self.rows = segments[-1].stop if segments else 0
        self.stacks: dict[int, object] = {}  # id(layer) -> its stacked matrices and row layout (None: untargeted)
        # The plan this one follows in a running batch: a layer takes its stacks over where the
        # adapters are the same (each entry leaves as its layer builds, so memory is not doubled).
        self.earlier: dict[int, object] = earlier.stacks if earlier is not None and self.stacked else {}


# The row plan of the forward pass in progress (lorakit.mixed_batch sets it), read by every layer;
# None outside a mixed batch: the active adapters apply to all rows.
ROW_PLAN: ContextVar[RowPlan | None] = ContextVar("lorakit_row_plan", default=None)


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
    ) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.zeros(a_shape, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(b_shape, device=device, dtype=dtype))
        self.dropout = RowKeyedDropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scaling
        self.config = config  # the LoraConfig it came from: save_adapter writes it back out

    @property
    def r(self) -> int:
        return self.lora_A.shape[0]

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}"


class LoraLayer:
    """Mixin for LoRA layers; the concrete classes also inherit their torch base layer."""

    # Whether the config's dropout applies: PEFT and loralib apply none to embedding adapters.
    uses_dropout = True
    # Whether target_modules="all-linear" picks this family (nn.Linear and GPT-2's Conv1D).
    is_linear = False
    # Whether the weight is stored (in, out), the transpose of B @ A (PEFT's name for it).
    fan_in_fan_out = False
    # Whether the weight is laid out as the transpose of B @ A: GPT-2's Conv1D (fan_in_fan_out) and
    # embeddings ((vocab, dim), where B @ A is (dim, vocab)).
    weight_is_transposed = False

    lora: nn.ModuleDict
    active_adapters: tuple[str, ...]
    merged_adapters: list[str]
    lora_disabled: bool

    def _setup_lora(self) -> None:
        self.lora = nn.ModuleDict()
        self.active_adapters = ()  # adapters added, in this order, to the base output
        self.merged_adapters = []  # adapters whose update is currently inside self.weight
        self.lora_disabled = False  # set by lorakit.disable_adapters(model)

    def _setup_with_adapter(
        self, r: int, alpha: float, dropout: float, adapter_name: str, config: LoraConfig | None
    ) -> None:
        """Constructor tail of every family: drop-in use (``lorakit.Linear(in, out, r=8)``) gets one
        active adapter and a frozen weight, as loralib does; r=0 builds the layer bare."""
        self._setup_lora()
        if config is None:
            if r == 0:
                return
            config = LoraConfig(r=r, alpha=alpha, dropout=dropout, target_modules=None)
        self.add_adapter(adapter_name, config)
        self.active_adapters = (adapter_name,)
        self.weight.requires_grad_(False)

    # --- family hooks ----------------------------------------------------------------------

    @classmethod
    def adapter_shapes(cls, module: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    def _adapter_output(self, result: torch.Tensor, x: torch.Tensor, adapter: LoraAdapter) -> torch.Tensor:
        raise NotImplementedError

    def _delta_weight(self, adapter: LoraAdapter) -> torch.Tensor:
        """s * B @ A in float32, laid out like ``self.weight``."""
        return delta_in_weight_layout(adapter.lora_A, adapter.lora_B, adapter.scaling, self.weight_is_transposed)

    def plain_module(self) -> nn.Module:
        raise NotImplementedError

    def _adapter_placement(self) -> tuple[torch.device, torch.dtype]:
        """Where new adapters live: the weight's device, float32 even over a half-precision base
        (float64 stays float64)."""
        return self.weight.device, torch.promote_types(self.weight.dtype, torch.float32)

    def _init_adapter(self, adapter: LoraAdapter, init: str) -> None:
        """Start from an unchanged model: B = 0, A random (loralib's and PEFT's choice)."""
        if init == "gaussian":
            nn.init.normal_(adapter.lora_A, std=1 / adapter.r)
        else:
            nn.init.kaiming_uniform_(adapter.lora_A, a=math.sqrt(5))
        nn.init.zeros_(adapter.lora_B)

    # --- adapters --------------------------------------------------------------------------

    def add_adapter(
        self, name: str, config: LoraConfig, r: int | None = None, scaling: float | None = None, init: bool = True
    ) -> LoraAdapter:
        """Add adapter ``name`` (not yet active). r and scaling default to the config's."""
        if name in self.lora:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        r = config.r if r is None else r
        scaling = lora_scaling(config.alpha, r, config.use_rslora) if scaling is None else scaling
        a_shape, b_shape = self.adapter_shapes(self, r)
        device, dtype = self._adapter_placement()
        adapter = LoraAdapter(a_shape, b_shape, scaling, config.dropout if self.uses_dropout else 0.0, config, device, dtype)
        if init:
            with torch.no_grad():
                self._init_adapter(adapter, config.init)
        self.lora[name] = adapter
        return adapter

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise MergeError(f"adapter {name!r} is merged into the weights; unmerge before deleting it")
        del self.lora[name]
        self.active_adapters = tuple(n for n in self.active_adapters if n != name)

    def _add_adapters(self, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The base output plus every active adapter not already merged into the weight; in a mixed
        batch, each segment of rows plus its own adapter."""
        if self.lora_disabled:
            return result
        plan = ROW_PLAN.get()
        if plan is not None:
            return self._add_row_adapters(result, x, plan)
        for name in self.active_adapters:
            if name not in self.merged_adapters:
                result = self._adapter_output(result, x, self.lora[name])
        return result

    def _add_row_adapters(self, result: torch.Tensor, x: torch.Tensor, plan: RowPlan) -> torch.Tensor:
        """One pair of small matmuls per segment, on that segment's rows (or one pair for all, for a
        stacked plan): the base output was computed once for the whole batch, and no adapter weight is
        copied per row. An adapter that does not target this layer leaves its rows as the base
        computed them."""
        if self.merged_adapters:
            raise MergeError(f"adapters {self.merged_adapters} are merged into the weights, so every row would "
                             "get them; unmerge before running rows with different adapters")
        segments = plan.segments
        if len(segments) == 1:  # one adapter for the whole batch: no slicing, no concatenation
            name = segments[0].adapter
            return result if name not in self.lora else self._adapter_output(result, x, self.lora[name])
        if plan.stacked and not self.training:
            stacked = self._stacked_rows_output(result, x, plan)
            if stacked is not None:
                return stacked
        pieces = []
        for segment in segments:
            rows = slice(segment.start, segment.stop)
            if segment.adapter in self.lora:
                pieces.append(self._adapter_output(result[rows], x[rows], self.lora[segment.adapter]))
            else:
                pieces.append(result[rows])
        return torch.cat(pieces)

    def _stacked_rows_output(self, result: torch.Tensor, x: torch.Tensor, plan: RowPlan) -> torch.Tensor | None:
        """A stacked plan's output, for families that have one (linear ones); None: use the loop."""
        return None

    # --- merge -----------------------------------------------------------------------------
    # The merged weight is W + the sum of the merged adapters' updates, added in float32 (float64
    # for float64 weights) and rounded once to the weight's dtype, however many adapters and merge
    # calls. A bf16/fp16 weight keeps its unmerged self beside it while merged (one copy of the
    # merged layers' weights): rounding to 8 bits of mantissa is not invertible, so subtracting the
    # update again would not give the original back, and every merge/unmerge cycle (each
    # ``disable_adapters`` block on a merged model) would drift. Unmerging puts that copy back, bit
    # for bit. A float32 weight keeps no copy; its unmerge subtracts, within a float32 rounding.

    def _merge_dtype(self) -> torch.dtype:
        return torch.promote_types(self.weight.dtype, torch.float32)

    def _keeps_unmerged_weight(self) -> bool:
        return self.weight.dtype in (torch.float16, torch.bfloat16)

    def _merged_weight(self, names: list[str]) -> torch.Tensor:
        """The weight with ``names`` merged on top of what is merged now, from the unmerged weight
        when one is kept: one rounding in all."""
        kept = getattr(self, "lora_unmerged_weight", None)
        base, names = (kept, self.merged_adapters + names) if kept is not None else (self.weight, names)
        total = None
        for name in names:
            delta = self._delta_weight(self.lora[name]).to(self._merge_dtype())
            total = delta if total is None else total + delta
        return base.to(self._merge_dtype()) if total is None else (base.to(self._merge_dtype()) + total)

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
