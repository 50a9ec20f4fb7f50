"""The output head and cross-entropy in chunks, gradients computed in the forward, equal the plain
head-then-cross-entropy computation: loss, gradients, argmax; under autocast too."""

import pytest
import torch
import torch.nn.functional as F

import lorakit
from lorakit.data.batches import collate
from lorakit.data.tokenize import IGNORE, TokenizedExample
from lorakit.models import head_loss
from lorakit.models.forward import labelled_states
from lorakit.models.head_loss import labelled_loss, labelled_scores
from tests.conftest import randomize_adapters, tiny_llama


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    # 3 rows of the tiny model's 96-entry vocabulary per chunk: a batch's 20 targets take 7 chunks.
    monkeypatch.setattr(head_loss, "CHUNK_ELEMENTS", 3 * 96)


def _batch():
    g = torch.Generator().manual_seed(0)
    rows = []
    for n, prompt in ((12, 4), (9, 3), (8, 4)):
        ids = torch.randint(3, 96, (n,), generator=g).tolist()
        rows.append(TokenizedExample(ids, [IGNORE] * prompt + ids[prompt:]))
    return collate(rows, pad_id=0)


def _model():
    torch.manual_seed(0)
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules="all-linear"))
    lorakit.mark_only_lora_as_trainable(model)
    randomize_adapters(model)
    return model


def _plain_loss(model, batch):
    states, targets, head = labelled_states(model, batch)
    return F.cross_entropy(head(states).float(), targets, reduction="sum")


def _loss_and_grads(model, loss_of, batch, scale=1.0):
    model.zero_grad()
    loss = loss_of(model, batch)
    (loss * scale).backward()
    return loss.detach(), [p.grad.clone() for p in lorakit.lora_parameters(model)]


@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_chunked_loss_and_gradients_equal_the_plain_head(scale):
    batch, model = _batch(), _model()
    assert head_loss._fusable(model.get_output_embeddings())
    loss, grads = _loss_and_grads(model, labelled_loss, batch, scale)
    plain, plain_grads = _loss_and_grads(model, _plain_loss, batch, scale)
    assert batch.loss_tokens > 2 * 3  # several chunks
    torch.testing.assert_close(loss, plain, rtol=1e-6, atol=1e-5)
    for mine, theirs in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)


def test_under_bfloat16_autocast_it_is_autocasts_arithmetic():
    batch, model = _batch(), _model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = _loss_and_grads(model, labelled_loss, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, plain_grads = _loss_and_grads(model, _plain_loss, batch)
    # The same products, rounded alike; log-sum-exp against log-softmax differ in float32 only.
    torch.testing.assert_close(loss, plain, rtol=1e-5, atol=1e-4)
    for mine, theirs in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=2e-2, atol=1e-4)


def test_scores_give_the_plain_loss_and_argmax():
    batch, model = _batch(), _model()
    with torch.no_grad():
        states, targets, head = labelled_states(model, batch)
        logits = head(states)
    loss, predicted, scored_targets = labelled_scores(model, batch)
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets, reduction="sum"), rtol=1e-6, atol=1e-5)
    assert torch.equal(predicted, logits.argmax(dim=-1))
    assert torch.equal(scored_targets, targets)


def test_a_trained_head_takes_the_plain_path_and_gets_its_gradient():
    batch, model = _batch(), _model()
    head = model.get_output_embeddings()
    head.weight.requires_grad_(True)
    assert not head_loss._fusable(head)
    labelled_loss(model, batch).backward()
    expected = head.weight.grad.clone()
    head.weight.grad = None
    _plain_loss(model, batch).backward()
    torch.testing.assert_close(expected, head.weight.grad)


def test_a_batch_without_labelled_tokens_has_zero_loss_and_takes_part_in_backward():
    model = _model()
    batch = collate([TokenizedExample([5, 6, 7, 8], [IGNORE] * 4)], pad_id=0)
    loss = labelled_loss(model, batch)
    assert float(loss.detach()) == 0.0
    (loss * 0.5).backward()  # a process with an empty share still runs backward
    assert all(float(p.grad.abs().sum()) == 0.0 for p in lorakit.lora_parameters(model))
    total, predicted, targets = labelled_scores(model, batch)
    assert float(total) == 0.0 and predicted.numel() == 0 and targets.numel() == 0


@pytest.mark.parametrize("rows", [0, 1, 2, 3, 7, 20, 21])
def test_chunks_are_as_few_as_fit_and_even(rows):
    # At most 3 rows of 96 logits a chunk (the fixture): as few chunks as that allows, every row
    # once and in order, sizes within one of each other (no chunk of a few rows left at the end).
    chunks = head_loss._chunks(rows, 96)
    covered = [i for c in chunks for i in range(rows)[c]]
    sizes = [len(range(rows)[c]) for c in chunks]
    assert covered == list(range(rows))
    assert len(chunks) == -(-rows // 3)
    assert all(0 < s <= 3 for s in sizes) and (not sizes or max(sizes) - min(sizes) <= 1)
