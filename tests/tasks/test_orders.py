"""The orders-to-JSON demo task: deterministic, well-formed, and a test split that is truly unseen."""

import json
import re
from pathlib import Path

import pytest

from tasks import orders

DATA = Path(__file__).resolve().parents[2] / "data" / "orders"


@pytest.fixture(scope="module")
def splits():
    return orders.generate()


def _answers(examples):
    return [json.loads(e["messages"][-1]["content"]) for e in examples]


def test_the_committed_files_are_what_the_generator_writes(splits):
    for split, examples in splits.items():
        committed = (DATA / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in committed] == examples, f"regenerate {split}: python -m tasks.orders"


def test_sizes_and_no_duplicate_messages(splits):
    assert {k: len(v) for k, v in splits.items()} == orders.SPLIT_SIZES
    for examples in splits.values():
        messages = [e["messages"][0]["content"] for e in examples]
        assert len(set(messages)) == len(messages)


def test_every_answer_follows_the_schema_and_is_grounded_in_the_message(splits):
    for examples in splits.values():
        for example, answer in zip(examples, _answers(examples), strict=True):
            message = example["messages"][0]["content"]
            assert [m["role"] for m in example["messages"]] == ["user", "assistant"]
            assert list(answer) == ["item", "quantity", "size", "deliver_to"]
            assert isinstance(answer["quantity"], int) and 1 <= answer["quantity"] <= 24
            assert answer["size"] in (None, "small", "medium", "large")
            *modifiers, noun = answer["item"].split()
            assert answer["item"] == answer["item"].lower()
            assert all(word in message.lower() for word in modifiers) and noun[:-1] in message.lower()
            if answer["deliver_to"] is not None:
                assert answer["deliver_to"] in message
            if answer["size"] is not None:
                assert answer["size"] in message


def test_quantity_words_are_read_as_numbers(splits):
    seen = {}
    for example, answer in zip(splits["train"], _answers(splits["train"]), strict=True):
        message = example["messages"][0]["content"]
        for phrase in ("a dozen", "a pair of"):
            if phrase in message:
                seen[phrase] = seen.get(phrase, set()) | {answer["quantity"]}
    assert seen == {"a dozen": {12}, "a pair of": {2}}


def test_test_items_streets_and_templates_never_appear_in_training(splits):
    train_text = " ".join(e["messages"][0]["content"] for e in splits["train"] + splits["val"])
    test_items = {a["item"] for a in _answers(splits["test"])}
    assert test_items.isdisjoint({a["item"] for a in _answers(splits["train"] + splits["val"])})
    test_nouns = {item.split()[-1] for item in test_items}
    assert not any(re.search(rf"\b{noun}", train_text) for noun in test_nouns)
    assert not any(street in train_text for street in orders.TEST_STREETS)
    frames = orders.ORDER_FRAMES_TEST + orders.DELIVERY_FRAMES_TEST + orders.PICKUP_FRAMES_TEST
    for frame in frames:
        fixed = max(re.split(r"\{\w+\}", frame), key=len).strip()  # the frame's longest literal part
        assert fixed not in train_text, frame


def test_generation_is_deterministic_and_seeded():
    sizes = {"train": 20, "test": 5}
    assert orders.generate(sizes) == orders.generate(sizes)
    assert orders.generate(sizes) != orders.generate(sizes, seed=1)
