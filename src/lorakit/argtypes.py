"""argparse types shared by the command line and the training recipe's flags."""

from __future__ import annotations

import argparse
import math


def finite_float(text: str) -> float:
    """A float setting: a finite number. argparse's ``float`` takes "nan" and "inf", which every
    later range check (``value < 0`` is false for NaN) would let through."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite number")
    return value


EXACT_4BIT_HELP = ("compute 4-bit layers by de-quantizing them to float32 (the exact reference), and the output "
                   "head as floats, instead of with kernels straight from the codes (lorakit's float32 ones up to "
                   "128 rows, PyTorch's bfloat16 int4 kernel beyond; a head on GGUF's 8-bit grid from its 8-bit "
                   "codes; about 2x faster at batch 1 on a 2-core AVX2 CPU); no effect on other models")
JSON_HELP = ("constrain decoding so that every answer is one JSON object: a token that would break it is never "
             "picked, and the answer ends only once the object is closed")
COPY_FIELDS_HELP = ("comma-separated JSON keys (e.g. item,deliver_to) whose string values must be spans of the prompt: "
                    "from the start of a word to the end of one (or before a plural's -s/-es; -ies/-ves may end "
                    "in -y/-f), a word's capitals possibly lowercased (all of them or none); stops a model from "
                    "bending an unseen word it should copy. Default: the fields the adapter was trained with (its "
                    "decoding.json), if any; none: off")


def split_keys(text: str) -> list[str]:
    """JSON keys separated by commas, each stripped (a blank one left as ""), or none: no key."""
    return [] if text.strip().lower() == "none" else [name.strip() for name in text.split(",")]


def field_names(text: str) -> frozenset[str]:
    """A --copy-fields value: JSON keys separated by commas, or none (no field copied)."""
    names = split_keys(text)
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r}: give JSON keys separated by commas, e.g. item,deliver_to")
    return frozenset(names)
