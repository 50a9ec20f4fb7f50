"""Copy-constrained decoding: the values of named JSON fields are spans of the prompt.

An extraction answer such as {"item": ..., "deliver_to": ...} should only copy what the message
says, but a small model spelling a noun it has never seen bends it towards one it knows ("cheese
scones" -> "cheese sconce", "3 LARGE LATTES" -> "laser"). With copy fields, while an answer is
inside the string value of one of those keys, a token is allowed only if the value stays a span of
the prompt that starts at the first character of a word; a word may be written in lowercase (an
ALL-CAPS message may give a lowercase value), never raised, and never half and half ("tEA" for
"TEA"). The string may close where a word of the prompt ends, or before the "s" that ends one (or
the "es" after s, x, z, o, ch or sh), and a word ending in "ies" or "ves" may also end in "y" or
"f": so "pasties" gives "pasty" or "pastie", "loaves" gives "loaf", "scones" gives "scone", never
"scon".
Keys, other fields, numbers and null are left alone, and so is an answer that is not JSON.

Greedy decoding under the constraint is plain greedy decoding up to the first token the constraint
refuses; there it takes the best-scoring allowed token. (The candidates checked are the tokens whose
first character can come next, best first, until TOP_K are allowed: sampling keeps those.) A token
holding part of a character (a byte-level piece, decoded as U+FFFD) cannot be compared: it is allowed
only where the source has a character beyond ASCII next, and the value is not constrained from there on.
"""

from __future__ import annotations

import functools
import re

import torch

TOP_K = 32  # allowed tokens kept per step, best first, for sampling (greedy takes the first)
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_UNCHECKED = object()  # `live` of a value no longer checked (a partial character, or a refused token read on)


# What may be left of a word where a value ends: a plural's "s", or its "es" after s, x, z, o, ch, sh.
_PLURAL_END = re.compile(r"(?:(?<=[sxzo])|(?<=[cs]h))es\b|s\b", re.IGNORECASE)
_SINGULAR = re.compile(r"(ie|ve)(s)\b", re.IGNORECASE)  # "pasties" -> "pasty", "loaves" -> "loaf"


def _singular(match: re.Match) -> str:
    ending = {"ie": "y", "ve": "f"}[match.group(1).lower()]
    return ending.upper() if match.group(2).isupper() else ending


# How a span has copied the letters of the word it is in so far: no letter yet whose lowercase
# differs, or such letters all as written, or all lowercased.
_EITHER, _AS_WRITTEN, _LOWERED = 0, 1, 2


class SpanSource:
    """The text values may copy from, in two readings: as written, and with every word that ends in
    "ies" or "ves" ending in "y" or "f"; a value is a span of either. A value's character matches the
    source's or its lowercase form (an ALL-CAPS message may give a lowercase value, never the reverse),
    the same way throughout a word. A live span is (reading, index of its next character, case so far)."""

    def __init__(self, text: str) -> None:
        self.readings = (text, _SINGULAR.sub(_singular, text))
        self.lowered = tuple("".join(ch.lower()[:1] for ch in reading) for reading in self.readings)
        # Where a value may begin: a word's first character (not a blank, not after a letter or digit).
        self.starts = tuple((r, i, _EITHER) for r, reading in enumerate(self.readings) for i, ch in enumerate(reading)
                            if not ch.isspace() and (i == 0 or not reading[i - 1].isalnum()))

    def advance(self, live: tuple, text: str) -> tuple:
        """The spans ``live`` that go on with ``text``."""
        for ch in text:
            live = tuple(span for span in (self._step(r, i, case, ch) for r, i, case in live) if span)
        return live

    def _step(self, r: int, i: int, case: int, ch: str) -> tuple | None:
        """The span (r, i, case) after ``ch``, or None if ``ch`` cannot come next in it."""
        if i >= len(self.readings[r]):
            return None
        written, lowered = self.readings[r][i], self.lowered[r][i]
        if ch == written == lowered:  # the same either way; a character outside words starts a new word
            return (r, i + 1, case if ch.isalnum() else _EITHER)
        if ch == written and case != _LOWERED:
            return (r, i + 1, _AS_WRITTEN)
        if ch == lowered and case != _AS_WRITTEN:
            return (r, i + 1, _LOWERED)
        return None

    def next_characters(self, live: tuple) -> set[str]:
        """The lowercase forms of the characters that can come next."""
        return {self.lowered[r][i] for r, i, _ in live if i < len(self.readings[r])}

    def beyond_ascii_next(self, live: tuple) -> bool:
        """Whether a character beyond ASCII (one a byte-level token may hold only part of) can come next."""
        return any(not c.isascii() for c in self.next_characters(live))

    def may_end(self, live: tuple) -> bool:
        """Whether a value matching the spans ``live`` may end there: at a word's end, or before the
        plural ending of one."""
        for r, i, _ in live:
            reading = self.readings[r]
            if i == len(reading) or not reading[i].isalnum() or _PLURAL_END.match(reading, i):
                return True
        return False


