"""A causal LM's logits where a position carries a label, with the output head only there.

A model's output head maps every position to vocabulary logits: for SmolLM2 that is a 576 x 49,152
matmul per token, plus a softmax over 49,152 entries, about a fifth of the model's forward work.
In supervised fine-tuning and in scoring against references most positions are prompt and carry
no label, so the backbone runs, the hidden states of the positions that predict a labelled token
are kept, and the head is applied to those alone. A prefix every row shares (the chat template's
opening) runs once per batch. Training's loss and evaluation's greedy check both read this, and
apply the head in chunks (models/head_loss.py).
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.core.layers.dropout import RowKeyedDropout
from lorakit.data.batches import Batch
from lorakit.data.tokenize import IGNORE

# Config fields of models whose logits are more than head(hidden): those take the full path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def labelled_states(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, nn.Module | None]:
    """(states, targets (N,), head) for the N positions that predict a labelled token, row by row and
    left to right: their last hidden states (N, H) and the output head that maps them to logits, or,
    for a model whose logits are more than head(hidden), the logits themselves (N, V) and None."""
    targets = batch.labels[:, 1:]  # (B, T-1): position t predicts token t+1
    keep = targets != IGNORE
    backbone, head = _backbone_and_head(model)
    if backbone is None:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return logits[:, :-1][keep], targets[keep], None
    shared = batch.shared_prefix if _prefix_sharing_is_exact(model) else 0
    hidden, shared = _hidden_states(backbone, batch, shared)  # (B, T - shared, H): positions shared..T-1
    # No position before `shared` predicts a label, so keep[:, shared:] holds every kept position.
    return hidden[:, :-1][keep[:, shared:]], targets[keep], head


def _hidden_states(backbone: nn.Module, batch: Batch, shared: int) -> tuple[torch.Tensor, int]:
    """(hidden, start): the backbone's last hidden states from position ``start`` on, which is
    ``shared`` when the backbone keeps a key/value cache, else 0. The shared prefix is run once for
    the batch and its keys and values repeated for every row: the attention inputs every row would
    compute for itself, so the result is the same, and the prefix's compute is paid once."""
    if shared:
        prefix = backbone(input_ids=batch.input_ids[:1, :shared], use_cache=True).cache
        if prefix is not None:
            prefix.batch_repeat_interleave(batch.input_ids.shape[0])
            return backbone(input_ids=batch.input_ids[:, shared:], attention_mask=batch.attention_mask,
                            cache=prefix, use_cache=True).last_hidden_state, shared
    return backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    use_cache=False).last_hidden_state, 0


def _prefix_sharing_is_exact(model: nn.Module) -> bool:
    """Sharing the prefix's computation is exact unless a training pass draws random dropout masks (the
    shared prefix would get one mask for all rows) or checkpoints activations (transformers runs the
    layers without a key/value cache then, so there is no prefix cache to share)."""
    if not model.training:
        return True
    # transformers 5 renamed is_gradient_checkpointing (deprecated) to is_activation_checkpointing.
    flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    if getattr(model, flag, False):
        return False
    return not any(isinstance(m, nn.Dropout | RowKeyedDropout) and m.p > 0 for m in model.modules()) and not any(
        getattr(getattr(model, "config", None), name, 0) for name in ("attention_dropout", "attn_pdrop"))


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
