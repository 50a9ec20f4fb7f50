"""Copy-constrained decoding: which values it lets a JSON answer write, and generate() and eval wired to it."""

from __future__ import annotations

import pytest

from lorakit.generation.copy_constraint import (
    JsonFieldScan,
    SpanSource,
    accepted_tokens,
)
from lorakit.generation.generate import generate_ids
from lorakit.generation.prompts import chat_prompt

FIELDS = frozenset({"item", "deliver_to"})


def _writes(source: str, answer: str) -> bool:
    """Whether the constraint allows ``answer``, read one character at a time, after a prompt ``source``."""
    scan = JsonFieldScan(FIELDS, SpanSource(source))
    return all(scan.feed(ch) for ch in answer)


@pytest.mark.parametrize(("source", "answer", "allowed"), [
    ("18 cheese scones, please", '{"item": "cheese scone"', True),  # a plural's "s" may be left out
    ("18 cheese scones, please", '{"item": "cheese scones"}', True),
    ("18 cheese scones, please", '{"item": "cheese sconce"', False),  # a known word instead of the one written
    ("18 cheese scones, please", '{"item": "cheese scon"', False),  # a string may not close inside a word
    ("18 cheese scones, please", '{"item": "eese scone"', False),  # nor begin inside one
    ("18 cheese scones, please", '{"item": " cheese scone"', False),  # nor with a blank
    ("7 classic pasties", '{"item": "classic pasty"', True),  # "-ies" read as "-y"
    ("7 classic pasties", '{"item": "classic pastie"', True),
    ("two tandoori loaves", '{"item": "tandoori loaf"', True),  # "-ves" read as "-f"
    ("3 LARGE LATTES TO 19 HIGH STREET", '{"item": "latte", "deliver_to": "19 HIGH STREET"}', True),
    ("3 large lattes", '{"item": "LATTE"', False),  # capitals may be lowered, never raised
    ("a small GREEN TEA", '{"item": "green tEA"', False),  # a word lowered all through, or not at all
    ("5 HOT CHOCOLATES", '{"item": "hot cHOCOLATE"', False),
    ("5 HOT CHOCOLATES", '{"item": "hot CHOCOLATE"', True),  # each word on its own
    ("2 McFlurries", '{"item": "McFlurry"', True),  # a word's own mixed case, as written
    ("2 McFlurries", '{"item": "mcflurry"', True),
    ("2 McFlurries", '{"item": "Mcflurry"', False),
    ("4 X-LARGE pies", '{"item": "x-LARGE pie"', True),  # a hyphen ends a word
    ("3 large lattes", '{"item": "latte", "quantity": 3, "size": "grande", "note": "x"}', True),  # other fields
    ("3 large lattes", '{"item": null, "deliver_to": null}', True),
    ("3 large lattes", '{"deliver_to": "5 Elm Street"', False),
    ('a "special" pie', '{"item": "\\"special\\" pie"', True),  # escapes are read as what they stand for
    ("a caf\u00e9 latte", '{"item": "caf\\u00e9 latte"', True),
    ("oat milk lattes", '{"item": "oat \ufffd', False),  # part of a character where the source has none
    ("a caf\u00e9 latte", '{"item": "caf\ufffd', True),  # part of the one it has: not comparable, allowed
    ("katsudons", '{"item": "katsu\\don"', False),  # not a JSON escape
    ("katsudons", '{"item": "katsu\\u00zz', False),
    ("katsudons", '{"item": "katsu\\', False),  # a backslash where the next character needs no escape
    ("3 large lattes", 'Sure! "latte" is a fine choice', True),  # not JSON: nothing to constrain
])
def test_values_of_copy_fields_are_word_spans_of_the_prompt(source, answer, allowed):
    assert _writes(source, answer) is allowed


def test_a_string_value_of_a_key_that_is_not_copied_is_not_checked():
    assert _writes("2 pizzas", '{"size": "enormous", "item": "pizza"}')
    assert not _writes("2 pizzas", '{"size": "pizza", "item": "enormous"')


