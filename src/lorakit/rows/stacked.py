"""Every segment's adapter in two batched matmuls: the stacked plan of a mixed batch, for layers
whose adapter is a linear map on x's last dimension (``LoraLayer.linear_adapter``: nn.Linear and
GPT-2's Conv1D).

A decoding step has one token per row, where a loop over segments would cost four small
operations per segment per layer. Here the batch's adapters are stacked once per batch
composition, A: (G, r_max, in) and B: (G, out, r_max), zero-padded to the largest rank, and the
rows are laid out as one block per segment, so ``bmm`` does every segment's pair at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.core.layers.adapter import LoraAdapter
from lorakit.core.layers.base import LoraLayer


def stacked_rows_output(layer: LoraLayer, result: torch.Tensor, x: torch.Tensor, plan) -> torch.Tensor:
    """result + each row's own adapter, every segment at once: the segments' A and B stacked
    (zero-padded to the largest rank) and x's rows laid out as one block per segment, so two
    batched matmuls do every segment's pair. No FLOP goes to another segment's adapter and no
    weight is copied per row; the stacks are built on the layer's first use in this plan.
    Shared by nn.Linear and Conv1D."""
    if id(layer) not in plan.stacks:  # in the adapters' dtype (float32 over a half-precision base), as the loop
        plan.stacks[id(layer)] = _stack(layer, plan, torch.promote_types(x.dtype, torch.float32))
    stack = plan.stacks[id(layer)]
    if stack is None:  # no segment's adapter targets this layer
        return result
    groups = stack.a.shape[0]  # G segments whose adapter targets this layer, m rows each after padding
    tokens = x.shape[1:-1]  # per row: (T,) for a decoder, () for a bare (B, in) input
    blocks = (x if stack.gather is None else x[stack.gather]).to(stack.a.dtype)  # (G * m, ..., in)
    h = torch.bmm(blocks.reshape(groups, -1, x.shape[-1]), stack.a.transpose(1, 2)) * stack.scaling  # (G, m * T, r_max)
    delta = torch.bmm(h, stack.b.transpose(1, 2)).reshape(-1, *tokens, stack.b.shape[1])  # (G * m, ..., out)
    delta = delta.to(result.dtype)
    if stack.keep is not None:
        delta = delta[stack.keep]  # the covered rows, in row order
    return result + delta if stack.rows is None else result.index_add(0, stack.rows, delta)


@dataclass(frozen=True)
class _Stack:
    """One layer's matrices for a stacked plan, and where its rows go. m is the longest covered
    segment: a shorter one is padded by repeating its last row, and the padding's output dropped."""

    a: torch.Tensor  # (G, r_max, in): each segment's A, zero rows past its rank
    b: torch.Tensor  # (G, out, r_max): each segment's B, zero columns past its rank
    scaling: torch.Tensor  # (G, 1, 1)
    sources: tuple[tuple, ...]  # per segment: its adapter and the versions of A and B the copies were taken at
    gather: torch.Tensor | None  # (G * m,) batch row of each block row; None: the batch already is the blocks
    keep: torch.Tensor | None  # (covered rows,) block rows that are real rows; None: all of them
    rows: torch.Tensor | None  # (covered rows,) their batch rows; None: every row of the batch
    memory: tuple[torch.Tensor | None, ...]  # (capacity >= G, ...) holding a and b first; None: autograd's


def _stack(layer: LoraLayer, plan, dtype: torch.dtype) -> _Stack | None:
    covered = [s for s in plan.segments if s.adapter in layer.lora]
    earlier = plan.earlier.pop(id(layer), None)
    if not covered:
        return None
    adapters = [layer.lora[s.adapter] for s in covered]
    sources = tuple((adapter, adapter.lora_A._version, adapter.lora_B._version, dtype) for adapter in adapters)
    if earlier is not None and sources == earlier.sources:  # the same adapters, unchanged: no copy at all
        a, b, scaling, memory = earlier.a, earlier.b, earlier.scaling, earlier.memory
    else:
        a, b, scaling, memory = _copied(adapters, dtype, earlier.memory if earlier is not None else None)
    device, width = a.device, max(s.stop - s.start for s in covered)
    gather = [min(s.start + i, s.stop - 1) for s in covered for i in range(width)]
    keep = [g * width + i for g, s in enumerate(covered) for i in range(s.stop - s.start)]
    rows = [s.start + i for s in covered for i in range(s.stop - s.start)]
    everything = rows == list(range(plan.rows))

    def index(values: list[int], needed: bool) -> torch.Tensor | None:
        return torch.tensor(values, device=device) if needed else None

    return _Stack(a, b, scaling, sources, index(gather, gather != list(range(plan.rows))),
                  index(keep, len(keep) != len(gather)), index(rows, not everything), memory)


def _copied(adapters: list[LoraAdapter], dtype: torch.dtype,
            memory: tuple[torch.Tensor | None, ...] | None) -> tuple:
    """(a, b, scaling, memory): the adapters' matrices copied into ``memory`` (the earlier plan's)
    where they fit, which is paged in already: new memory of this size can cost a page fault per
    4 KiB on first touch. Continuous batching of 48 requests over 16 adapters of r=16 (SmolLM2, 2-core
    Zen 5, 2026-12-02) spent 1.2-1.6 s building stacks against 1.7-1.9 s with new memory each time."""
    a, a_memory = _stacked([adapter.lora_A for adapter in adapters], 0, dtype, memory[0] if memory else None)
    b, b_memory = _stacked([adapter.lora_B for adapter in adapters], 1, dtype, memory[1] if memory else None)
    scaling = torch.tensor([adapter.scaling for adapter in adapters], device=a.device, dtype=dtype).view(-1, 1, 1)
    return a, b, scaling, (a_memory, b_memory)


def _stacked(matrices: list[torch.Tensor], rank_dim: int, dtype: torch.dtype,
             memory: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(stacked, memory): the matrices stacked along a new first dim, each zero-padded to the largest
    rank along ``rank_dim``, written into the first entries of ``memory`` when it has the room, the
    shape, dtype and device, else into new memory: of twice the size where ``memory`` was too small
    (a batch growing as requests join, which may go on), of just that size otherwise (room for more
    in every new batch made its first stacking 4x slower here: malloc then maps fresh pages each
    time). Stored as the adapters are (bmm takes the transposes as views): a plain copy, several
    times faster than writing them transposed. Where autograd records (a stacked plan run with
    gradients on), the copies go to new memory through ops it records, and that memory is not
    handed on (backward may still read it)."""
    shape = list(matrices[0].shape)
    shape[rank_dim] = max(m.shape[rank_dim] for m in matrices)
    count = len(matrices)
    recorded = torch.is_grad_enabled() and any(m.requires_grad for m in matrices)
    fits = memory is not None and list(memory.shape[1:]) == shape and memory.dtype == dtype \
        and memory.device == matrices[0].device
    if recorded or not fits or memory.shape[0] < count:
        growing = fits and not recorded
        memory = matrices[0].new_empty(2 * count if growing else count, *shape, dtype=dtype)
    stacked = memory[:count]
    if all(m.shape[rank_dim] == shape[rank_dim] for m in matrices) and not recorded:
        torch.stack([m.to(dtype) for m in matrices], out=stacked)
        return stacked, memory
    stacked.zero_()
    for i, m in enumerate(matrices):
        stacked[i].narrow(rank_dim, 0, m.shape[rank_dim]).copy_(m)
    return stacked, None if recorded else memory
