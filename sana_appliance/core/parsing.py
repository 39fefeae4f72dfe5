"""Strings (and YAML/JSON natives) to booleans and numbers: one rule for every place that reads
a value a person wrote: the main config (files, config.env, environment, command line), the
dataloader config (multidatabackend.json) and switches in the environment.

Each function takes what a reader produced (a string, or a native bool/int/float) and returns
the value or raises :class:`ParseError` with the rule, for the caller to name the key and file.
"""

from __future__ import annotations

import math
from typing import Any

TRUE_WORDS = frozenset({"true", "1", "yes", "on", "y"})
FALSE_WORDS = frozenset({"false", "0", "no", "off", "n"})
NONE_WORDS = frozenset({"", "none", "null", "~"})


class ParseError(ValueError):
    """The value breaks the rule in the message (e.g. "must be a boolean: true or false")."""


def is_none_word(value: Any) -> bool:
    """None, or a string meaning "not set" (empty, none, null, ~)."""
    return value is None or (isinstance(value, str) and value.strip().lower() in NONE_WORDS)


def is_true_word(value: Any) -> bool:
    """For switches that are off unless set to a true word (HF_HUB_OFFLINE=1)."""
    return str(value).strip().lower() in TRUE_WORDS


def to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS | FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise ParseError("must be a boolean: true or false")


def to_number(value: Any) -> float:
    """A finite float; booleans are not numbers."""
    if isinstance(value, bool):
        raise ParseError("must be a number, e.g. 1e-5")
    try:
        number = float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise ParseError("must be a number, e.g. 1e-5") from None
    if not math.isfinite(number):
        raise ParseError("must be a finite number")
    return number


def to_int(value: Any) -> int:
    """A whole number (``10``, ``"10"``, ``1e3`` and ``"10.0"`` are fine; ``2.5`` and ``inf`` are not)."""
    if isinstance(value, bool):
        raise ParseError("must be an integer, e.g. 10")
    if isinstance(value, int):
        return value
    try:
        number = float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise ParseError("must be an integer, e.g. 10") from None
    if not number.is_integer():  # also inf and nan
        raise ParseError("must be a whole number, e.g. 10")
    return int(number)
