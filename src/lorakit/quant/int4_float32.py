"""x W~^T in float32 straight from 4-bit codes (int4_float32.c), on x86 CPUs with AVX2: lorakit's
kernels for one row (Int4Gemv, decoding one sequence) and a few (Int4Gemm, up to FLOAT32_MAX_ROWS:
decoding a batch, short prompts); and W~ itself in one pass (``dequantize``: the same values as
PyTorch's, for longer inputs and for QA-LoRA training, which de-quantizes in forward and backward).

Without bfloat16 arithmetic in the CPU, PyTorch's CPU int4 kernel (int4_kernel.py) is held back: it
converts x to bfloat16 and scales every weight. These multiply the integer codes by float32 x and
apply each group's scale once, to its dot product. On a 2-core AMD EPYC (AVX2), one row: 23 against
43 us for 576 -> 576, 51-53 against 87-88 us for SmolLM2's 576 -> 1536 and 1536 -> 576; a SmolLM2
layer's seven products at 16 rows 1.1 against 1.6 ms, at 56 rows 3.5 against 5.0 ms. And in
float32, so their products match the de-quantizing path to ~1e-6 (the bfloat16 kernel's: ~1e-2).

PyTorch ships no such kernel for the CPU, nor does a library that installs beside torch 2.13
(docs/ARCHITECTURE.md), so lorakit compiles its own: once per machine, with the system's C
compiler, into ``$LORAKIT_CACHE/kernels`` (native.py); ~0.5 s. Where that cannot be done (no
compiler, not Linux on x86 with AVX2, PyTorch not on OpenMP), 4-bit layers use the int4 kernel as
before.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from lorakit.quant.groupwise import QuantizedWeight, codes_as
from lorakit.quant.native import INT, POINTER, float32_rows, load_library

SOURCE = Path(__file__).with_name("int4_float32.c")
GEMV_K_MULTIPLE = 64  # the one-row kernel reads codes 64 at a time
GEMM_N_MULTIPLE = 8  # the other takes output rows 8 at a time
# Rows of x up to which Int4Gemm is faster than de-quantizing and multiplying in float32: a SmolLM2
# layer's seven products at 128 rows took 8.0 against 9.8 ms, at 192 11.8 against 12.3, at 256 21.5
# against 17.3 (AMD EPYC, AVX2, 2 threads, 2026-12-03); 128 leaves a margin.
FLOAT32_MAX_ROWS = 128


def gemv_applies(weight: QuantizedWeight, device: torch.device) -> bool:
    """Whether ``weight`` can be multiplied by one row on ``device`` by the one-row kernel."""
    return (device.type == "cpu" and weight.bits == 4 and weight.shape[1] % GEMV_K_MULTIPLE == 0
            and weight.group_size % 32 == 0 and _library() is not None)


def gemm_applies(weight: QuantizedWeight, device: torch.device) -> bool:
    """Whether ``weight`` can be multiplied by a few rows on ``device`` by the other kernel."""
    return (device.type == "cpu" and weight.bits == 4 and weight.shape[0] % GEMM_N_MULTIPLE == 0
            and _library() is not None)


class Int4Gemv:
    """A QuantizedWeight as the one-row kernel reads it: the packed codes themselves (no copy), scales and
    mins (out, in / group_size) as float32 (the QuantizedWeight's own tensors where they are)."""

    def __init__(self, weight: QuantizedWeight) -> None:
        self.out_features, self.in_features = weight.shape
        self.group_size = weight.group_size
        self.codes = weight.codes.contiguous()
        self.scales = weight.scales.float().contiguous()
        self.mins = weight.mins.float().contiguous()
        # Held by this object, so their addresses stay valid; read once (a product costs ~20 us at
        # 576 x 576, and every microsecond around it shows at decoding's 210 products a token).
        self._addresses = (self.codes.data_ptr(), self.scales.data_ptr(), self.mins.data_ptr())

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) with one row -> (..., out) in x's dtype, computed in float32."""
        flat = float32_rows(x, self.in_features)  # (1, in)
        y = torch.empty(*x.shape[:-1], self.out_features)  # float32
        status = _library().int4_gemv(flat.data_ptr(), self.in_features, *self._addresses, self.out_features,
                                      self.group_size, y.data_ptr(), torch.get_num_threads())
        if status != 0:
            raise MemoryError(f"int4_gemv could not allocate {self.in_features} floats of scratch")
        return y.to(x.dtype)


class Int4Gemm:
    """A QuantizedWeight in the few-row kernel's form: its codes regrouped into one 32-bit word per
    8 output rows and input (as large as the packed codes), scales and mins (in / group_size, out)
    as float32."""

    def __init__(self, weight: QuantizedWeight) -> None:
        self.out_features, self.in_features = weight.shape
        self.group_size = weight.group_size
        out, cols = weight.shape
        codes = codes_as(weight.codes, 4, cols, torch.uint8).view(out // 8, 4, 2, cols)  # transient
        # byte j of word k in block b: rows 8b + 2j (low nibble) and 8b + 2j + 1 (high) at input k
        self.packed = (codes[:, :, 0] | (codes[:, :, 1] << 4)).permute(0, 2, 1).contiguous()  # (out / 8, in, 4)
        self.scales = weight.scales.float().t().contiguous()  # (in / group_size, out)
        self.mins = weight.mins.float().t().contiguous()
        self._addresses = (self.packed.data_ptr(), self.scales.data_ptr(), self.mins.data_ptr())

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out) in x's dtype, computed in float32."""
        flat = float32_rows(x, self.in_features)  # (rows, in)
        y = torch.empty(*x.shape[:-1], self.out_features)  # float32
        status = _library().int4_gemm(flat.data_ptr(), flat.shape[0], self.in_features, *self._addresses,
                                      self.out_features, self.group_size, y.data_ptr(), torch.get_num_threads())
        if status != 0:
            raise MemoryError(f"int4_gemm could not allocate its scratch for {flat.shape[0]} rows")
        return y.to(x.dtype)


def dequantize(weight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor | None:
    """``weight.dequantize(dtype)``, the same bit for bit, in one pass over the float32 weight (half
    dtypes rounded once from it, as there); None where this kernel does not apply (not 4-bit, not on
    the CPU, float64, no library): then de-quantize as usual."""
    codes = weight.codes
    if (weight.bits != 4 or codes.device.type != "cpu" or dtype not in _ROUNDED_FROM_FLOAT32
            or weight.shape[1] % 32 or _library() is None):
        return None
    out, cols = weight.shape
    scales, mins = weight.scales.float().contiguous(), weight.mins.float().contiguous()
    w = torch.empty(out, cols)
    _library().int4_dequantize(codes.contiguous().data_ptr(), scales.data_ptr(), mins.data_ptr(), out, cols,
                               weight.group_size, w.data_ptr(), torch.get_num_threads())
    return w.to(dtype)


_ROUNDED_FROM_FLOAT32 = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache  # built or found once per process
def _library() -> ctypes.CDLL | None:
    return load_library(SOURCE, {
        "int4_gemv": ([POINTER, INT, POINTER, POINTER, POINTER, INT, INT, POINTER, INT], ctypes.c_int),
        "int4_gemm": ([POINTER, INT, INT, POINTER, POINTER, POINTER, INT, INT, POINTER, INT], ctypes.c_int),
        "int4_dequantize": ([POINTER, POINTER, POINTER, INT, INT, INT, POINTER, INT], None),
    })
