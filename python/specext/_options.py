"""Checks of command-line / config options, with messages that name the option, what was
expected and what came. The configs call them once, when they are built."""

from __future__ import annotations

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
    if value is None or value < minimum:
        head = f"{option} must be {off} (off) or >= {minimum}" if off is not None else f"{option} must be >= {minimum}"
        raise ValueError(f"{head}{unit}, got {value}")
