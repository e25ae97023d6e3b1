"""Checks of command-line / config options, with messages that name the option, what was
expected and what came. The configs call them once, when they are built."""

from __future__ import annotations

import argparse
import math
from typing import Optional, Sequence


def one_of(option: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{option} must be one of {', '.join(map(str, choices))}, got {value!r}")


def at_least(option: str, value, minimum, *, optional: bool = False, off: Optional[object] = None,
             unit: str = "") -> None:
    """``value >= minimum``; ``None`` passes when ``optional``; ``off`` (e.g. 0) passes and is
    named in the message as the value that turns the feature off."""
    if (optional and value is None) or (off is not None and value == off):
        return
    if isinstance(value, float) and not math.isfinite(value):  # NaN passes every comparison below
        raise ValueError(f"{option} must be a finite number, got {value}")
    if value is None or value < minimum:
        head = f"{option} must be {off} (off) or >= {minimum}" if off is not None else f"{option} must be >= {minimum}"
        raise ValueError(f"{head}{unit}, got {value}")


def number_list(option: str, text: str) -> tuple:
    """``"0.1,0.5,1"`` -> ``(0.1, 0.5, 1.0)``; an empty item (``1,,2``, a trailing comma) or
    one that is not a number is a ``ValueError`` naming the option and the item."""
    items = text.split(",")
    out = []
    for i, x in enumerate(items, 1):
        if not x.strip():
            raise ValueError(f"{option}: item {i} of {text!r} is empty (comma-separated numbers, e.g. 0.1,0.5,1)")
        try:
            out.append(float(x))
        except ValueError:
            raise ValueError(f"{option}: item {i} of {text!r}, {x.strip()!r}, is not a number") from None
    return tuple(out)


class DefaultsFormatter(argparse.HelpFormatter):
    """``--help`` that states each option's default once: appends ``(default: X)`` to an
    option that takes a value, has a default other than None, and whose help text does not
    already say its default (argparse's ArgumentDefaultsHelpFormatter also adds ``None`` and
    ``False``, and repeats defaults the text states)."""

    def _get_help_string(self, action):
        h = action.help or ""
        if ("default" in h or not action.option_strings or action.nargs == 0 or action.default is None
                or action.default is argparse.SUPPRESS):
            return h
        return h + " (default: %(default)s)"