class JsonFieldScan:
    """Reads a JSON answer one piece at a time and knows whether it stands inside the string value of
    a copy field, and which spans of the source that value can still be. ``feed`` says whether every
    character it read was allowed."""

    def __init__(self, fields: frozenset[str], source: SpanSource) -> None:
        self.fields, self.source = fields, source
        self.containers = ""  # "{" and "[" of the open objects and arrays, innermost last
        self.in_string = self.escape = self.expect_key = self.reading_key = False
        self.hex = None  # the digits of a \\u escape being read
        self.key = self.buffer = ""
        self.live = None  # in a copy field's value: the spans it can still be (or _UNCHECKED); None elsewhere

    def copy(self) -> JsonFieldScan:
        clone = object.__new__(JsonFieldScan)
        clone.__dict__.update(self.__dict__)
        return clone

    @property
    def in_copy_value(self) -> bool:
        return self.live is not None and self.live is not _UNCHECKED

    def feed(self, piece: str) -> bool:
        """Reads ``piece`` whole; whether every character of it was allowed. The value a refused
        character falls in is not checked from there on (an answer resumed past it reads on)."""
        allowed = True
        for ch in piece:
            if not (self._in_string(ch) if self.in_string else self._outside(ch)):
                allowed = False
                if self.live is not None:
                    self.live = _UNCHECKED
        return allowed

    def _outside(self, ch: str) -> bool:
        if ch in "{[":
            self.containers += ch
            self.expect_key = ch == "{"
        elif ch in "}]":
            self.containers = self.containers[:-1]
        elif ch == "," and self.containers.endswith("{"):
            self.expect_key = True
        elif ch == '"':
            self.in_string, self.buffer = True, ""
            self.reading_key = self.expect_key and self.containers.endswith("{")
            if not self.reading_key and self.containers.endswith("{") and self.key in self.fields:
                self.live = self.source.starts
        elif ch == ":":
            self.expect_key = False
        return True

    def _in_string(self, ch: str) -> bool:
        if self.hex is not None:
            self.hex += ch
            if len(self.hex) < 4:
                return True
            digits, self.hex = self.hex, None
            if not re.fullmatch(r"[0-9a-fA-F]{4}", digits):
                return False  # not JSON
            ch = chr(int(digits, 16))
        elif self.escape:
            self.escape = False
            if ch == "u":
                self.hex = ""
                return True
            if ch not in _ESCAPES:
                return False  # not JSON
            ch = _ESCAPES[ch]
        elif ch == "\\":
            self.escape = True
            # In a copy value, only where the next character may be written escaped.
            return not self.in_copy_value or any(
                c in _ESCAPES.values() or not " " <= c <= "~" for c in self.source.next_characters(self.live))
        elif ch == '"':
            ends = not self.in_copy_value or not self.buffer or self.source.may_end(self.live)
            self.in_string, self.live = False, None
            if self.reading_key:
                self.key, self.expect_key = self.buffer, False
            return ends
        self.buffer += ch
        if not self.in_copy_value:
            return True
        if ch == "\ufffd":  # part of a character: allowed (and the value unchecked) where one may come next
            if not self.source.beyond_ascii_next(self.live):
                return False
            self.live = _UNCHECKED
            return True
        self.live = self.source.advance(self.live, ch)
        return bool(self.live)


