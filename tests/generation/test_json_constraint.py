"""JSON-constrained decoding: the tokens it allows, and generate() wired to it."""

from __future__ import annotations

from lorakit.generation.generate import generate_ids
from lorakit.generation.json_constraint import JsonObjectAnswer
from lorakit.generation.prompts import chat_prompt

ANSWER = '{"item": "pizza", "quantity": 2, "size": null}'


def _follows_constraint(tokenizer, answer: list[int]) -> bool:
    """Whether every token of ``answer`` was allowed when it was chosen."""
    constraint = JsonObjectAnswer(tokenizer)
    return all(token in constraint.allowed(answer[:k]) for k, token in enumerate(answer))


def test_an_object_is_allowed_token_by_token_and_ends_only_when_closed(smol_tokenizer):
    tokenizer = smol_tokenizer
    ids = tokenizer.encode(ANSWER, add_special_tokens=False)
    constraint = JsonObjectAnswer(tokenizer)
    first = constraint.allowed([])
    assert ids[0] in first and tokenizer.encode("Hello", add_special_tokens=False)[0] not in first
    for k in range(1, len(ids)):
        allowed = constraint.allowed(ids[:k])
        assert ids[k] in allowed and tokenizer.eos_token_id not in allowed  # open object: no end yet
    assert constraint.allowed(ids) == [tokenizer.eos_token_id]  # closed: it ends there, no trailing blanks
    closing = tokenizer.encode("]", add_special_tokens=False)[0]
    assert closing not in JsonObjectAnswer(tokenizer).allowed(tokenizer.encode('{"a": 1', add_special_tokens=False))


def test_an_answer_resumed_mid_way_gets_the_same_tokens_as_one_built_step_by_step(smol_tokenizer):
    ids = smol_tokenizer.encode(ANSWER, add_special_tokens=False)
    stepwise = JsonObjectAnswer(smol_tokenizer)
    for k in range(7):
        stepwise.allowed(ids[:k])
    assert sorted(JsonObjectAnswer(smol_tokenizer).allowed(ids[:6])) == sorted(stepwise.allowed(ids[:6]))


def test_generate_keeps_every_row_of_a_left_padded_batch_to_the_constraint(tiny_base_dir, smol_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir).eval()
    tokenizer = smol_tokenizer
    # Prompts of different lengths (so rows are padded differently), one already part-way into its answer.
    prompts = [tokenizer.encode(chat_prompt(tokenizer, [{"role": "user", "content": "x " * n}]),
                                add_special_tokens=False) for n in (1, 7, 15)]
    head = tokenizer.encode('{"item": "', add_special_tokens=False)
    prompts.append(prompts[0] + head)
    free = generate_ids(model, tokenizer, prompts, 12, batch_size=4)
    constrained = generate_ids(model, tokenizer, prompts, 12, batch_size=4, json_object=True,
                               answered=[0, 0, 0, len(head)])
    assert not any(_follows_constraint(tokenizer, answer) for answer in free[:3])  # the random model alone
    assert all(_follows_constraint(tokenizer, answer) for answer in constrained[:3])
    assert _follows_constraint(tokenizer, head + constrained[3])
