"""Chat-template tokenization: the text is the template's, and only assistant tokens carry loss."""

import pytest

from lorakit.data.records import DataError
from lorakit.data.tokenize import (
    IGNORE,
    prompt_text,
    reference_text,
    tokenize_file,
    tokenize_record,
)

TWO_TURNS = {"messages": [
    {"role": "system", "content": "Answer in JSON."},
    {"role": "user", "content": "3 large pizzas"},
    {"role": "assistant", "content": '{"quantity": 3}'},
    {"role": "user", "content": "and one more?"},
    {"role": "assistant", "content": '{"quantity": 4}'},
]}


def _labelled_text(example, tokenizer):
    """The labelled tokens decoded, one string per contiguous labelled run."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label == IGNORE:
            if current:
                runs.append(tokenizer.decode(current))
            current = []
        else:
            assert label == token
            current.append(token)
    return runs + ([tokenizer.decode(current)] if current else [])


def test_the_tokens_spell_the_chat_template_and_only_assistant_turns_carry_loss(smol_tokenizer):
    example, truncated = tokenize_record(TWO_TURNS, smol_tokenizer, max_length=1024)
    assert not truncated
    assert smol_tokenizer.decode(example.input_ids) == smol_tokenizer.apply_chat_template(
        TWO_TURNS["messages"], tokenize=False)
    # Each reply and its end-of-turn marker (so the model learns to stop); nothing of the user's.
    assert _labelled_text(example, smol_tokenizer) == ['{"quantity": 3}<|im_end|>\n', '{"quantity": 4}<|im_end|>\n']


def test_the_prompt_is_what_generation_starts_from(smol_tokenizer):
    record = {"messages": TWO_TURNS["messages"][:3]}
    assert prompt_text(record, smol_tokenizer) == smol_tokenizer.apply_chat_template(
        record["messages"][:2], tokenize=False, add_generation_prompt=True)
    assert reference_text(record) == '{"quantity": 3}'


def test_prompt_completion_records_learn_the_completion_and_the_end_of_sequence(smol_tokenizer):
    record = {"prompt": "Capital of France:", "completion": " Paris"}
    example, _ = tokenize_record(record, smol_tokenizer, max_length=64)
    assert _labelled_text(example, smol_tokenizer) == [" Paris" + smol_tokenizer.eos_token]
    assert prompt_text(record, smol_tokenizer) == "Capital of France:"


def test_long_examples_are_truncated_with_a_warning_and_dropped_when_nothing_is_left(smol_tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    long = '{"prompt": "' + "word " * 50 + '", "completion": " end"}'
    path.write_text(long + '\n{"prompt": "a", "completion": " b"}\n', encoding="utf-8")
    with pytest.warns(UserWarning, match="1 example.* truncated, 1 of them to nothing to learn"):
        examples = tokenize_file(path, smol_tokenizer, max_length=20)
    assert len(examples) == 1 and len(examples[0]) < 20
    with pytest.raises(DataError, match="no example has a target token"), pytest.warns(UserWarning):
        tokenize_file(path, smol_tokenizer, max_length=1)


def test_chat_records_need_a_chat_template(smol_tokenizer, monkeypatch):
    monkeypatch.setattr(smol_tokenizer, "chat_template", None)
    with pytest.raises(DataError, match="no chat template; use prompt/completion"):
        tokenize_record(TWO_TURNS, smol_tokenizer, max_length=64)
