"""The bookkeeping every LoRA layer family shares (an adapter's own maths is in adapter.py).

A LoRA layer *is* its base layer type (``lorakit.Linear`` subclasses ``nn.Linear``) holding the
same weight and bias Parameters, so ``q_proj.weight`` keeps its name and ``isinstance`` checks
in model code still hold. Adapters live beside the weight in ``layer.lora[<adapter name>]``.

A family (linear, conv, embedding) supplies four things:
- ``adapter_shapes(module, r)``: shapes of A and B for a base module of that family;
- ``adapter_update(x, adapter)``: ``s * B(A(x))``, never forming B @ A (``adapter_output`` adds it,
  over the adapter's dropout, to the base output);
- ``weight_is_transposed``: whether its weight is laid out as the transpose of B @ A, which is all
  merging needs to know (``delta_in_weight_layout``);
- ``plain_module()``: the base module type again, sharing the same Parameters;
and mixes in how it merges (linear.py's ``WeightMerging`` for a weight that takes the update as it is).
A family that supports DoRA (``supports_dora``) also gives ``weight_output(x)`` (Wx, no bias) and
``per_output_channel(values)``; PiSSA/OLoRA initialisation (``supports_svd_init``) needs a weight
that is one matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextvars import ContextVar

import torch
from torch import nn

from lorakit.core.config import LoraConfig, lora_scaling
from lorakit.core.layers.adapter import LoraAdapter, delta_in_weight_layout
from lorakit.core.layers.dora import dora_output, magnitude_shape, unit_norms
from lorakit.core.layers.svd_init import is_svd_init, svd_init
from lorakit.errors import ConfigError, MergeError

# Who decides which adapter each row of a batch gets: a callable (layer, base output, input) ->
# output, set for the duration of a forward pass by code that runs rows on different adapters
# (lorakit.rows); None: the active adapters apply to every row. The layers know nothing more of it.
AdapterRouter = Callable[["LoraLayer", torch.Tensor, torch.Tensor], torch.Tensor]
ADAPTER_ROUTER: ContextVar[AdapterRouter | None] = ContextVar("lorakit_adapter_router", default=None)


class LoraLayer:
    """Mixin for LoRA layers; the concrete classes also inherit their torch base layer, and the merge
    rules (linear.py's WeightMerging, or QA-LoRA's own)."""

    # Whether the config's dropout applies: PEFT and loralib apply none to embedding adapters.
    uses_dropout = True
    # Whether target_modules="all-linear" picks this family (nn.Linear, GPT-2's Conv1D, QA-LoRA).
    is_linear = False
    # Whether adapter_update is exactly linear_adapter_update: s * (x A^T) B^T over
    # x's last dimension (nn.Linear, Conv1D), so that several adapters can be batched as matmuls.
    linear_adapter = False
    # Whether the weight is stored (in, out), the transpose of B @ A (PEFT's name for it).
    fan_in_fan_out = False
    # Whether the weight is laid out as the transpose of B @ A: GPT-2's Conv1D (fan_in_fan_out) and
    # embeddings ((vocab, dim), where B @ A is (dim, vocab)).
    weight_is_transposed = False
    # Whether the family computes DoRA adapters (core/layers/dora.py) and PiSSA/OLoRA initialisation.
    supports_dora = False
    supports_svd_init = False

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

    def adapter_update(self, x: torch.Tensor, adapter: LoraAdapter) -> torch.Tensor:
        raise NotImplementedError

    def adapter_output(self, result: torch.Tensor, x: torch.Tensor, adapter: LoraAdapter) -> torch.Tensor:
        """result + s * B(A(dropout(x))): plain LoRA's output."""
        return result + self.adapter_update(adapter.dropout(x), adapter)

    def weight_output(self, x: torch.Tensor) -> torch.Tensor:
        """Wx without the bias (DoRA families)."""
        raise NotImplementedError

    def per_output_channel(self, values: torch.Tensor) -> torch.Tensor:
        """(out,) values shaped to broadcast over this layer's outputs (channels last by default)."""
        return values

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
        """Start from an unchanged model: B = 0, A random (loralib's and PEFT's choice); or, for
        PiSSA/OLoRA, A and B from the weight's factors and their product taken out of the weight."""
        if is_svd_init(init):
            svd_init(self, adapter, init)
            return
        if init == "gaussian":
            nn.init.normal_(adapter.lora_A, std=1 / adapter.r)
        else:
            nn.init.kaiming_uniform_(adapter.lora_A, a=math.sqrt(5))
        nn.init.zeros_(adapter.lora_B)

    # --- adapters --------------------------------------------------------------------------

    def add_adapter(
        self, name: str, config: LoraConfig, r: int | None = None, scaling: float | None = None, init: bool = True
    ) -> LoraAdapter:
        """Add adapter ``name`` (not yet active). r and scaling default to the config's. ``init=False``
        leaves A and B unset, for a caller that fills them (loading a file)."""
        if name in self.lora:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        r = config.r if r is None else r
        scaling = lora_scaling(config.alpha, r, config.use_rslora) if scaling is None else scaling
        self.check_variant(config, tuple(self.lora))
        a_shape, b_shape = self.adapter_shapes(self, r)
        device, dtype = self._adapter_placement()
        adapter = LoraAdapter(a_shape, b_shape, scaling, config.dropout if self.uses_dropout else 0.0, config, device,
                              dtype, zeroed=init)
        if config.use_dora:
            shape = magnitude_shape(self.weight, self.weight_is_transposed)
            adapter.magnitude = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))
        if init:
            with torch.no_grad():
                self._init_adapter(adapter, config.init)
                if adapter.magnitude is not None:  # m = ||W + s * B @ A||: the model starts unchanged
                    combined = self.weight.to(dtype) + self._delta_weight(adapter).to(dtype)
                    adapter.magnitude.copy_(unit_norms(combined, self.weight_is_transposed).view(shape))
        self.lora[name] = adapter
        return adapter

    @classmethod
    def check_variant(cls, config: LoraConfig, adapters: tuple[str, ...]) -> None:
        """ConfigError if this family cannot hold ``config``'s DoRA or PiSSA/OLoRA next to ``adapters``."""
        kind = cls.__name__
        if config.use_dora and not cls.supports_dora:
            raise ConfigError(f"DoRA is implemented for linear and convolution layers, not for {kind}; "
                              "exclude it (exclude_modules) or leave use_dora off")
        if is_svd_init(config.init) and not cls.supports_svd_init:
            raise ConfigError(f"init {config.init!r} factors a weight matrix, and {kind} has none to factor "
                              "(it works on linear layers); exclude it or use init 'default'")
        if is_svd_init(config.init) and adapters:
            raise ConfigError(f"init {config.init!r} changes the base weight, which adapters {list(adapters)} "
                              "already use; give it a base with no other adapter")

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise MergeError(f"adapter {name!r} is merged into the weights; unmerge before deleting it")
        del self.lora[name]
        self.active_adapters = tuple(n for n in self.active_adapters if n != name)

    def _to_merge(self, names: Iterable[str] | None) -> list[str]:
        """The adapters a merge of ``names`` (default: the active ones) adds: held and not yet merged."""
        names = self.active_adapters if names is None else tuple(names)
        return [n for n in names if n in self.lora and n not in self.merged_adapters]

    def apply_adapter(self, result: torch.Tensor, x: torch.Tensor, adapter: LoraAdapter,
                      base: torch.Tensor | None = None) -> torch.Tensor:
        """``result`` plus ``adapter``'s contribution (plain LoRA or DoRA); ``base``, the base layer's
        own output for x, defaults to ``result``."""
        if adapter.magnitude is None:
            return self.adapter_output(result, x, adapter)
        return dora_output(self, result, x, adapter, result if base is None else base)

    def _add_adapters(self, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The base output plus every active adapter not already merged into the weight (or, while a
        router is set, whatever it gives each row)."""
        if self.lora_disabled:
            return result
        router = ADAPTER_ROUTER.get()
        if router is not None:
            return router(self, result, x)
        base = result
        for name in self.active_adapters:
            if name not in self.merged_adapters:
                result = self.apply_adapter(result, x, self.lora[name], base)
        return result
