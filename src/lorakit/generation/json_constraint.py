"""JSON-constrained decoding: every token a row emits keeps its answer a prefix of one JSON object,
and end-of-sequence is allowed only once the object is closed, so a finished answer always parses
(one cut short by the token limit need not).

The character-level JSON grammar and its walk over the tokenizer's vocabulary are lm-format-enforcer's
(the library vLLM offers for the same job); lorakit feeds it each row's answer (not the prompt, which
need not be JSON) and masks the logits with what it allows.
"""

from __future__ import annotations

import functools
import threading

import torch

from lorakit.generation.copy_constraint import token_pieces

# Any JSON object, nothing else: `response_format: {"type": "json_object"}` in OpenAI's API.
JSON_OBJECT_SCHEMA = {"type": "object"}


_BUILDING = threading.Lock()  # one build per tokenizer, however many threads ask at once


def prepare_json_constraint(tokenizer) -> None:
    """Build (once) what constraining answers for ``tokenizer`` needs, ahead of the first answer."""
    with _BUILDING:
        _tokenizer_data(tokenizer)


@functools.lru_cache(maxsize=4)
def _tokenizer_data(tokenizer):
    """lm-format-enforcer's view of the vocabulary: each regular token's text (with the space a
    word-initial token brings), as a prefix tree; built once per tokenizer. (The library's own
    transformers integration imports modules transformers 5 removed, so it is built here.)"""
    from lmformatenforcer import TokenEnforcerTokenizerData

    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    pieces = token_pieces(tokenizer)  # as each token reads mid-sentence (shared with the copy constraint)
    alone = tokenizer.batch_decode([[i] for i in ids])
    regular = [(i, pieces[i], len(pieces[i]) > len(bare)) for i, bare in zip(ids, alone, strict=True)]
    return TokenEnforcerTokenizerData(regular, lambda tokens: tokenizer.decode(tokens).rstrip("\ufffd"),
                                      tokenizer.eos_token_id, False, len(tokenizer))


class JsonObjectAnswer:
    """The tokens allowed next in one answer that must be a JSON object. ``allowed(answer)`` takes
    the answer's tokens so far (its growth by one token per call is what makes it cheap)."""

    def __init__(self, tokenizer) -> None:
        from lmformatenforcer import JsonSchemaParser, TokenEnforcer

        prepare_json_constraint(tokenizer)
        self._enforcer = TokenEnforcer(_tokenizer_data(tokenizer), JsonSchemaParser(JSON_OBJECT_SCHEMA))
        self._seen = 0  # answer tokens the enforcer has walked through
        self._eos = tokenizer.eos_token_id

    def allowed(self, answer: list[int]) -> list[int]:
        # The enforcer keys its states by the whole sequence and steps from the one a token shorter;
        # the empty answer is its root. Walk it through any tokens it has not seen (an answer resumed
        # from a teacher-forced prefix arrives with several).
        allowed = None
        for end in range(min(self._seen, len(answer)), len(answer) + 1):
            allowed = self._enforcer.get_allowed_tokens(answer[:end])
        self._seen = len(answer)
        # End-of-sequence is allowed once the object is closed; then it is the only choice (the
        # grammar would also allow trailing blanks): the answer stops at the object's end.
        if self._eos in allowed.allowed_tokens:
            return [self._eos]
        return allowed.allowed_tokens


class JsonObjectRows:
    """``prefix_allowed_tokens_fn`` for transformers' generate(): row i's answer, which starts at
    column ``answer_starts[i]`` of the left-padded batch, must be a JSON object."""

    def __init__(self, tokenizer, answer_starts: list[int]) -> None:
        self.answer_starts = answer_starts
        self.rows = [JsonObjectAnswer(tokenizer) for _ in answer_starts]

    def __call__(self, batch_id: int, sequence: torch.Tensor) -> list[int]:
        return self.rows[batch_id].allowed(sequence[self.answer_starts[batch_id]:].tolist())
