"""x @ W~^T straight from 4-bit codes, with PyTorch's CPU int4 kernel (no float copy of W~).

``torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scale_and_zero)`` computes
x @ W^T for a (out, in) weight stored as 4-bit codes q in 0..15, groups of ``group_size`` along
``in``, with

    w = (q - 8) * scale + zero          (the "tinygemm" form)

lorakit stores w = q * scale + min (groupwise.py), the same grid written differently:
zero = min + 8 * scale. The kernel wants its own blocked layout of the codes
(``_convert_weight_to_int4pack_for_cpu``) and bfloat16 activations, scales and zeros; with float32
or float16 it falls back to a loop ~30x slower than a float32 matmul, so this path always computes
in bfloat16 and accumulates in float32. Rounding scale and zero to bfloat16 moves a weight by at
most ~8 * scale * 2^-9 (zero = min + 8 * scale sits near the group's centre, so it is small): under
2% of one quantization step. The de-quantizing path stays the exact reference (and serves 2/3/8
bits, CUDA and autograd's backward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.hardware import native_bfloat16
from lorakit.quant.groupwise import QuantizedWeight, codes_as

KERNEL_GROUP_SIZES = (32, 64, 128, 256)
# On a CPU that emulates bfloat16 (AVX2 alone), rows of x up to which the kernel is faster than
# de-quantizing once and multiplying in float32. There the kernel's time grows with every row (it
# works through the codes again for each: ~8 us a row for 576 x 576), while one de-quantization
# serves them all: the two cross at 52-60 rows on SmolLM2's shapes (576 -> 576, 576 -> 1536,
# 1536 -> 576) and at 50-64 rows for a whole SmolLM2 forward (AMD EPYC without AVX-512,
# 2026-12-02); at 512 rows the kernel took 1.5x (forward) to 2x (one layer) as long.
EMULATED_BFLOAT16_MAX_ROWS = 56
# Groups of inner-K tiles the CPU packing interleaves; the CPU kernel reads any of them alike.
_INNER_K_TILES = 2


def kernel_available(weight: QuantizedWeight, device: torch.device) -> bool:
    """Whether the CPU int4 kernel can compute with ``weight`` on ``device``."""
    return (device.type == "cpu" and weight.bits == 4 and weight.group_size in KERNEL_GROUP_SIZES
            and weight.shape[0] % 16 == 0  # the packing takes output rows 16 at a time
            and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"))


def kernel_pays(rows: int, device: torch.device) -> bool:
    """Whether the kernel beats de-quantizing for an x of ``rows`` rows: always where the CPU
    multiplies bfloat16 in hardware, else for decoding-sized inputs only (a prompt pass de-quantizes)."""
    return rows <= EMULATED_BFLOAT16_MAX_ROWS or native_bfloat16(device)


@dataclass
class Int4Packed:
    """A QuantizedWeight in the kernel's form: codes (out, in / 2) uint8 in its blocked layout,
    scale_and_zero (in / group_size, out, 2) bfloat16. Together as large as the packed codes."""

    codes: torch.Tensor
    scale_and_zero: torch.Tensor
    group_size: int
    out_features: int

    @classmethod
    def from_quantized(cls, weight: QuantizedWeight) -> Int4Packed:
        out, cols = weight.shape
        q = codes_as(weight.codes, 4, cols, torch.int32)  # (out, in), transient
        codes = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, _INNER_K_TILES)
        scales, mins = weight.scales.float(), weight.mins.float()  # (out, in / g)
        scale_and_zero = torch.stack([scales, mins + 8 * scales], dim=-1).transpose(0, 1)  # (in / g, out, 2)
        return cls(codes, scale_and_zero.to(torch.bfloat16).contiguous(), weight.group_size, out)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out) in x's dtype, computed in bfloat16."""
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.codes, self.group_size, self.scale_and_zero)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)
