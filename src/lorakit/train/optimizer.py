"""The optimizer every method trains with: AdamW over the method's slots, with LoRA+ as an option.

LoRA+ (Hayou et al. 2024): B learns at ``ratio`` times A's rate (16 is the paper's default), since
with B starting at zero, one shared rate is either too slow for B or too fast for A. The ratio is
kept on B's param group, so the schedule (``set_learning_rate``) scales both groups alike. PEFT's
``create_loraplus_optimizer`` does the same for linear layers and gives embedding adapters a fixed
small rate of their own; here an embedding's B takes the ratio like any other B.
"""

from __future__ import annotations

import torch
from torch import nn

LR_RATIO = "lorakit_lr_ratio"  # a param group's rate as a multiple of the schedule's


def make_optimizer(slots: dict[str, nn.Parameter], lr: float, weight_decay: float,
                   loraplus_lr_ratio: float = 0.0) -> torch.optim.AdamW:
    """AdamW over ``slots`` (file key -> Parameter); with ``loraplus_lr_ratio``, LoRA's B matrices in a
    group of their own at that multiple of ``lr``."""
    if not loraplus_lr_ratio:
        return torch.optim.AdamW([{"params": list(slots.values()), LR_RATIO: 1.0}], lr=lr, weight_decay=weight_decay)
    is_b = [key.endswith((".lora_B.weight", ".lora_embedding_B")) for key in slots]
    groups = [{"params": [p for p, b in zip(slots.values(), is_b) if not b], LR_RATIO: 1.0},
              {"params": [p for p, b in zip(slots.values(), is_b) if b], LR_RATIO: loraplus_lr_ratio}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, weight_decay=weight_decay)
    set_learning_rate(optimizer, lr)
    return optimizer


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's rate ``lr`` for this step, times each group's own ratio."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get(LR_RATIO, 1.0)
