"""Mixed precision for training: the matrix products in bfloat16 (or float16) under autocast while
the weights, the adapters' master copies, norms, softmax and the residual stream stay in the
model's dtype. On a CPU with native bfloat16 (AVX512-BF16, AMX) a step takes ~0.6x the time of a
float32 step; without it bfloat16 is emulated and slower than float32, hence "auto"."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch

COMPUTE_DTYPES = ("float32", "bfloat16", "float16", "auto")


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return False


def resolved_compute_dtype(name: str, device: torch.device) -> str:
    """``name``, with "auto" made bfloat16 where the device has it natively and float32 elsewhere."""
    if name == "auto":
        return "bfloat16" if native_bfloat16(device) else "float32"
    return name


def compute_context(name: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the context the forward runs in: autocast to the resolved compute dtype, or
    nothing for float32. (Backward runs outside it, as autocast asks.)"""
    resolved = resolved_compute_dtype(name, device)
    if resolved == "float32":
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device.type, dtype=getattr(torch, resolved))
