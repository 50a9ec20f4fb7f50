"""Length-bucketed batches: every example once per epoch, reproducible, little padding."""

import random

import torch

from lorakit.data.batches import (
    MIN_SHARED_PREFIX,
    collate,
    epoch_batches,
    sequential_batches,
)
from lorakit.data.tokenize import IGNORE, TokenizedExample


def test_each_epoch_covers_every_example_once_in_a_reproducible_order():
    lengths = [random.Random(i).randint(5, 200) for i in range(203)]
    first = epoch_batches(lengths, 8, seed=3, epoch=0)
    assert sorted(i for batch in first for i in batch) == list(range(203))
    assert first == epoch_batches(lengths, 8, seed=3, epoch=0)
    assert first != epoch_batches(lengths, 8, seed=3, epoch=1)
    assert first != epoch_batches(lengths, 8, seed=4, epoch=0)


def test_bucketing_pads_far_less_than_random_batches():
    lengths = [random.Random(i).randint(5, 200) for i in range(512)]

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    order = list(range(512))
    random.Random(0).shuffle(order)
    unbucketed = [order[i:i + 8] for i in range(0, 512, 8)]
    assert padding(epoch_batches(lengths, 8, seed=0, epoch=0)) < padding(unbucketed) / 4
    assert sorted(i for b in sequential_batches(lengths, 8) for i in b) == list(range(512))


def test_collate_pads_right_and_counts_shifted_loss_tokens():
    a = TokenizedExample([5, 6, 7, 8], [IGNORE, IGNORE, 7, 8])
    b = TokenizedExample([5, 9], [IGNORE, 9])
    batch = collate([a, b], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8], [5, 9, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch.labels.tolist() == [[IGNORE, IGNORE, 7, 8], [IGNORE, 9, IGNORE, IGNORE]]
    assert batch.loss_tokens == 3 == int((batch.labels[:, 1:] != IGNORE).sum())
    assert batch.input_ids.dtype == torch.long


def test_the_shared_prefix_stops_where_rows_differ_or_a_label_is_predicted():
    n = MIN_SHARED_PREFIX + 4
    common = list(range(10, 10 + n))

    def row(tail, prompt):  # `prompt` tokens carry no label
        ids = common + tail
        return TokenizedExample(ids, [IGNORE] * prompt + ids[prompt:])

    assert collate([row([1, 2, 5, 6], n + 3), row([1, 3, 4, 6], n + 3)], 0).shared_prefix == n + 1  # rows part there
    # The first label is token n - 1, predicted by position n - 2: the prefix ends before that position.
    assert collate([row([1, 2], n + 1), row([1, 3], n - 1)], 0).shared_prefix == n - 2
    assert collate([row([1, 2], n + 1)], 0).shared_prefix == 0  # one row: nothing to share
    short = TokenizedExample(common[:MIN_SHARED_PREFIX - 1] + [7, 8], [IGNORE] * MIN_SHARED_PREFIX + [8])
    assert collate([row([1], n + 1), short], 0).shared_prefix == 0  # too short to be worth it
