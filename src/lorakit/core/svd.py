"""Truncated SVD: the best rank-r approximation of a weight (Eckart-Young), and choosing r.

A (out, in) weight W = U S V^T is approximated by its r largest singular values,
W_r = (U_r S_r^1/2) (S_r^1/2 V_r^T) = up @ down, with up (out, r) and down (r, in): the two factors
have r * (out + in) numbers instead of out * in, and ||W - W_r||_F^2 is the sum of the dropped S^2.
"""

from __future__ import annotations

import torch

from lorakit.errors import ConfigError


def singular_values(weight: torch.Tensor) -> torch.Tensor:
    """W's singular values, largest first, computed in float64."""
    return torch.linalg.svdvals(weight.detach().double())


def rank_for_energy(values: torch.Tensor, energy: float) -> int:
    """The smallest r whose r largest singular values hold ``energy`` of sum(S^2) (W's squared
    Frobenius norm): the relative error ||W - W_r||_F / ||W||_F is then at most sqrt(1 - energy)."""
    if not 0 < energy <= 1:
        raise ConfigError(f"energy={energy}: the fraction of the squared singular values kept, in (0, 1]")
    kept = torch.cumsum(values.double() ** 2, 0) / (values.double() ** 2).sum()
    # The tolerance keeps energy=1.0 at full rank despite float rounding in the cumulative sum.
    return min(int((kept < energy - 1e-12).sum()) + 1, len(values))


def low_rank_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up (out, r), down (r, in)) with up @ down the best rank-``rank`` approximation of ``weight``,
    each factor carrying the square root of the singular values; in the weight's dtype."""
    if not 1 <= rank <= min(weight.shape):
        raise ConfigError(f"rank {rank} for a {tuple(weight.shape)} weight: use 1 to {min(weight.shape)}")
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    root = s[:rank].sqrt()
    up = u[:, :rank] * root  # (out, r)
    down = root[:, None] * vh[:rank]  # (r, in)
    return up.to(weight.dtype), down.to(weight.dtype)


def saves_parameters(out_features: int, in_features: int, rank: int) -> bool:
    """Whether rank-``rank`` factors are smaller than the dense (out, in) weight."""
    return rank * (out_features + in_features) < out_features * in_features


def product_svd(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact SVD of a LoRA update s * B @ A, in float64, without forming the (out, in) product.

    A (r, in...) and B (out, r...) as in adapter files (a convolution's kernel dimensions folded
    into in). With B = Qb Rb and A^T = Qa Ra (thin QRs), s * B @ A = Qb (s Rb Ra^T) Qa^T, so the SVD of
    the small r x r middle, U' S V'^T, gives U = Qb U' (out, r), S (r,) and V^T = V'^T Qa^T (r, in):
    O(r^2 (out + in)) work instead of O(out * in * min(out, in)).
    """
    a = lora_A.detach().double().flatten(1)  # (r, in)
    b = lora_B.detach().double().flatten(1)  # (out, r)
    qb, rb = torch.linalg.qr(b)  # (out, r), (r, r)
    qa, ra = torch.linalg.qr(a.T)  # (in, r), (r, r)
    u, s, vh = torch.linalg.svd(scaling * rb @ ra.T)
    return qb @ u, s, vh @ qa.T
