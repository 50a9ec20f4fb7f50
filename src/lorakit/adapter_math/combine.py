"""Several adapters into one: PEFT's ``add_weighted_adapter``, on adapter files.

With w_i the weights, s_i the adapters' scalings and, per layer, the adapters that adapt it:
- ``cat``: A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...]: exactly sum_i w_i s_i B_i A_i, of
  rank sum r_i (a layer some adapters skip is padded with zero rows and columns).
- ``svd``: the exact weighted sum of the updates, truncated to ``svd_rank`` (default: the largest r)
  by its SVD: B = U_k S_k, A = V_k^T.
- ``linear``: A = sum_i sign(w_i) sqrt(|w_i s_i|) A_i, B = sum_i sqrt(|w_i s_i|) B_i (equal ranks): cheap,
  and only an approximation (cross terms B_i A_j appear), as PEFT warns.
- ``ties`` / ``dare_linear`` / ``dare_ties``: the same mix over A and over B, each adapter's matrix
  first pruned to ``density`` of its entries (TIES: the largest magnitudes, then an election of each
  entry's sign; DARE: entries kept at random with probability density and rescaled by 1/density;
  DARE-TIES: both). PEFT's rules, including the sign election on the unweighted pruned tensors.
The result has scaling 1 (alpha = r) so its matrices carry the whole update. DoRA adapters (whose
magnitudes have no such sum) and adapters of whole modules or biases are refused.
"""

from __future__ import annotations

import math

import torch

from lorakit.adapter_math.updates import LayerUpdate
from lorakit.core.config import LoraConfig
from lorakit.errors import ConfigError

METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")


def combine(configs: list[LoraConfig], adapters: list[list[LayerUpdate]], weights: list[float], method: str,
            svd_rank: int | None = None, density: float = 1.0, seed: int = 0) -> tuple[LoraConfig, list[LayerUpdate]]:
    """One adapter from ``adapters`` (each its list of layer updates) mixed by ``weights``."""
    _check(configs, adapters, weights, method, density)
    ranks = [max(u.r for u in updates) for updates in adapters]
    method = "linear" if len(adapters) == 1 else method  # as PEFT: one adapter is only reweighted
    if method == "cat":
        new_rank = sum(ranks)
    elif method == "svd":
        new_rank = svd_rank or max(ranks)
    else:
        if len({u.r for updates in adapters for u in updates}) != 1:
            raise ConfigError(f"method {method} needs every adapter at one rank (they have {sorted(set(ranks))}); "
                              "use svd or cat")
        new_rank = ranks[0]
    generator = torch.Generator().manual_seed(seed)  # DARE's random pruning, reproducible
    by_path: dict[str, list[tuple[float, LayerUpdate]]] = {}
    for weight, updates in zip(weights, adapters):
        for update in updates:
            by_path.setdefault(update.path, []).append((weight, update))
    combined = []
    for path in sorted(by_path):
        pieces = by_path[path]
        first = pieces[0][1]
        if method == "cat":
            a = torch.cat([w * u.scaling * u.lora_A.double() for w, u in pieces])
            b = torch.cat([u.lora_B.double() for _, u in pieces], dim=1)
            a, b = _pad(a, b, new_rank)
        elif method == "svd":
            a, b = _svd(pieces, new_rank)
        else:
            a, b = _mix(pieces, method, density, generator)
        combined.append(LayerUpdate(path, a.float(), b.float(), 1.0, first.embedding))
    targets = tuple(u.path for u in combined)
    config = configs[0].replace(r=new_rank, alpha=float(new_rank), use_rslora=False, rank_pattern={},
                                alpha_pattern={}, target_modules=targets, exclude_modules=None, init="default")
    return config, combined


def _check(configs: list[LoraConfig], adapters: list[list[LayerUpdate]], weights: list[float], method: str,
           density: float) -> None:
    if method not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}; got {method!r}")
    if len(weights) != len(adapters):
        raise ConfigError(f"{len(adapters)} adapters but {len(weights)} weights; give one weight per adapter")
    if any(not math.isfinite(w) for w in weights):
        raise ConfigError("weights must be finite numbers")
    if not 0 < density <= 1:
        raise ConfigError(f"--density is the fraction of entries kept, in (0, 1]; got {density}")
    if any(c.use_dora for c in configs):
        raise ConfigError("DoRA adapters do not combine (their magnitudes have no weighted sum); merge them instead")
    if len({(c.qalora_group_size, c.qalora_bits) for c in configs}) > 1:
        raise ConfigError("QA-LoRA and plain adapters (or QA-LoRA ones of different groups) do not combine")
    bases = {c.base_model_name_or_path for c in configs if c.base_model_name_or_path}
    if len(bases) > 1:
        raise ConfigError(f"the adapters were trained on different base models ({', '.join(sorted(bases))})")


def _pad(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (k, in...) and B (out, k...) with zero rows of A and columns of B up to ``rank``."""
    extra = rank - a.shape[0]
    if extra <= 0:
        return a, b
    return (torch.cat([a, a.new_zeros(extra, *a.shape[1:])]),
            torch.cat([b, b.new_zeros(b.shape[0], extra, *b.shape[2:])], dim=1))


def _svd(pieces: list[tuple[float, LayerUpdate]], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    first = pieces[0][1]
    delta = sum(w * u.delta() for w, u in pieces)  # (out, in * k...)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, len(s))
    a = vh[:k].reshape(k, *first.lora_A.shape[1:])
    b = (u[:, :k] * s[:k]).reshape(first.lora_B.shape[0], k, *first.lora_B.shape[2:])
    return _pad(a, b, rank)


def _mix(pieces: list[tuple[float, LayerUpdate]], method: str, density: float,
         generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    signed = torch.tensor([math.copysign(math.sqrt(abs(w * u.scaling)), w * u.scaling) for w, u in pieces],
                          dtype=torch.float64)
    plain = signed.abs()
    a = _merge([u.lora_A.double() for _, u in pieces], signed, method, density, generator)
    b = _merge([u.lora_B.double() for _, u in pieces], plain, method, density, generator)
    return a, b


def _merge(tensors: list[torch.Tensor], weights: torch.Tensor, method: str, density: float,
           generator: torch.Generator) -> torch.Tensor:
    """sum_i weights_i * tensors_i after the method's pruning (and TIES' sign election)."""
    if method in ("ties", "dare_linear", "dare_ties") and density < 1:
        prune = _prune_magnitude if method == "ties" else _prune_random
        tensors = [prune(t, density, generator) for t in tensors]
    stacked = torch.stack(tensors)  # (n, ...)
    weighted = stacked * weights.view(-1, *(1,) * (stacked.dim() - 1))
    if method not in ("ties", "dare_ties"):
        return weighted.sum(0)
    majority = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)  # elected on the unweighted tensors, as PEFT does
    agrees = stacked.sign() == majority
    return (weighted * agrees).sum(0) / agrees.sum(0).clamp(min=1)


def _prune_magnitude(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    k = int(density * tensor.numel())
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype)
    mask[tensor.abs().flatten().topk(k).indices] = 1
    return tensor * mask.view(tensor.shape)


def _prune_random(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    keep = torch.rand(tensor.shape, generator=generator, dtype=torch.float64) < density
    return tensor * keep / density
