"""Scoring JSON answers: constrained eval resumes from what greedy shares with the reference, and
misses are counted by field."""

import pytest

from lorakit.evaluation.evaluate import _agreed_part
from lorakit.evaluation.greedy_check import GreedyStart
from tests.generation.test_json_constraint import ANSWER


@pytest.mark.parametrize(("greedy", "finished", "kept", "still_finished"), [
    ("reference", True, "reference", True),  # greedy reproduced the whole answer: nothing to decode
    ("diverged", False, "agreed", False),  # the token where greedy departs is the constraint's to choose
    ("early end", True, "agreed", False),  # an end the constraint may forbid (the object is open)
])
def test_eval_keeps_only_what_greedy_shares_with_the_reference(smol_tokenizer, greedy, finished, kept, still_finished):
    from lorakit.data.tokenize import tokenize_record

    record = {"messages": [{"role": "user", "content": "2 pizzas"}, {"role": "assistant", "content": ANSWER}]}
    example = tokenize_record(record, smol_tokenizer, max_length=512)[0]
    prompt = example.input_ids[:example.labels.index(next(x for x in example.labels if x != -100))]
    answer = smol_tokenizer.encode(ANSWER, add_special_tokens=False)
    tokens = {"reference": answer, "diverged": answer[:4] + [answer[0]], "early end": answer[:4]}[greedy]
    start = _agreed_part(GreedyStart(prompt, tokens, finished), example, smol_tokenizer.eos_token_id)
    assert start.tokens == {"reference": answer, "agreed": answer[:4]}[kept]
    assert start.finished is still_finished


def test_misses_are_counted_by_the_field_they_get_wrong():
    from lorakit.evaluation.evaluate import misses_by_field

    reference = {"item": "pizza", "quantity": 2, "size": None}
    answers = ['{"item": "pizza", "quantity": 2, "size": null}', '{"item": "pizzas", "quantity": 3, "size": null}',
               '{"item": "pizza", "quantity": 2, "size": null, "extra": 1}', '{"item": "pizza", "quantity": 2',
               'Sure! Here is your order']
    assert misses_by_field(answers, [reference] * 5) == "not a JSON object 2, item 1, quantity 1, extra 1"
