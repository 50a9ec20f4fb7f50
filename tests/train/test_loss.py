"""The loss that skips the output head where no loss is taken equals the full computation."""

import dataclasses

import pytest
import torch

import lorakit
from lorakit.data.batches import collate
from lorakit.data.tokenize import IGNORE, TokenizedExample
from lorakit.train.loss import evaluate_loss, loss_sum
from tests.conftest import randomize_adapters, tiny_gpt2, tiny_llama


def _batch():
    g = torch.Generator().manual_seed(0)
    rows = []
    for n, prompt in ((12, 7), (9, 3), (5, 4)):
        ids = torch.randint(3, 96, (n,), generator=g).tolist()
        rows.append(TokenizedExample(ids, [IGNORE] * prompt + ids[prompt:]))
    return rows, collate(rows, pad_id=0)


def _prefixed_batch():
    """Rows that open with the same 10 tokens (a system prompt), then differ."""
    g = torch.Generator().manual_seed(1)
    shared = torch.randint(3, 96, (10,), generator=g).tolist()
    rows = []
    for n, prompt in ((9, 4), (14, 6), (6, 2), (11, 11 - 3)):
        ids = shared + torch.randint(3, 96, (n,), generator=g).tolist()
        rows.append(TokenizedExample(ids, [IGNORE] * (10 + prompt) + ids[10 + prompt:]))
    return collate(rows, pad_id=0)


def _model(build=tiny_llama, **lora):
    model = build()
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules="all-linear", **lora))
    randomize_adapters(model)
    return model


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = loss_sum(model, batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in lorakit.lora_parameters(model)]


def test_loss_and_gradients_equal_the_full_logits_path():
    _, batch = _batch()
    model = _model()
    ours = loss_sum(model, batch)
    ours.backward()
    ours_grads = [p.grad.clone() for p in lorakit.lora_parameters(model)]
    model.zero_grad()

    full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
    reference = full.loss * batch.loss_tokens  # transformers' loss is the mean over labelled tokens
    reference.backward()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(ours_grads, [p.grad for p in lorakit.lora_parameters(model)], strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)


def test_a_model_without_a_separate_head_takes_the_full_forward():
    _, batch = _batch()
    model = _model()

    class Wrapped(torch.nn.Module):  # no base_model / get_output_embeddings: the generic path
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, **kwargs):
            return self.inner(**kwargs)

    torch.testing.assert_close(loss_sum(Wrapped(), batch), loss_sum(model, batch), rtol=1e-5, atol=1e-5)


def test_evaluation_loss_is_the_mean_per_target_token_in_eval_mode():
    rows, batch = _batch()
    model = _model().train()
    with torch.no_grad():
        expected = float(loss_sum(model.eval(), batch)) / batch.loss_tokens
    model.train()
    assert abs(evaluate_loss(model, rows, 2, 0, torch.device("cpu")) - expected) < 1e-5
    assert model.training


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_a_shared_prefix_computed_once_gives_the_same_loss_and_gradients(build):
    batch = _prefixed_batch()
    assert batch.shared_prefix == 10
    model = _model(build).train()
    shared_loss, shared_grads = _loss_and_grads(model, batch)
    loss, grads = _loss_and_grads(model, dataclasses.replace(batch, shared_prefix=0))
    torch.testing.assert_close(shared_loss, loss, rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(shared_grads, grads, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)


def test_a_prefix_is_not_shared_while_dropout_draws_masks():
    # Shared, the prefix would take one dropout mask for all rows and draw fewer random numbers.
    batch = _prefixed_batch()
    model = _model(dropout=0.3).train()
    torch.manual_seed(5)
    with_prefix = loss_sum(model, batch)
    torch.manual_seed(5)
    without = loss_sum(model, dataclasses.replace(batch, shared_prefix=0))
    assert torch.equal(with_prefix, without)
