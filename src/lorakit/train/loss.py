"""The causal-LM loss: the sum of per-token cross-entropies over the labelled positions, with the
output head computed only there, in chunks (models/forward.py, models/head_loss.py)."""

from __future__ import annotations

import torch
from torch import nn

from lorakit.data.batches import Batch, collate, sequential_batches
from lorakit.data.tokenize import TokenizedExample
from lorakit.models.head_loss import labelled_loss


def loss_sum(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Sum over the batch of the cross-entropy of every labelled token (a 0-d float32 tensor)."""
    return labelled_loss(model, batch)


@torch.no_grad()
def evaluate_loss(model: nn.Module, examples: list[TokenizedExample], batch_size: int, pad_id: int,
                  device: torch.device) -> float:
    """Mean cross-entropy per target token over ``examples``, in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for rows in sequential_batches([len(e) for e in examples], batch_size):
        batch = collate([examples[i] for i in rows], pad_id).to(device)
        total += float(loss_sum(model, batch))
        tokens += batch.loss_tokens
    model.train(was_training)
    return total / max(tokens, 1)
