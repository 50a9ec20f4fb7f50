"""Greedy answers checked against the references in one teacher-forced pass, which also gives the loss.

Greedy decoding is causal: its k-th answer token is the argmax of the logits after the prompt and
its first k-1 answer tokens. So one forward pass over prompt + reference answer, the same pass that
computes the loss on the reference, shows how far greedy decoding reproduces the reference: while the
argmax at each answer position equals the reference's next token, greedy decoding would have emitted
exactly that token. Where the reference ends in end-of-sequence and every argmax agreed, the greedy
answer is the reference, with no decoding at all; where they part, the greedy answer begins with the
agreed tokens and the argmax that differed, and decoding goes on from there. A well-trained adapter
agrees on most rows, so evaluation costs about one forward pass instead of generation plus a pass for
the loss.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.data.batches import collate, sequential_batches
from lorakit.data.records import DataError
from lorakit.data.tokenize import IGNORE, TokenizedExample
from lorakit.models.head_loss import labelled_scores


@dataclass
class GreedyStart:
    prompt: list[int]  # token ids before the answer
    tokens: list[int]  # the greedy answer's first tokens, end-of-sequence left out
    finished: bool  # greedy decoding stops after `tokens`


def answer_span(example: TokenizedExample) -> tuple[int, int]:
    """(start, end): the example's last target span, the answer to score, is input_ids[start:end]."""
    labelled = [i for i, label in enumerate(example.labels) if label != IGNORE]
    start = end = labelled[-1] + 1 if labelled else 0
    while start > 0 and example.labels[start - 1] != IGNORE:
        start -= 1
    if start == 0:
        raise DataError("an example has nothing before its answer; give each example a prompt to answer")
    return start, end


def agreed_prefix(reference: list[int], predicted: list[int], eos_id: int) -> tuple[list[int], bool]:
    """(greedy's first answer tokens, whether greedy stops there), from ``predicted[j]``: the argmax
    at the position that predicts ``reference[j]``, teacher-forced on the reference."""
    tokens: list[int] = []
    for expected, greedy in zip(reference, predicted, strict=True):
        if greedy != expected:
            return (tokens, True) if greedy == eos_id else (tokens + [greedy], False)
        if greedy == eos_id:
            return tokens, True
        tokens.append(greedy)
    return tokens, False  # the reference ran out before end-of-sequence: greedy goes on


@torch.no_grad()
def check_references(model: nn.Module, examples: list[TokenizedExample], batch_size: int, pad_id: int,
                     eos_id: int, progress: bool = False) -> tuple[float, list[GreedyStart]]:
    """(mean loss per target token, each example's greedy start), in eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    starts: list[GreedyStart | None] = [None] * len(examples)
    batches = sequential_batches([len(e) for e in examples], batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="teacher-forced pass", unit="batch", file=sys.stderr, leave=False)
    for rows in batches:
        batch = collate([examples[i] for i in rows], pad_id).to(device)
        loss, predictions, _ = labelled_scores(model, batch)  # predictions (N,): rows in order, left to right
        total += float(loss)
        count += batch.loss_tokens
        per_row = (batch.labels[:, 1:] != IGNORE).sum(dim=1).tolist()
        for i, predicted in zip(rows, predictions.split(per_row), strict=True):
            example = examples[i]
            start, end = answer_span(example)
            reference = example.input_ids[start:end]
            # The answer is the row's last labelled run, so its predictions are the row's last ones.
            tokens, finished = agreed_prefix(reference, predicted[-len(reference):].tolist(), eos_id)
            starts[i] = GreedyStart(example.input_ids[:start], tokens, finished)
    model.train(was_training)
    return total / max(count, 1), starts
