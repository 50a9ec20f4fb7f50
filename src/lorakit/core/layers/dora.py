"""DoRA, weight-decomposed LoRA (Liu et al. 2024): the adapted weight's direction from LoRA, its
length per output unit learned on its own.

    W' = m * (W + s * B @ A) / ||W + s * B @ A||

with the norm taken per output unit (each row of an (out, in) weight, each output channel of a
convolution's (out, in, k...) kernel) and m a trained vector of one length per output unit, set at
the start to ||W|| so that the model starts unchanged. As the paper's section 4.3 advises (and PEFT
does), the norm is treated as a constant in backward: gradients reach m, A and B, not through the
norm. The layer's output is then

    y = W'x + b = f * (Wx + s * B(A(x))) + b,  f = m / ||W + s * B @ A||  (one factor per output unit)

computed from the base output already at hand: y = result + (f - 1) * (result - b) + f * s * B(A(x)).
With dropout while training, PEFT's convention: both Wx and the LoRA branch see the dropped input.
Without autograd (inference, serving), f is computed once and kept on the adapter until A, B, m or
W change (their version counters say so) or the model's train()/eval() is called: then a DoRA
forward costs what a plain LoRA one does.

Files: PEFT's ``<module>.lora_magnitude_vector`` holds m, shaped (out,) for a linear map and
(1, out, 1...) for a convolution; lorakit keeps the Parameter in that shape.
"""

from __future__ import annotations

import torch


def unit_norms(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """(out,): the L2 norm of each output unit's weights; ``transposed``: the weight is (in, out)."""
    rows = weight.T if transposed else weight.flatten(1)
    return torch.linalg.vector_norm(rows, dim=1)


def per_unit(values: torch.Tensor, weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """(out,) values shaped to broadcast over a weight laid out like ``weight``."""
    return values.view(1, -1) if transposed else values.view(-1, *(1,) * (weight.dim() - 1))


def magnitude_shape(weight: torch.Tensor, transposed: bool) -> tuple[int, ...]:
    """PEFT's shape for m: (out,) for a linear map, (1, out, 1...) for a convolution."""
    if weight.dim() > 2:
        return (1, weight.shape[0], *(1,) * (weight.dim() - 2))
    return (weight.shape[1] if transposed else weight.shape[0],)


def dora_factor(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, transposed: bool) -> torch.Tensor:
    """(out,) f = m / ||W + delta||, the norm a constant for autograd; ``delta`` is s * B @ A laid out like
    ``weight``."""
    with torch.no_grad():
        norms = unit_norms(weight.to(delta.dtype) + delta, transposed)
    return magnitude.flatten().to(norms.dtype) / norms


def dora_weight_change(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor,
                       transposed: bool) -> torch.Tensor:
    """W' - W = f * (W + delta) - W in delta's dtype: what merging a DoRA adapter adds to ``weight``.

    Every adapter's change is taken against the same unmerged W, as the forward computes them, so
    merging any set of adapters gives the weight whose output the unmerged layer gave."""
    weight = weight.to(delta.dtype)
    factor = per_unit(dora_factor(weight, delta, magnitude, transposed), weight, transposed)
    return factor * (weight + delta) - weight


def _factor(layer, adapter) -> torch.Tensor:
    """f for ``adapter`` on ``layer``: computed afresh where autograd records (m's gradient flows
    through it), else the kept one while its inputs are unchanged."""
    recording = torch.is_grad_enabled()
    key = None
    if not recording:
        tensors = (adapter.lora_A, adapter.lora_B, adapter.magnitude, layer.weight)
        key = tuple((t._version, t.data_ptr(), t.dtype) for t in tensors)
        kept = adapter.dora_factor_cache
        if kept is not None and kept[0] == key:
            return kept[1]
    with torch.no_grad():  # B @ A only feeds the norm, which backward treats as a constant
        delta = layer._delta_weight(adapter)
    factor = dora_factor(layer.weight, delta, adapter.magnitude, layer.weight_is_transposed)
    adapter.dora_factor_cache = None if recording else (key, factor)
    return factor


def dora_output(layer, result: torch.Tensor, x: torch.Tensor, adapter, base: torch.Tensor) -> torch.Tensor:
    """``result`` plus what DoRA ``adapter`` changes in the output of ``layer`` (a LoraLayer whose
    family supports DoRA); ``base`` is the base layer's own output for x, bias included."""
    factor = layer.per_output_channel(_factor(layer, adapter).to(result.dtype))
    dropped = adapter.dropout(x)
    if dropped is x:  # no dropout (or not training): Wx is the base output without its bias
        weighted = base if layer.bias is None else base - layer.per_output_channel(layer.bias.to(base.dtype))
    else:
        weighted = layer.weight_output(dropped)
    # result + (f - 1) Wx + f s B(A(x)), written so that backward keeps one (..., out) tensor per
    # layer (Wx + sB(A(x)), for m's gradient) instead of two
    return result - weighted + factor * (weighted + layer.adapter_update(dropped, adapter))
