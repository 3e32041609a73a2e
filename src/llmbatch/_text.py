"""Text the user gives or is shown: sizes such as `200MB`, and clipping of caller-supplied
strings echoed back in error messages.

A caller can send a 20 KB model name or a 6,000-character id; echoing it whole in every error
(and every batch object that embeds the error) multiplies it. Messages show the start of the
string and its length instead, which is enough to recognise it.
"""

from __future__ import annotations

import re

from ._exceptions import ConfigError

__all__ = ["clip", "plural", "ECHO_LIMIT", "parse_size"]

_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}

#: Characters of a caller's string kept in a message.
ECHO_LIMIT = 200


def clip(value: object, *, quote: bool = False, limit: int = ECHO_LIMIT) -> str:
    """`value` as text (its repr when `quote`), cut to `limit` characters with an ellipsis
    and the original length when longer."""
    if not isinstance(value, str):  # a repr already reads as quoted
        value, quote = repr(value), False
    if len(value) <= limit:
        return repr(value) if quote else value
    head = value[:limit] + "…"
    return f"{head!r} ({len(value)} characters)" if quote else f"{head} ({len(value)} characters)"


_DURATION_UNITS = {"s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}


def parse_duration(text: str, *, bare: str = "s") -> float:
    """'90s', '30m', '6h', '1.5d', '2w' -> seconds; a bare number is in `bare` units."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = (m.group(2).lower() or bare) if m else ""
    if not m or unit not in _DURATION_UNITS:
        raise ConfigError(f"invalid duration {text!r}: a number with s, m, h, d or w, such as 90s, 30m, 6h, 7d")
    return float(m.group(1)) * _DURATION_UNITS[unit]


def parse_size(text: str) -> int:
    """'200MB' -> 200_000_000; a bare number is bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ConfigError(f"invalid size {text!r}: use bytes or a unit such as 200MB, 1GiB")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def plural(n: int, noun: str) -> str:
    """`n` and the noun, singular for one: "1 invalid row", "2 invalid rows", "1,000 rows"."""
    return f"{n:,} {noun if n == 1 else noun + 's'}"
