"""The loss that skips the output head where no loss is taken equals the full computation."""

import torch

import lorakit
from lorakit.data.batches import collate
from lorakit.data.tokenize import IGNORE, TokenizedExample
from lorakit.train.loss import evaluate_loss, loss_sum
from tests.conftest import randomize_adapters, tiny_llama


def _batch():
    g = torch.Generator().manual_seed(0)
    rows = []
    for n, prompt in ((12, 7), (9, 3), (5, 4)):
        ids = torch.randint(3, 96, (n,), generator=g).tolist()
        rows.append(TokenizedExample(ids, [IGNORE] * prompt + ids[prompt:]))
    return rows, collate(rows, pad_id=0)


def _model():
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapters(model)
    return model


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
