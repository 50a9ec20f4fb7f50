"""An output head whose float weight lies exactly on an 8-bit block grid, multiplied from the 8-bit
codes when decoding (int8_float32.c).

SmolLM2's GGUF file stores its tied embedding and head as Q8_0 blocks, d * q for 32 weights with q
in [-127, 127] and d a float16, so the float32 head transformers makes of it is exactly that grid.
At batch 1 a token of the 4-bit model read the whole float32 head (49152 x 576, 113 MB): ~7 of its
~29 ms on a 2-core AMD EPYC with AVX2. The codes and scales are a quarter of those bytes, and
multiplying from them computes the same product up to float32 rounding. Nothing is rounded to get there: a
head is taken only if every weight equals its block's d * q exactly; any other head (trained,
NaN, float16, not from such a file) keeps its float product.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.quant.native import INT, POINTER, float32_rows, load_library

SOURCE = Path(__file__).with_name("int8_float32.c")
BLOCK = 32  # weights per scale, as in GGUF's Q8_0
# Rows up to which the codes are faster than the float head's F.linear, which takes the rows beyond
# (a head that multiplies from its codes gets no oneDNN copy: models/packed_weights.py). SmolLM2's
# head on a 2-core AMD EPYC Zen 4, 2026-12-03: 1 row 1.4 against 10.0 ms, 16 rows 8.3 against 24.9,
# 64 rows 33.8 against 47.4 (the codes' product is compute-bound from there on).
HEAD_MAX_ROWS = 64
_CHECK_ROWS = 4096  # the grid is checked this many weight rows at a time (bounded scratch)


def int8_grid(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(codes (N, K) int8, scales (N, K / 32) float32) such that weight == scales * codes exactly,
    block by block; None where the weight is not on such a grid (or not a float32 CPU matrix)."""
    if weight.dim() != 2 or weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.shape[1] % BLOCK:
        return None
    rows, cols = weight.shape
    codes = torch.empty(rows, cols, dtype=torch.int8)
    scales = torch.empty(rows, cols // BLOCK)
    for start in range(0, rows, _CHECK_ROWS):
        blocks = weight.detach()[start:start + _CHECK_ROWS].reshape(-1, BLOCK)
        # The largest |w| of a block is 127 steps of its scale (how Q8_0 quantizes); NaN or inf fail below.
        scale = blocks.abs().amax(dim=1, keepdim=True) / 127
        q = torch.where(scale > 0, torch.round(blocks / scale), 0.0)
        if not torch.equal(q * scale, blocks):
            return None
        codes[start:start + _CHECK_ROWS] = q.view(-1, cols).to(torch.int8)
        scales[start:start + _CHECK_ROWS] = scale.view(-1, cols // BLOCK)
    return codes, scales


class Int8Grid:
    """A weight as int8_matmul reads it: codes (N, K) int8 and scales (N, K / 32) float32."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor) -> None:
        self.out_features, self.in_features = codes.shape
        self.codes, self.scales = codes.contiguous(), scales.contiguous()
        self._addresses = (self.codes.data_ptr(), self.scales.data_ptr())

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out) in x's dtype, computed in float32."""
        flat = float32_rows(x, self.in_features)  # (rows, in)
        y = torch.empty(*x.shape[:-1], self.out_features)  # float32
        _library().int8_matmul(flat.data_ptr(), flat.shape[0], self.in_features, *self._addresses,
                               self.out_features, y.data_ptr(), torch.get_num_threads())
        return y.to(x.dtype)


class Int8GridHead(nn.Linear):
    """The output head: an nn.Linear with the same weight Parameter (a tied head stays tied, and
    training reads it as before) that, without autograd on a CPU, multiplies up to HEAD_MAX_ROWS rows
    from 8-bit codes where its weight lies on the grid (``int8_grid``). The codes are made on first
    use and again whenever the weight changes or moves; a head that is not on the grid is checked
    once per change and multiplied as floats. ``use_kernel=False`` keeps the float product (the
    reference, as QuantLinear's exact path: lorakit.quant.linear.use_int4_kernel sets both)."""

    use_kernel = True

    @classmethod
    def of(cls, linear: nn.Linear) -> Int8GridHead:
        head = cls.__new__(cls)  # nn.Linear.__init__ would make (and throw away) a weight of its own
        nn.Module.__init__(head)
        head.in_features, head.out_features = linear.in_features, linear.out_features
        head.weight, head.bias = linear.weight, linear.bias
        head._grid = (None, None)  # (what the form was made from, the form or None)
        return head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # An x of the wrong width goes to F.linear, which fails as nn.Linear's head does.
        if (self.use_kernel and not torch.is_grad_enabled() and x.device.type == "cpu"
                and x.shape[-1] == self.in_features and x.numel() <= HEAD_MAX_ROWS * self.in_features
                and (grid := self.grid()) is not None):
            y = grid.matmul(x)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        return F.linear(x, self.weight, self.bias)

    def grid(self) -> Int8Grid | None:
        weight = self.weight
        if weight.is_inference():  # keeps no version counter: a write to it could not be noticed
            return None
        source = (weight.device, weight.dtype, weight.data_ptr(), weight._version)
        if self._grid[0] != source:
            found = int8_grid(weight) if _library() is not None else None
            self._grid = (source, Int8Grid(*found) if found is not None else None)
        return self._grid[1]


def use_int8_grid_head(model: nn.Module) -> nn.Module:
    """Give a transformers model's output head (an nn.Linear) the 8-bit products where its weight is
    on the grid (Int8GridHead), in place; other models are returned as they are."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is nn.Linear:
        model.set_output_embeddings(Int8GridHead.of(head))
    return model


@functools.cache  # built or found once per process
def _library() -> ctypes.CDLL | None:
    return load_library(SOURCE, {"int8_matmul": ([POINTER, INT, INT, POINTER, POINTER, INT, POINTER, INT], None)})
