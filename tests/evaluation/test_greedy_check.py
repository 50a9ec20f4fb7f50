"""Greedy answers read off one teacher-forced pass over the references equal greedy decoding's."""

import pytest
import torch

from lorakit.data.tokenize import (
    IGNORE,
    TokenizedExample,
    padding_id,
    prompt_text,
    tokenize_record,
)
from lorakit.evaluation.evaluate import score_model
from lorakit.evaluation.greedy_check import agreed_prefix, answer_span
from lorakit.generation.generate import generate_texts
from lorakit.models.base import load_for_inference
from lorakit.train.loss import evaluate_loss

EOS = 2


@pytest.mark.parametrize(("reference", "predicted", "expected"), [
    ([5, 6, EOS], [5, 6, EOS], ([5, 6], True)),  # greedy says the reference, end-of-sequence included
    ([5, 6, EOS], [5, 7, 9], ([5, 7], False)),  # parts at the second token: decoding goes on from 7
    ([5, 6, EOS], [5, EOS, 9], ([5], True)),  # greedy ends before the reference does
    ([5, 6], [5, 6], ([5, 6], False)),  # a reference without end-of-sequence: greedy goes on after it
    ([5, EOS, 8], [5, EOS, 4], ([5], True)),  # nothing after greedy's end-of-sequence counts
])
def test_the_agreed_prefix_is_where_greedy_decoding_follows_the_reference(reference, predicted, expected):
    assert agreed_prefix(reference, predicted, EOS) == expected


def test_the_answer_is_the_last_target_span():
    ids = list(range(10, 20))
    labels = [IGNORE] * 2 + ids[2:4] + [IGNORE] * 3 + ids[7:9] + [IGNORE]
    assert answer_span(TokenizedExample(ids, labels)) == (7, 9)


def test_scored_answers_and_loss_are_greedy_decodings_and_the_training_loss(tiny_base_dir):
    model, tokenizer = load_for_inference(str(tiny_base_dir), None)
    users = ["two large pizzas to 4 Elm Road", "a coffee please", "one bagel", "six small teas for pickup",
             "a dozen donuts", "three wraps to 9 Hill Lane"]
    records = [{"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": "x"}]} for u in users]
    greedy = generate_texts(model, tokenizer, [prompt_text(r, tokenizer) for r in records], 12)
    # Half the references are what the model says (greedy agrees with them to the end), half are not.
    for i, record in enumerate(records):
        record["messages"][1]["content"] = greedy[i] if i % 2 == 0 else f"nothing like it {i}"
    score = score_model(model, tokenizer, records, "tiny", batch_size=4, max_new_tokens=12)

    assert score.answers == greedy
    assert score.correct == [i % 2 == 0 for i in range(len(records))]
    examples = [tokenize_record(r, tokenizer, 1 << 20)[0] for r in records]
    expected_loss = evaluate_loss(model, examples, 4, padding_id(tokenizer), torch.device("cpu"))
    assert score.loss == pytest.approx(expected_loss, rel=1e-5)


def test_scoring_under_autocast_holds_the_weights_and_gives_back_the_float32_ones(tiny_base_dir):
    # score_model holds the frozen weights in bfloat16 while it scores under autocast
    # (models/autocast_weights.py): the same products as autocast's own casts, so the same greedy
    # answers and loss as plain autocast gives, and the float32 weights afterwards, untouched.
    model, tokenizer = load_for_inference(str(tiny_base_dir), None)
    before = {name: (param, param.detach().clone()) for name, param in model.named_parameters()}
    users = ["two large pizzas to 4 Elm Road", "a coffee please", "one bagel", "six small teas for pickup"]
    records = [{"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": "x"}]} for u in users]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        greedy = generate_texts(model, tokenizer, [prompt_text(r, tokenizer) for r in records], 12)
        for record, answer in zip(records, greedy, strict=True):
            record["messages"][1]["content"] = answer
        examples = [tokenize_record(r, tokenizer, 1 << 20)[0] for r in records]
        expected_loss = evaluate_loss(model, examples, 4, padding_id(tokenizer), torch.device("cpu"))
        score = score_model(model, tokenizer, records, "tiny", batch_size=4, max_new_tokens=12)

    assert score.answers == greedy and all(score.correct)
    assert score.loss == pytest.approx(expected_loss, rel=1e-5)
    for name, param in model.named_parameters():
        kept, value = before[name]
        assert param is kept and param.dtype == torch.float32 and torch.equal(param, value)
