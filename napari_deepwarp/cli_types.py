"""argparse ``type=`` functions for numeric options: a value out of range is argparse's own error
(``deepwarp register: error: argument --finetune: ...``, exit code 2) before any work starts.

Each raises ``argparse.ArgumentTypeError`` with the value and the range it must lie in; NaN and
infinities are refused by every float type.
"""

from __future__ import annotations

import argparse
import math


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def non_negative_int(text: str) -> int:
    """A count that may be 0 (steps, intervals): ``0, 1, 2, ...``."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; give 0 or more")
    return value


def positive_int(text: str) -> int:
    """A size or a count that must be at least 1 (grid sides, batch size, threads)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1; give 1 or more")
    return value


def positive_float(text: str) -> float:
    """A strictly positive finite number (spacing in mm, learning rate, minutes, seconds)."""
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value:g} is not positive; give a number above 0")
    return value


def non_negative_float(text: str) -> float:
    """A finite number that may be 0 (loss weights; 0 switches the term off)."""
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value:g} is negative; give 0 or more")
    return value


#: ``--refine`` presets (as ``refine.PRESETS``, without torch)
REFINE_PRESETS = ("fast", "accurate")


def refine_spec(text: str) -> str | int:
    """``--refine``: a preset name (``fast``, ``accurate``) or a step count ``0, 1, 2, ...``."""
    if text in REFINE_PRESETS:
        return text
    try:
        return non_negative_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a preset ({', '.join(REFINE_PRESETS)}) nor a step count"
        ) from None


#: the files ``deepwarp register --outputs`` can name (as ``pipeline.OUTPUTS``, without torch)
OUTPUT_NAMES = ("warped", "labels", "displacement", "transform", "inverse", "metrics")


def output_names(text: str) -> list[str]:
    """``warped,transform`` -> ``["warped", "transform"]``, each one of :data:`OUTPUT_NAMES`."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in OUTPUT_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"{text!r}: name one or more of {', '.join(OUTPUT_NAMES)}, comma-separated"
        )
    return names
