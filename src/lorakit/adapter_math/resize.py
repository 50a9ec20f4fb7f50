"""Truncating an adapter to a lower rank: each layer's best approximation of its update.

The best rank-k approximation of s * B @ A (Eckart-Young) keeps its k largest singular values:
B' = U_k sqrt(S_k / s'), A' = sqrt(S_k / s') V_k^T, with s' the new file's scaling, so that
s' * B' @ A' = U_k S_k V_k^T. The SVD is exact and cheap (core/svd.product_svd never forms the
(out, in) product). The relative error of a layer is sqrt(sum of the dropped S^2 / sum of all S^2).
A DoRA adapter keeps its magnitudes (the direction's norm is taken again from the truncated update).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from lorakit.adapter_math.updates import LayerUpdate
from lorakit.core.config import LoraConfig
from lorakit.core.svd import product_svd, rank_for_energy
from lorakit.errors import ConfigError


@dataclass
class Truncation:
    path: str
    old_rank: int
    new_rank: int
    relative_error: float  # ||delta - delta_k||_F / ||delta||_F


def resize(config: LoraConfig, updates: list[LayerUpdate], rank: int | None = None, energy: float | None = None,
           ) -> tuple[LoraConfig, list[LayerUpdate], list[Truncation]]:
    """Each layer cut to ``rank`` (at most its own), or to the fewest singular values holding ``energy``
    of its update's energy. Returns the new config (r = the largest rank kept; per-layer ranks in
    rank_pattern when they differ), the new updates and what each layer lost."""
    if (rank is None) == (energy is None):
        raise ConfigError("give one of --rank R or --energy E")
    if rank is not None and rank < 1:
        raise ConfigError(f"--rank must be at least 1, got {rank}")
    kept: list[tuple[LayerUpdate, torch.Tensor, torch.Tensor, torch.Tensor, int]] = []
    report: list[Truncation] = []
    for update in updates:
        u, s, vh = product_svd(update.lora_A, update.lora_B, update.scaling)
        if rank is not None:
            k = min(rank, update.r, len(s))  # no more than the update can have
        else:
            k = rank_for_energy(s, energy) if s.any() else 1
        total = float((s ** 2).sum())
        error = math.sqrt(float((s[k:] ** 2).sum()) / total) if total else 0.0
        kept.append((update, u, s, vh, k))
        report.append(Truncation(update.path, update.r, k, error))
    ranks = {k for *_, k in kept}
    new_r = max(ranks)
    pattern = {} if len(ranks) == 1 else {re.escape(t.path): t.new_rank for t in report if t.new_rank != new_r}
    new_config = config.replace(r=new_r, alpha=float(new_r), use_rslora=False, rank_pattern=pattern,
                                alpha_pattern={}, init="default")
    resized = []
    for update, u, s, vh, k in kept:
        scaling = new_config.scaling_for(update.path)
        root = torch.sqrt(s[:k] / scaling)  # (k,)
        a = (root[:, None] * vh[:k]).reshape(k, *update.lora_A.shape[1:])  # (k, in...)
        b = (u[:, :k] * root[None, :]).reshape(update.lora_B.shape[0], k, *update.lora_B.shape[2:])  # (out, k, 1...)
        resized.append(LayerUpdate(update.path, a.float(), b.float(), scaling, update.embedding, update.magnitude))
    return new_config, resized, report
