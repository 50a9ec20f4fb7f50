"""From records to token ids and labels, with loss only on what the model should learn to say.

A chat record is rendered with the tokenizer's own chat template and cut into alternating
context and target spans: each assistant turn (its text and the template's end-of-turn marker)
is a target, everything else context. Each span is tokenized on its own, exactly as generation
sees it: the prompt up to the assistant header, then the reply token by token. A prompt/completion
record is one context span (the prompt) and one target span (completion + end-of-sequence).
Labels are the token ids on target spans and IGNORE elsewhere.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from lorakit.data.copy_aligned import aligned_target_ids, pieces_keep_their_text
from lorakit.data.records import DataError, read_records

IGNORE = -100  # the label of a position that carries no loss (PyTorch's cross_entropy default)


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # same length; IGNORE where no loss

    def __len__(self) -> int:
        return len(self.input_ids)


def padding_id(tokenizer) -> int:
    """The id to pad batches with: the tokenizer's pad token, or its end-of-sequence token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def spans(record: dict, tokenizer) -> list[tuple[str, bool]]:
    """The record's text as (text, is_target) spans whose concatenation is the full rendered text."""
    if "messages" not in record:
        return [(record["prompt"], False), (record["completion"] + tokenizer.eos_token, True)]
    messages = record["messages"]
    render = tokenizer.apply_chat_template
    out: list[tuple[str, bool]] = []
    done = ""  # rendered text covered by the spans so far
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = render(messages[: i + 1], tokenize=False)
        if not (prompt.startswith(done) and upto.startswith(prompt)):
            raise DataError("the tokenizer's chat template does not render a conversation as a prefix "
                            "of its continuation, so assistant turns cannot be located; use prompt/completion records")
        out += [(prompt[len(done):], False), (upto[len(prompt):], True)]
        done = upto
    tail = render(messages, tokenize=False)[len(done):]
    if tail:
        out.append((tail, False))
    return out


def tokenize_record(record: dict, tokenizer, max_length: int,
                    copy_fields: frozenset[str] = frozenset()) -> tuple[TokenizedExample, bool]:
    """(example, was_truncated). Examples longer than max_length keep their first max_length tokens.
    With ``copy_fields``, targets are copy-aligned (data/copy_aligned.py)."""
    if "messages" in record and not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template; use prompt/completion records for this model")
    input_ids: list[int] = []
    labels: list[int] = []
    for text, is_target in spans(record, tokenizer):
        if is_target and copy_fields:
            ids = aligned_target_ids(text, input_ids, tokenizer, copy_fields)
        else:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if is_target else [IGNORE] * len(ids)
    truncated = len(input_ids) > max_length
    return TokenizedExample(input_ids[:max_length], labels[:max_length]), truncated


def prompt_text(record: dict, tokenizer) -> str:
    """What generation starts from: everything before the last target span."""
    parts = spans(record, tokenizer)
    last = max(i for i, (_, is_target) in enumerate(parts) if is_target)
    return "".join(text for text, _ in parts[:last])


def reference_text(record: dict) -> str:
    """The expected answer: the last assistant message, or the completion."""
    if "messages" in record:
        return [m for m in record["messages"] if m["role"] == "assistant"][-1]["content"]
    return record["completion"]


def tokenize_file(path: str | Path, tokenizer, max_length: int,
                  copy_fields: frozenset[str] = frozenset()) -> list[TokenizedExample]:
    """Every record of a JSONL file, tokenized; warns once about truncated examples and drops those
    left with no target token (they would train nothing)."""
    if copy_fields and not pieces_keep_their_text(tokenizer):
        warnings.warn(f"copy_fields: this tokenizer puts a space before every piece it tokenizes alone, so the "
                      f"answers of {path} keep their plain tokens (data/copy_aligned.py)", stacklevel=2)
    examples, truncated, empty = [], 0, 0
    for record in read_records(path):
        example, was_truncated = tokenize_record(record, tokenizer, max_length, copy_fields)
        truncated += was_truncated
        if all(label == IGNORE for label in example.labels[1:]):
            empty += 1
            continue
        examples.append(example)
    if truncated:
        warnings.warn(f"{path}: {truncated} example(s) longer than max_length={max_length} tokens were truncated"
                      + (f", {empty} of them to nothing to learn and were dropped" if empty else ""), stacklevel=2)
    if not examples:
        raise DataError(f"{path}: no example has a target token within max_length={max_length}")
    return examples
