"""Rows of one batch on different adapters: the base layers run once for the whole batch, and each
LoRA layer adds, to each group of rows, that group's adapter (or none).

Rows must come grouped: all rows of an adapter next to each other, so a group is a slice and its
LoRA term one pair of matmuls on that slice (S-LoRA's and Punica's segments, without their CUDA
kernels). A plan is made once per forward pass (or per batch composition, while decoding) and
routes every LoRA layer's output through the layers' router hook (``ADAPTER_ROUTER``).

    with rows_use_adapters(model, ["acme", "acme", None, "globex"]):
        logits = model(input_ids).logits   # rows 0-1 with acme, row 2 the base model, row 3 globex
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.core.adapters import adapter_names
from lorakit.core.layers.base import ADAPTER_ROUTER, LoraLayer
from lorakit.core.walk import saved_modules
from lorakit.errors import ConfigError, MergeError
from lorakit.rows.stacked import stacked_rows_output


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
    segment's pair with two batched matmuls (rows/stacked.py): four operations per layer whatever
    the number of adapters, where the loop costs four per segment. The stacks are built on a
    layer's first use and kept in ``stacks``, so they are built once for as long as the batch's
    composition lasts (the engine's decoding steps). A plan made when the rows change takes
    ``earlier``'s stacks over where they hold the same adapters, and otherwise copies into their
    memory (already paged in, unlike new memory); ``earlier`` gives those stacks up (were it run
    again, it would build them anew). That pays when the plan serves many passes of few tokens per
    row; for a single pass (a prompt) the copy of every adapter it costs buys nothing.
    """

    def __init__(self, segments: tuple[RowSegment, ...], stacked: bool = False, earlier: RowPlan | None = None) -> None:
        self.segments = segments
        self.stacked = stacked and len(segments) > 1
        self.rows = segments[-1].stop if segments else 0
        self.stacks: dict[int, object] = {}  # id(layer) -> its stacked matrices and row layout (None: untargeted)
        self._dora: dict[int, bool] = {}  # id(layer) -> whether a segment's adapter there is DoRA
        # The plan this one follows in a running batch: a layer takes its stacks, or their memory,
        # over (each entry leaves as its layer builds, so memory is not doubled).
        self.earlier: dict[int, object] = earlier.stacks if earlier is not None and self.stacked else {}

    def route(self, layer: LoraLayer, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``layer``'s output with each segment's adapter added to that segment's rows: the base output
        was computed once for the whole batch, and no adapter weight is copied per row. An adapter
        that does not target this layer leaves its rows as the base computed them."""
        if layer.merged_adapters:
            raise MergeError(f"adapters {layer.merged_adapters} are merged into the weights, so every row would "
                             "get them; unmerge before running rows with different adapters")
        if len(self.segments) == 1:  # one adapter for the whole batch: no slicing, no concatenation
            name = self.segments[0].adapter
            return result if name not in layer.lora else layer.apply_adapter(result, x, layer.lora[name])
        if self.stacked and layer.linear_adapter and not layer.training and not self._has_dora(layer):
            return stacked_rows_output(layer, result, x, self)
        pieces = []
        for segment in self.segments:
            rows = slice(segment.start, segment.stop)
            if segment.adapter in layer.lora:
                pieces.append(layer.apply_adapter(result[rows], x[rows], layer.lora[segment.adapter]))
            else:
                pieces.append(result[rows])
        return torch.cat(pieces)


    def _has_dora(self, layer: LoraLayer) -> bool:
        """Whether a segment's adapter on ``layer`` is DoRA, which the stacked matmuls do not compute
        (its rows then take the loop, each with its own factor per output unit). Looked up once per
        layer and plan, like the stacks: asked anew on every decoding step, the walk over the
        segments' modules cost 31 ms of a 228 ms step (16 adapters, SmolLM2, AVX2 EPYC, 2026-12-03)."""
        if id(layer) not in self._dora:
            self._dora[id(layer)] = any(s.adapter in layer.lora and layer.lora[s.adapter].magnitude is not None
                                        for s in self.segments)
        return self._dora[id(layer)]


def row_segments(row_adapters: Sequence[str | None]) -> tuple[RowSegment, ...]:
    """Runs of equal names as segments; an adapter may not come back after another one's rows."""
    segments: list[RowSegment] = []
    for row, name in enumerate(row_adapters):
        if segments and segments[-1].adapter == name:
            segments[-1] = RowSegment(name, segments[-1].start, row + 1)
            continue
        if any(s.adapter == name for s in segments):
            raise ConfigError(f"rows of adapter {name!r} are not next to each other; group the batch's rows "
                              "by adapter (sort them) first")
        segments.append(RowSegment(name, row, row + 1))
    return tuple(segments)


@contextmanager
def rows_use_adapters(model: nn.Module, row_adapters: Sequence[str | None], stacked: bool = False) -> Iterator[None]:
    """Within the block, row i of every batch the model runs uses adapter ``row_adapters[i]``.
    ``stacked``: two batched matmuls per layer for all adapters (RowPlan), for many passes of few tokens
    per row in one block (decoding)."""
    named = {n for n in row_adapters if n is not None}
    unknown = sorted(named - set(adapter_names(model)))
    if unknown:
        raise ConfigError(f"no adapter named {', '.join(map(repr, unknown))} on this model; "
                          f"it has {adapter_names(model) or 'none'}")
    whole = sorted({n for _, wrapper in saved_modules(model) for n in wrapper.modules_to_save} & named)
    if whole:
        raise ConfigError(f"adapter(s) {whole} replace whole modules (modules_to_save), which cannot differ "
                          "between rows of one batch; run their requests in batches of their own")
    with rows_use_plan(RowPlan(row_segments(row_adapters), stacked)):
        yield


@contextmanager
def rows_use_plan(plan: RowPlan) -> Iterator[None]:
    """``rows_use_adapters`` without its checks, for a caller that validated the names once and
    keeps the plan across steps (the serving engine)."""
    token = ADAPTER_ROUTER.set(plan.route)
    try:
        yield
    finally:
        ADAPTER_ROUTER.reset(token)
