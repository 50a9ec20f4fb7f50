"""Mixed precision for training: the matrix products in bfloat16 (or float16) under autocast while
the weights, the adapters' master copies, norms, softmax and the residual stream stay in the
model's dtype. On a CPU with native bfloat16 (AVX512-BF16, AMX) a step takes ~0.6x the time of a
float32 step; without it bfloat16 is emulated and slower than float32, hence "auto".

For a training step the same context picks the attention kernel of short half-precision batches on
a CPU: there PyTorch's fused (flash) attention, forward + backward, is slower than the plain one
(scores, softmax, product: "math") in bfloat16 until the keys grow past ~170 positions (8 rows x 9
heads x 64, torch 2.13: 7.3 against 3.2 ms at 76 keys, 25 against 31 ms at 256); in float32, or
forward alone (evaluation), the fused kernel is as fast or faster. The plain kernel keeps each
layer's (rows, heads, queries, keys) float32 scores and probabilities for backward: 15.5 MiB for 8
rows of 160 keys, against the fused kernel's 1.8 MiB."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from lorakit.hardware import native_bfloat16

COMPUTE_DTYPES = ("float32", "bfloat16", "float16", "auto")
# The longest key length at which the plain attention kernel runs under half precision on a CPU.
PLAIN_ATTENTION_MAX_KEYS = 160


def resolved_compute_dtype(name: str, device: torch.device) -> str:
    """``name``, with "auto" made bfloat16 where the device has it natively and float32 elsewhere."""
    if name == "auto":
        return "bfloat16" if native_bfloat16(device) else "float32"
    return name


def compute_context(name: str, device: torch.device,
                    recomputes: bool = False) -> Callable[..., contextlib.AbstractContextManager]:
    """A factory of the context a forward runs in, given the key length of its training batch (0:
    not a training step, or unknown): autocast to the resolved compute dtype and, under half
    precision on a CPU, the plain attention kernel for batches of at most PLAIN_ATTENTION_MAX_KEYS
    positions; nothing for float32. (Backward runs outside it, as autocast asks; the attention
    kernel is chosen in the forward.) With ``recomputes`` (gradient checkpointing) the kernel is
    left to PyTorch: the recomputation in backward runs outside this context, with the default
    kernel, and torch.utils.checkpoint refuses recomputed tensors that differ from the forward's."""
    resolved = resolved_compute_dtype(name, device)
    if resolved == "float32":
        return lambda keys=0: contextlib.nullcontext()
    dtype = getattr(torch, resolved)

    @contextlib.contextmanager
    def compute(keys: int = 0):
        plain = device.type == "cpu" and not recomputes and 0 < keys <= PLAIN_ATTENTION_MAX_KEYS
        with torch.autocast(device.type, dtype=dtype), \
                (sdpa_kernel([SDPBackend.MATH]) if plain else contextlib.nullcontext()):
            yield

    return compute
