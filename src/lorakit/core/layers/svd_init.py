"""PiSSA and OLoRA: start A and B from the weight's own principal factors instead of zero.

PiSSA (Meng et al. 2024): W = U S V^T; B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T, so s * B @ A is
the best rank-r part of W, and W keeps the rest (the residual W - s * B @ A). Training then moves
the principal directions first, which converges faster than from B = 0. "pissa_niter_N" takes the
top r singular triplets from torch's randomised SVD with N subspace iterations (fast on large
layers) instead of a full SVD.
OLoRA (Buyukakyuz 2024): W = Q R; B = Q_r, A = R_r (the first r columns of Q, rows of R), and W keeps
W - s * B @ A.

Either way the model starts unchanged (residual + s * B @ A = W) but the base weight is no longer
the original, so the adapter's initial A0 and B0 are kept beside it (buffers, not saved with the
model): saving turns the adapter into a plain LoRA adapter against the untouched base, exactly as
PEFT's ``path_initial_model_for_weight_conversion`` does (files/peft_format.py). Factors are
computed in float32 (wider for float64 weights) on the weight laid out (out, in), as PEFT does.
"""

from __future__ import annotations

import re

import torch

SVD_INITS = ("pissa", "olora")  # and pissa_niter_<N>
_NITER = re.compile(r"pissa_niter_([0-9]+)")


def is_svd_init(init: str) -> bool:
    return init in SVD_INITS or _NITER.fullmatch(init) is not None


@torch.no_grad()
def svd_init(layer, adapter, init: str) -> None:
    """Set ``adapter``'s A and B from ``layer``'s weight by ``init`` and take s * B @ A out of the weight."""
    weight = layer.weight
    dtype = torch.promote_types(weight.dtype, torch.float32)
    matrix = (weight.T if layer.weight_is_transposed else weight).to(dtype)  # (out, in)
    r, scaling = adapter.r, adapter.scaling
    if init == "olora":
        q, upper = torch.linalg.qr(matrix)  # (out, k), (k, in)
        a, b = upper[:r], q[:, :r]
    else:
        niter = _NITER.fullmatch(init)
        if niter is None:
            u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
            u, s, vh = u[:, :r], s[:r], vh[:r]
        else:
            u, s, v = torch.svd_lowrank(matrix, q=r, niter=int(niter.group(1)))
            vh = v.T
        root = torch.sqrt(s / scaling)  # (r,)
        a, b = root[:, None] * vh, u * root[None, :]  # (r, in), (out, r)
    adapter.lora_A.copy_(a)
    adapter.lora_B.copy_(b)
    residual = matrix - scaling * (b @ a)
    weight.copy_((residual.T if layer.weight_is_transposed else residual).to(weight.dtype))
    # What the saved file's conversion subtracts again (files/peft_format.py, to_plain_lora_tensors).
    adapter.register_buffer("initial_A", adapter.lora_A.detach().clone(), persistent=False)
    adapter.register_buffer("initial_B", adapter.lora_B.detach().clone(), persistent=False)