def test_a_refused_piece_is_read_whole_so_the_fields_after_it_are_known():
    scan = JsonFieldScan(FIELDS, SpanSource("eleven katsudons to 260 Elder St"))
    assert not scan.feed('{"item": "katsu", ')  # closes mid-word, then a comma and a blank
    assert scan.feed('"size": "enormous", ')  # a key, then a value of a field that is not copied
    assert not scan.feed('"deliver_to": "261')
    assert scan.feed(' Elder St"}')  # the refused value is not checked from there on


def test_accepted_tokens_stop_before_the_first_refused_token(smol_tokenizer):
    source = chat_prompt(smol_tokenizer, [{"role": "user", "content": "eleven katsudons to 260 Elder St"}])
    good = smol_tokenizer.encode('{"item": "katsudon", "deliver_to": "260 Elder St"}', add_special_tokens=False)
    assert accepted_tokens(smol_tokenizer, FIELDS, source, good) == len(good)
    bad = smol_tokenizer.encode('{"item": "katsu", "deliver_to": "260 Elder St"}', add_special_tokens=False)
    kept = accepted_tokens(smol_tokenizer, FIELDS, source, bad)
    assert smol_tokenizer.decode(bad[:kept]) == '{"item": "katsu'  # the closing quote, mid-word, is refused


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generate_keeps_every_row_to_the_spans_of_its_own_prompt(tiny_base_dir, smol_tokenizer, temperature):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir).eval()
    tokenizer = smol_tokenizer
    messages = ["two cheese scones", "a large flat white to 5 Elm Street please", "FIVE HOT CHOCOLATES"]
    head = tokenizer.encode('{"item": "', add_special_tokens=False)  # every answer starts inside a copy value
    prompts = [tokenizer.encode(chat_prompt(tokenizer, [{"role": "user", "content": m}]), add_special_tokens=False)
               + head for m in messages]
    sources = [tokenizer.decode(p[:-len(head)]) for p in prompts]
    answered = [len(head)] * len(prompts)

    def follows(answers):
        return [accepted_tokens(tokenizer, FIELDS, s, head + a) == len(head + a) for s, a in zip(sources, answers)]

    free = generate_ids(model, tokenizer, prompts, 8, batch_size=3, temperature=temperature, answered=answered)
    copied = generate_ids(model, tokenizer, prompts, 8, batch_size=3, temperature=temperature, answered=answered,
                          copy_fields=FIELDS)
    assert not any(follows(free))  # the random model alone writes no span
    assert all(follows(copied))
    assert all(len(a) > 1 for a in copied)  # it did write: the constraint picks spans, not an empty answer


def test_eval_resumes_constrained_decoding_before_the_first_refused_greedy_token(smol_tokenizer):
    from lorakit.evaluation.evaluate import _allowed_part
    from lorakit.evaluation.greedy_check import GreedyStart

    prompt = smol_tokenizer.encode(chat_prompt(smol_tokenizer, [{"role": "user", "content": "7 classic pasties"}]),
                                   add_special_tokens=False)
    pastry = smol_tokenizer.encode('{"item": "classic pastry"}', add_special_tokens=False)
    cut = _allowed_part(GreedyStart(prompt, pastry, True), smol_tokenizer, FIELDS)
    assert not cut.finished and smol_tokenizer.decode(cut.tokens).endswith("classic")  # " pastry" is one token
    pasty = smol_tokenizer.encode('{"item": "classic pasty"}', add_special_tokens=False)
    kept = _allowed_part(GreedyStart(prompt, pasty, True), smol_tokenizer, FIELDS)
    assert kept.tokens == pasty and kept.finished


def test_copy_fields_are_named_as_a_comma_separated_list():
    import argparse

    from lorakit.argtypes import field_names

    assert field_names("item, deliver_to") == FIELDS
    with pytest.raises(argparse.ArgumentTypeError, match="separated by commas"):
        field_names("item,,deliver_to")
