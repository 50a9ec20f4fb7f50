"""Scoring a model on a split: exact match of generated answers and loss on the reference answers.

An answer matches when it equals the reference: as parsed JSON objects when the reference is one
(key order and spacing do not matter, values do), as text with outer whitespace stripped otherwise.
The base model and the adapted one are scored on the same split, side by side.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from lorakit.core.adapters import disable_adapters
from lorakit.core.merge import merge, unmerge
from lorakit.data.records import read_records
from lorakit.data.tokenize import padding_id, reference_text, tokenize_record
from lorakit.evaluation.greedy_check import GreedyStart, answer_span, check_references
from lorakit.generation.copy_constraint import accepted_tokens
from lorakit.generation.generate import (
    StopUnlessJsonObject,
    cannot_be_json_object,
    generate_ids,
)
from lorakit.methods.method import methods_disabled
from lorakit.models.autocast_weights import active_autocast_dtype, frozen_weights_in
from lorakit.models.base import load_for_inference
from lorakit.models.packed_weights import packed_linear_weights

ANSWER_MARGIN = 16  # tokens allowed beyond the longest reference answer


@dataclass
class Score:
    label: str
    answers: list[str]
    correct: list[bool]
    loss: float

    @property
    def exact_match(self) -> float:
        return sum(self.correct) / len(self.correct)


def matches(answer: str, reference: str) -> bool:
    expected = _json_object(reference)
    if expected is not None:
        return _json_object(answer) == expected
    return answer.strip() == reference.strip()


def _json_object(text: str) -> dict | None:
    try:
        value = json.loads(text.strip())
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def score_model(model: nn.Module, tokenizer, records: list[dict], label: str, batch_size: int = 16,
                progress: bool = False, shown: list[int] = (), max_new_tokens: int | None = None,
                json_object: bool = False, copy_fields: frozenset[str] = frozenset()) -> Score:
    """Exact match of greedy answers and loss on the references, of ``model`` on ``records``. Answers
    are at most ``max_new_tokens`` long (default: the longest reference answer and a margin).

    One teacher-forced pass over the references gives the loss and, on every row where greedy
    decoding reproduces the reference, the answer itself (greedy_check); only the other rows are
    decoded, from where they part from the reference. When every reference is a JSON object, answers
    that cannot become one are cut short (the score is the same, decoding much faster); the answers
    of the ``shown`` rows are then decoded in full, for display. With ``json_object``, decoding is
    constrained to one JSON object (generation/json_constraint.py); with ``copy_fields``, those fields'
    values are spans of the prompt (generation/copy_constraint.py), and the references are tokenized
    as training with the same copy_fields reads them (data/copy_aligned.py)."""
    references = [reference_text(r) for r in records]
    json_only = not json_object and all(_json_object(ref) is not None for ref in references)
    examples = [tokenize_record(r, tokenizer, max_length=1 << 20, copy_fields=copy_fields)[0] for r in records]
    # Under autocast, the frozen weights in its dtype while scoring (the same products; after any merge);
    # without, float32 weights on a CPU packed for oneDNN's faster products (the same up to the last bits).
    autocast_dtype = active_autocast_dtype(next(model.parameters()).device)
    with (frozen_weights_in(model, autocast_dtype),
          packed_linear_weights(model) if autocast_dtype is None else contextlib.nullcontext()):
        loss, starts = check_references(model, examples, batch_size, padding_id(tokenizer), tokenizer.eos_token_id,
                                        progress)
        if json_object:
            starts = [_agreed_part(s, e, tokenizer.eos_token_id) for s, e in zip(starts, examples, strict=True)]
        if copy_fields:
            starts = [_allowed_part(s, tokenizer, copy_fields) for s in starts]
        limit = max_new_tokens or max(end - start for start, end in map(answer_span, examples)) + ANSWER_MARGIN
        pending = [i for i, s in enumerate(starts) if not _settled(s, limit, tokenizer, json_only)]
        _decode_on(model, tokenizer, starts, pending, limit, batch_size, progress, json_only, json_object, copy_fields)
        answers = [tokenizer.decode(s.tokens[:limit], skip_special_tokens=True) for s in starts]
        if json_only:  # shown rows that may have been cut short: decode them in full, for display
            cut = [i for i in shown if cannot_be_json_object(answers[i])]
            _decode_on(model, tokenizer, starts, cut, limit, batch_size, copy_fields=copy_fields)
            for i in cut:
                answers[i] = tokenizer.decode(starts[i].tokens, skip_special_tokens=True)
    correct = [matches(a, ref) for a, ref in zip(answers, references, strict=True)]
    return Score(label, answers, correct, loss)


def _agreed_part(start: GreedyStart, example, eos_id: int) -> GreedyStart:
    """``start`` cut to the tokens it shares with the reference answer. A constrained answer is the
    unconstrained greedy one up to there (every reference token is a valid JSON continuation), but
    where greedy first departs from the reference the constraint may pick another token."""
    begin, end = answer_span(example)
    reference = example.input_ids[begin:end]
    agreed = 0
    while agreed < min(len(start.tokens), len(reference)) and start.tokens[agreed] == reference[agreed]:
        agreed += 1
    whole = start.finished and agreed == len(start.tokens) and reference[agreed:agreed + 1] == [eos_id]
    return start if whole else GreedyStart(start.prompt, start.tokens[:agreed], False)


def _allowed_part(start: GreedyStart, tokenizer, copy_fields: frozenset[str]) -> GreedyStart:
    """``start`` cut before its first token the copy constraint refuses: the constraint only ever
    masks tokens, so constrained greedy decoding agrees with plain greedy decoding up to there."""
    allowed = accepted_tokens(tokenizer, copy_fields, tokenizer.decode(start.prompt), start.tokens)
    return start if allowed == len(start.tokens) else GreedyStart(start.prompt, start.tokens[:allowed], False)


def _settled(start: GreedyStart, limit: int, tokenizer, json_only: bool) -> bool:
    """Whether the greedy answer begun by ``start`` needs no more decoding to be scored."""
    if start.finished or len(start.tokens) >= limit:
        return True
    return json_only and cannot_be_json_object(
        tokenizer.decode(start.tokens[:StopUnlessJsonObject.LOOK_AHEAD], skip_special_tokens=True))


def _decode_on(model: nn.Module, tokenizer, starts: list[GreedyStart], rows: list[int], limit: int,
               batch_size: int, progress: bool = False, json_only: bool = False, json_object: bool = False,
               copy_fields: frozenset[str] = frozenset()) -> None:
    """Greedy decoding of ``rows`` from where their answers stand, up to ``limit`` answer tokens."""
    rows = [i for i in rows if len(starts[i].tokens) < limit]
    if not rows:
        return
    # generate() takes one max_new_tokens per batch; the longest budget, then each row is cut to its own.
    budget = limit - min(len(starts[i].tokens) for i in rows)
    new = generate_ids(model, tokenizer, [starts[i].prompt + starts[i].tokens for i in rows], budget, batch_size,
                       progress=progress, json_only=json_only, answered=[len(starts[i].tokens) for i in rows],
                       json_object=json_object, copy_fields=copy_fields)
    for i, tokens in zip(rows, new, strict=True):
        starts[i].tokens = (starts[i].tokens + tokens)[:limit]


def compare_base_and_adapter(model: nn.Module, tokenizer, data: str | Path, limit: int | None = None,
                             batch_size: int = 16, with_base: bool = True, examples: int = 3,
                             progress: bool = False, merged: bool = True,
                             json_object: bool = False,
                             copy_fields: frozenset[str] = frozenset()) -> tuple[list[dict], list[Score], list[int]]:
    """(records, scores, shown): the adapter's score, preceded by the base model's (adapters
    disabled), and the rows worth showing (the adapter's misses first). With ``merged`` the
    adapter is merged for its pass, so generation runs at the base model's speed, and unmerged
    after; without, it is computed alongside the base layers, as in training."""
    records = read_records(data)[:limit]
    if merged:
        merge(model)
    try:
        adapter = score_model(model, tokenizer, records, "adapter", batch_size, progress, json_object=json_object,
                              copy_fields=copy_fields)
    finally:
        unmerge(model)
    # The adapter's misses first: they say more than its hits. (Its answers are shown as generated:
    # one that did not open with "{" is cut short.)
    shown = sorted(range(len(records)), key=lambda i: adapter.correct[i])[:examples]
    scores = [adapter]
    if with_base:
        with disable_adapters(model), methods_disabled(model):
            scores.insert(0, score_model(model, tokenizer, records, "base model", batch_size, progress, shown,
                                         json_object=json_object, copy_fields=copy_fields))
    return records, scores, shown


def report(data: str | Path, records: list[dict], scores: list[Score], shown: list[int],
           products: str = "float32") -> str:
    """The scores as a table, the misses by field and the ``shown`` rows; ``products`` names the
    dtype the matrix products ran in when it is not float32."""
    header = f"{data}: {len(records)} examples" + (f" ({products} products)" if products != "float32" else "")
    lines = [header, f"{'':<12}{'exact match':>18}{'loss':>10}"]
    for s in scores:
        lines.append(f"{s.label:<12}{sum(s.correct):>7}/{len(s.correct):<4}{100 * s.exact_match:>6.1f}%"
                     f"{s.loss:>10.4f}")
    references = [_json_object(reference_text(r)) for r in records]
    if all(ref is not None for ref in references):
        for s in scores:
            if not all(s.correct):
                lines.append(f"{s.label:<12}misses by field: {misses_by_field(s.answers, references)}")
    for i in shown:
        lines.append("")
        lines.append(f"[{i}] prompt:    {_last_user_text(records[i])}")
        lines.append(f"    expected:  {reference_text(records[i])}")
        for s in scores:
            mark = "ok " if s.correct[i] else "MISS"
            lines.append(f"    {s.label:<11}{mark} {_one_line(s.answers[i])}")
    return "\n".join(lines)


def misses_by_field(answers: list[str], references: list[dict]) -> str:
    """How many answers get each field of the reference JSON objects wrong ("item 12, quantity 3"),
    and how many are no JSON object at all; an answer may miss several fields."""
    counts: dict[str, int] = {}
    for answer, reference in zip(answers, references, strict=True):
        parsed = _json_object(answer)
        if parsed is None:
            counts["not a JSON object"] = counts.get("not a JSON object", 0) + 1
            continue
        for key in dict.fromkeys([*reference, *parsed]):
            if parsed.get(key) != reference.get(key):
                counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{key} {count}" for key, count in sorted(counts.items(), key=lambda kv: -kv[1]))


def _last_user_text(record: dict) -> str:
    if "messages" in record:
        users = [m["content"] for m in record["messages"] if m["role"] == "user"]
        return _one_line(users[-1] if users else "")
    return _one_line(record["prompt"])


def _one_line(text: str, width: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def adapters_exact_match(base: str | None, adapters: list[Path], data: str | Path, limit: int | None = None,
                         batch_size: int = 16, progress: bool = False) -> list[float]:
    """Exact match of each adapter in turn, merged into a fresh copy of the base model, on ``data``."""
    records = read_records(data)[:limit]
    results = []
    for adapter in adapters:
        model, tokenizer = load_for_inference(base, adapter)
        merge(model)
        results.append(score_model(model, tokenizer, records, str(adapter), batch_size, progress).exact_match)
    return results
