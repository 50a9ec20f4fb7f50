"""The causal-LM loss, computing the output head only where a position carries loss.

A model's output head maps every position to vocabulary logits: for SmolLM2 that is a 576 x 49,152
matmul per token, plus a softmax over 49,152 entries, about a fifth of the model's forward work.
In supervised fine-tuning most positions are prompt and carry no loss, so we run the model's
backbone, keep the hidden states of the positions that predict a labelled token, and apply the
head to those alone. The result is the same sum of per-token losses as the full computation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.data.batches import Batch, collate, sequential_batches
from lorakit.data.tokenize import IGNORE, TokenizedExample

# Config fields of models whose logits are more than head(hidden): those take the full path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def loss_sum(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Sum over the batch of the cross-entropy of every labelled token (a 0-d float32 tensor)."""
    targets = batch.labels[:, 1:]  # (B, T-1): position t predicts token t+1
    keep = targets != IGNORE
    backbone, head = _backbone_and_head(model)
    if backbone is None:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return F.cross_entropy(logits[:, :-1][keep].float(), targets[keep], reduction="sum")
    hidden = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      use_cache=False).last_hidden_state  # (B, T, H)
    logits = head(hidden[:, :-1][keep])  # (N, V), N = labelled positions only
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum")


def _backbone_and_head(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """(backbone, head) of a transformers causal LM whose logits are head(last hidden state);
    (None, None) when that cannot be established, and the caller takes the full forward."""
    config = getattr(model, "config", None)
    get_head = getattr(model, "get_output_embeddings", None)
    backbone = getattr(model, "base_model", None)
    if config is None or get_head is None or backbone is None or backbone is model:
        return None, None
    if any(getattr(config, name, None) not in (None, 1.0) for name in _LOGIT_TRANSFORMS):
        return None, None
    head = get_head()
    return (backbone, head) if isinstance(head, nn.Module) else (None, None)


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
