"""Length-bucketed batches. Examples of similar length go together, so a batch is padded only to
the longest of its rows and little compute is spent on padding; the order is a pure function of
(seed, epoch), which is what lets a resumed run see exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from lorakit.data.tokenize import IGNORE, TokenizedExample

BUCKET_BATCHES = 16  # how many batches' worth of examples are sorted by length together
# A shared prefix shorter than this is computed per row: an extra forward call costs more than it saves.
MIN_SHARED_PREFIX = 8


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T), right-padded
    attention_mask: torch.Tensor  # (B, T), 1 on real tokens
    labels: torch.Tensor  # (B, T), IGNORE on padding and context
    loss_tokens: int  # positions that carry loss (after the causal shift)
    shared_prefix: int = 0  # leading tokens every row has in common, none of which predicts a label

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                     self.loss_tokens, self.shared_prefix)


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Index lists, one per batch: shuffled, sorted by length within buckets, batches shuffled."""
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    bucket = batch_size * BUCKET_BATCHES
    batches = []
    for start in range(0, len(order), bucket):
        chunk = sorted(order[start:start + bucket], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def sequential_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Batches for evaluation: sorted by length, every example once."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def collate(examples: list[TokenizedExample], pad_id: int) -> Batch:
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return Batch(ids, mask, labels, int((labels[:, 1:] != IGNORE).sum()), shared_prefix(examples))


def shared_prefix(examples: list[TokenizedExample]) -> int:
    """How many leading tokens all rows share (a system prompt, a chat header) such that no position
    in them predicts a labelled token; 0 for a single row or a prefix too short to be worth sharing."""
    if len(examples) < 2:
        return 0
    first = examples[0].input_ids
    # Position t predicts token t + 1, so the prefix ends before the position that predicts the first label.
    limit = min(next((i for i, label in enumerate(e.labels) if label != IGNORE), len(e)) - 1 for e in examples)
    length = 0
    while length < limit and all(e.input_ids[length] == first[length] for e in examples):
        length += 1
    return length if length >= MIN_SHARED_PREFIX else 0
