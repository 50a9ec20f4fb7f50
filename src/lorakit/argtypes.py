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