@functools.lru_cache(maxsize=4)
def token_pieces(tokenizer) -> tuple[str, ...]:
    """Each token's text as it reads after other text (with the space a word-initial token brings),
    by id; special tokens read as nothing."""
    zero = tokenizer.encode("0", add_special_tokens=False)[-1]
    after_zero = tokenizer.batch_decode([[zero, i] for i in range(len(tokenizer))])
    pieces = [text[1:] for text in after_zero]
    for i in tokenizer.all_special_ids:
        pieces[i] = ""
    return tuple(pieces)


@functools.lru_cache(maxsize=4)
def tokens_by_first_character(tokenizer) -> dict[str, torch.Tensor]:
    """The ids of the tokens whose text starts with each (lowercased) character."""
    ids: dict[str, list[int]] = {}
    for token, piece in enumerate(token_pieces(tokenizer)):
        if piece:
            ids.setdefault(piece[0].lower()[:1], []).append(token)
    return {first: torch.tensor(tokens) for first, tokens in ids.items()}


def accepted_tokens(tokenizer, fields: frozenset[str], source: str, answer: list[int]) -> int:
    """How many of ``answer``'s first tokens the constraint allows, one after another."""
    pieces, scan = token_pieces(tokenizer), JsonFieldScan(fields, SpanSource(source))
    for count, token in enumerate(answer):
        if not scan.feed(pieces[token]):
            return count
    return len(answer)


class CopyFieldRows:
    """A logits processor for transformers' generate(): in row i, whose answer starts at column
    ``answer_starts[i]`` of the batch, the copy fields' values are spans of ``sources[i]``."""

    def __init__(self, tokenizer, fields: frozenset[str], sources: list[str], answer_starts: list[int]) -> None:
        self.pieces = token_pieces(tokenizer)
        self.by_first = tokens_by_first_character(tokenizer)
        self.answer_starts = answer_starts
        self.scans = [JsonFieldScan(fields, SpanSource(s)) for s in sources]
        self.read = [0] * len(sources)  # answer tokens each scan has read

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for row, scan in enumerate(self.scans):
            answer = input_ids[row, self.answer_starts[row] + self.read[row]:].tolist()
            for token in answer:
                scan.feed(self.pieces[token])  # a refused token here was forced or resumed: read on
            self.read[row] += len(answer)
            if scan.in_copy_value:
                self._keep_allowed(scan, scores[row])
        return scores

    def _keep_allowed(self, scan: JsonFieldScan, scores: torch.Tensor) -> None:
        """Leaves finite scores only on the TOP_K best allowed tokens (on all tokens, if none is
        allowed: the constraint then gives way rather than leave nothing to pick). Only tokens whose
        first character can come next are candidates: the value's next character in some span, a
        quote that closes it, a backslash that escapes one."""
        firsts = scan.source.next_characters(scan.live) | {'"', "\\"}
        if scan.source.beyond_ascii_next(scan.live):
            firsts.add("\ufffd")  # tokens holding part of that character
        groups = [self.by_first[c] for c in firsts if c in self.by_first]
        if not groups:
            return
        candidates = torch.cat(groups).to(scores.device)
        ranked, order = scores[candidates].sort(descending=True)
        allowed = []
        for score, token in zip(ranked.tolist(), candidates[order].tolist(), strict=True):
            if score == float("-inf") or len(allowed) == TOP_K:
                break
            if scan.copy().feed(self.pieces[token]):
                allowed.append(token)
        if allowed:
            kept = scores[allowed].clone()
            scores.fill_(float("-inf"))
            scores[allowed] = kept
