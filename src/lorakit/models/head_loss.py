"""The output head and the cross-entropy over it in chunks of rows, the head's logits never whole.

The logits of a batch's labelled positions are (N, V): for SmolLM2's 49,152-entry vocabulary and
the ~300 target tokens of a demo batch, 59 MiB in float32, written by the head, cast, normalised
(log-softmax), read back for the gradient, and as large again in backward (the gradient of the
log-softmax, its cast, the zeros the loss's gradient starts from). Chunks of at most CHUNK_ELEMENTS
logits keep that memory bounded instead. In training, each chunk's gradient with respect to its hidden
states is computed in the forward, while its logits are at hand: the loss is a sum, so
d loss / d hidden = (softmax - one-hot) @ W for every row, scaled in backward by the upstream
gradient (a scalar). Backward then does no work on the head at all, and nothing is recomputed.

The arithmetic is autocast's: the head's product in the autocast dtype (logits rounded to it),
softmax and the loss in float32, the gradient cast to the product's dtype before its product with
W. Only a frozen head without LoRA takes this path (a trained head needs d loss / d W, which the
plain path computes); others, and models whose logits are more than head(hidden), take the plain
one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.data.batches import Batch
from lorakit.models.forward import labelled_states
from lorakit.quant.linear import product_dtype

# Logits per chunk, at most: 30 MiB of float32 (160 rows of a 49,152-entry vocabulary), under
# glibc's 32 MiB ceiling for serving a block from the heap instead of mapping it afresh. Each chunk
# reads the whole head weight, so fewer, larger chunks pay: on a 2-core AVX2 EPYC in float32 a demo
# batch's head and loss (270 targets) took 312 ms against 462 ms in chunks of 8 MiB (2026-12-03).
CHUNK_ELEMENTS = 30 * 2**18


def labelled_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Sum over the batch of the cross-entropy of every labelled token (a 0-d float32 tensor)."""
    states, targets, head = labelled_states(model, batch)
    if head is None:  # states are the logits
        return F.cross_entropy(states.float(), targets, reduction="sum")
    if not _fusable(head):
        return F.cross_entropy(head(states).float(), targets, reduction="sum")
    return _HeadCrossEntropy.apply(states, head.weight, targets, product_dtype(states))


@torch.no_grad()
def labelled_scores(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the summed cross-entropy of the labelled tokens as a 0-d float32 tensor, the argmax at each
    position that predicts one (N,), their targets (N,)), rows in order, left to right."""
    states, targets, head = labelled_states(model, batch)
    if head is None or not _fusable(head):
        logits = states if head is None else head(states)
        return F.cross_entropy(logits.float(), targets, reduction="sum"), logits.argmax(dim=-1), targets
    weight = head.weight.to(product_dtype(states))
    total = torch.zeros((), dtype=torch.float32, device=states.device)
    predicted = [targets[:0]]
    for rows in _chunks(states.shape[0], weight.shape[0]):
        logits = _chunk_logits(states[rows], weight)
        total += F.cross_entropy(logits, targets[rows], reduction="sum")
        predicted.append(logits.argmax(dim=-1))
    return total, torch.cat(predicted), targets


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
        weight = weight.to(dtype)  # a no-op where training holds frozen weights in the compute dtype
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for rows in _chunks(hidden.shape[0], weight.shape[0]):
            logits = _chunk_logits(hidden[rows], weight)  # (n, V) float32
            chosen = targets[rows]
            log_total = torch.logsumexp(logits, dim=-1)  # (n,)
            total += (log_total - logits.gather(1, chosen[:, None]).squeeze(1)).sum()
            if grad is not None:
                # d loss / d logits = softmax - one-hot, computed in place over the chunk's logits.
                probabilities = logits.sub_(log_total[:, None]).exp_()
                probabilities[torch.arange(len(chosen), device=chosen.device), chosen] -= 1
                grad[rows] = (probabilities.to(dtype) @ weight).to(hidden.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, upstream: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * upstream.to(grad.dtype), None, None, None


def _fusable(head: nn.Module) -> bool:
    """A plain, frozen linear head: lorakit's own layers (LoRA on the head) and trained heads are not."""
    return type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(n, V) float32 logits of a chunk, the product in ``weight``'s dtype as autocast would run it."""
    with torch.autocast(hidden.device.type, enabled=False):
        return (hidden.to(weight.dtype) @ weight.T).float()


def _chunks(rows: int, vocabulary: int) -> list[slice]:
    """As few chunks of at most CHUNK_ELEMENTS logits as hold ``rows``, of equal size: a last chunk of
    a few rows would cost nearly a full one (see CHUNK_ELEMENTS)."""
    count = -(-rows // max(1, CHUNK_ELEMENTS // vocabulary))
    return [slice(i * rows // count, (i + 1) * rows // count) for i in range(count)]  # sizes within one
