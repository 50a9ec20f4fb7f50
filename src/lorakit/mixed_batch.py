"""Rows of one batch on different adapters: the base layers run once for the whole batch, and each
LoRA layer adds, to each group of rows, that group's adapter (or none).

Rows must come grouped: all rows of an adapter next to each other, so a group is a slice and its
LoRA term one pair of matmuls on that slice (S-LoRA's and Punica's segments, without their CUDA
kernels). The plan is built once per forward pass and read by every layer.

    with rows_use_adapters(model, ["acme", "acme", None, "globex"]):
        logits = model(input_ids).logits   # rows 0-1 with acme, row 2 the base model, row 3 globex
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from lorakit.adapters import adapter_names
from lorakit.errors import ConfigError
from lorakit.layers.base import ROW_PLAN, RowPlan, RowSegment
from lorakit.walk import saved_modules


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
    token = ROW_PLAN.set(plan)
    try:
        yield
    finally:
        ROW_PLAN.reset(token)
