"""Copy-aligned targets: a copied value is tokenized where the prompt's tokens break it.

A byte-level tokenizer cuts the same word differently in different places: "scones" in a message
is " s" + "con" + "es", while the answer's "scone" is " sc" + "one" on its own. A model that
copies the message token by token ("s", "con", ...) has then left every path it was trained on,
and the token it needs next ("e") is one it never saw there; it writes "es" and keeps the plural.
With copy fields, the string value of each named JSON key that is a span of the prompt (starting
at a word, capitals possibly lowercased, as copy-constrained decoding allows) is cut at the
prompt's token boundaries and each piece tokenized on its own: "spicy scone" from " spicy scones"
becomes "sp" "icy" " s" "con" "e". The answer's text is unchanged; only where its tokens break.
Values that are not spans of the prompt, or that JSON writes with escapes, keep the plain
tokenization, and so does an answer whose text the pieces would change (a SentencePiece tokenizer
puts a space before any text it tokenizes alone).
"""

from __future__ import annotations

import json
import re


def aligned_target_ids(target: str, prompt_ids: list[int], tokenizer, fields: frozenset[str]) -> list[int]:
    """The token ids of ``target`` (an answer that follows ``prompt_ids``), with the values of
    ``fields`` cut where the prompt's tokens cut the span they copy. The plain ids where that would
    not spell the same text (a tokenizer that puts a space before any text it tokenizes alone)."""
    plain = _ids(tokenizer, target)
    read = _prompt_and_token_starts(prompt_ids, tokenizer)
    if read is None:
        return plain
    prompt, starts = read
    ids, done = [], 0
    for start, end in _value_ranges(target, fields):
        copied_at = _span_start(prompt, target[start:end])
        if copied_at is None:
            continue
        cuts = [start] + [start + b - copied_at for b in starts if copied_at < b < copied_at + end - start]
        ids += _ids(tokenizer, target[done:start])
        for a, b in zip(cuts, [*cuts[1:], end]):
            ids += _ids(tokenizer, target[a:b])
        done = end
    ids += _ids(tokenizer, target[done:])
    return ids if _text(tokenizer, ids) == _text(tokenizer, plain) else plain


def pieces_keep_their_text(tokenizer) -> bool:
    """Whether pieces tokenized one by one spell their text run together (byte-level BPE: yes; a
    SentencePiece tokenizer that puts a space before any text: no, and values keep plain tokens)."""
    return _text(tokenizer, _ids(tokenizer, "sc") + _ids(tokenizer, "one")) == "scone"


def _text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False)


def _prompt_and_token_starts(prompt_ids: list[int], tokenizer) -> tuple[str, list[int]] | None:
    """The prompt's text and where each of its tokens starts in it; None where the text cannot be
    cut between tokens (a character split over two)."""
    prompt = _text(tokenizer, prompt_ids)
    pieces = tokenizer.batch_decode([[i] for i in prompt_ids], clean_up_tokenization_spaces=False)
    if "".join(pieces) == prompt:  # each token spells its own piece (byte-level BPE): add up the lengths
        starts, at = [], 0
        for piece in pieces:
            starts.append(at)
            at += len(piece)
        return prompt, starts
    # Tokens whose text depends on their neighbours (SentencePiece's leading space): decode each prefix.
    heads = tokenizer.batch_decode([prompt_ids[:k] for k in range(len(prompt_ids))], clean_up_tokenization_spaces=False)
    if not all(prompt.startswith(head) for head in heads):
        return None
    return prompt, [len(head) for head in heads]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _value_ranges(target: str, fields: frozenset[str]) -> list[tuple[int, int]]:
    """(start, end) in ``target`` of the string values of ``fields`` in the JSON object it begins
    with, for values written without escapes, in order."""
    try:
        answer, _ = json.JSONDecoder().raw_decode(target)
    except ValueError:
        return []
    if not isinstance(answer, dict):
        return []
    ranges = []
    for key in fields:
        value = answer.get(key)
        if not isinstance(value, str) or not value or json.dumps(value, ensure_ascii=False)[1:-1] != value:
            continue
        found = re.search(re.escape(json.dumps(key)) + r"\s*:\s*\"(" + re.escape(value) + ")\"", target)
        if found:
            ranges.append(found.span(1))
    return sorted(ranges)


def _span_start(prompt: str, value: str) -> int | None:
    """Where in ``prompt`` the last span that ``value`` copies begins: at a word's first character,
    each character the prompt's or its lowercase form; None if there is none."""
    lowered = "".join(ch.lower()[:1] for ch in prompt)
    for at in range(len(prompt) - len(value), -1, -1):
        if at > 0 and prompt[at - 1].isalnum():
            continue
        if all(v in (p, q) for v, p, q in zip(value, prompt[at:], lowered[at:])):
            return at
    return None
