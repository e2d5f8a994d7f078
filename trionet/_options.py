"""Validators shared by every options class (TCP, UDP, channels, workers).

One rule per kind of value, so that the same mistake gets the same message
whichever server it is made on.  Each is an attrs validator:
``attrs.field(default=None, validator=positive_or_none)``.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "non_negative",
    "port_number",
    "positive",
    "positive_int",
    "positive_or_none",
]


def _number(attribute: Any, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"{attribute.name} must be a number, not {type(value).__name__}"
        )
    if math.isnan(value):
        raise ValueError(f"{attribute.name} must be a number, not nan")
    return value


def positive_or_none(instance: object, attribute: Any, value: object) -> None:
    """A number > 0, or None for "no limit"."""
    if value is not None and not _number(attribute, value) > 0:
        raise ValueError(f"{attribute.name} must be > 0 or None, not {value!r}")


def positive(instance: object, attribute: Any, value: object) -> None:
    """A number > 0."""
    if not _number(attribute, value) > 0:
        raise ValueError(f"{attribute.name} must be > 0, not {value!r}")


def non_negative(instance: object, attribute: Any, value: object) -> None:
    """A number >= 0."""
    if not _number(attribute, value) >= 0:
        raise ValueError(f"{attribute.name} must be >= 0, not {value!r}")


def positive_int(instance: object, attribute: Any, value: object) -> None:
    """An int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{attribute.name} must be an int, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{attribute.name} must be at least 1, not {value!r}")


def port_number(instance: object, attribute: Any, value: object) -> None:
    """A TCP or UDP port, 0..65535 (0: pick a free one)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{attribute.name} must be an int, not {type(value).__name__}")
    if not 0 <= value <= 65535:
        raise ValueError(f"{attribute.name} must be in 0..65535, not {value}")
