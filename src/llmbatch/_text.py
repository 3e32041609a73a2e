"""Clipping of caller-supplied strings echoed back in error messages.

A caller can send a 20 KB model name or a 6,000-character id; echoing it whole in every error
(and every batch object that embeds the error) multiplies it. Messages show the start of the
string and its length instead, which is enough to recognise it.
"""

from __future__ import annotations

__all__ = ["clip", "plural", "ECHO_LIMIT"]

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


def plural(n: int, noun: str) -> str:
    """`n` and the noun, singular for one: "1 invalid row", "2 invalid rows", "1,000 rows"."""
    return f"{n:,} {noun if n == 1 else noun + 's'}"
