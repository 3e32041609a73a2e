"""JSON schema -> llama.cpp grammar (GBNF), with the numeric bounds llama-cpp-python leaves out.

llama-cpp-python's converter turns every `integer` and `number` into any JSON number: it ignores
`minimum` / `maximum` (its own TODO says so), so a `confidence` documented as 0 to 1 came back as
5.02 or 1181903914809537.0. Here the bounds a grammar can state exactly are stated:

- an integer range of at most `MAX_ENUMERATED` values (a rating 1-5, a percentage 0-100) is the
  list of its values; a lower bound of 0 or more alone drops the minus sign;
- a number between two whole bounds at most `MAX_ENUMERATED` apart (0 to 1, 0 to 10, -1 to 1) is
  a whole part in the range, then a fraction, where the upper bound itself takes zeros only;
  a lower bound of 0 alone drops the minus sign.

Other bounds (a fractional bound, `exclusiveMinimum` on a number, a range wider than that) are
not in the grammar; the answer is checked after parsing by whoever validates it (llmbatch's
`Task` validates with the pydantic model and asks again, as it does for any answer that does
not validate).
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["MAX_ENUMERATED", "schema_to_gbnf"]

#: Most alternatives one bounded integer or number becomes (each is a literal the grammar tries).
MAX_ENUMERATED = 256

#: Digits after the point a bounded number may have (llama-cpp-python allows 16 in `number`).
_FRACTION_DIGITS = 15


def schema_to_gbnf(schema: dict[str, Any]) -> str:
    """The GBNF grammar for JSON matching `schema`, numeric bounds included where expressible."""
    from llama_cpp import llama_grammar

    class BoundedConverter(llama_grammar.SchemaConverter):  # type: ignore[misc,name-defined]
        def visit(self, schema: dict[str, Any], name: str) -> str:
            rule = _bounded_rule(schema) if isinstance(schema, dict) else None
            if rule is None:
                return super().visit(schema, name)  # type: ignore[no-any-return]
            if "decimal-part" in rule:
                self._add_primitive("decimal-part", llama_grammar.PRIMITIVE_RULES["decimal-part"])
            if "integral-part" in rule:
                self._add_primitive("integral-part", llama_grammar.PRIMITIVE_RULES["integral-part"])
            rule_name = name + "-" if name in llama_grammar.RESERVED_NAMES else name or "root"
            return self._add_rule(rule_name, rule)  # type: ignore[no-any-return]

    converter = BoundedConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    resolved = converter.resolve_refs(json.loads(json.dumps(schema)), "stdin")
    converter.visit(resolved, "")
    return converter.format_grammar()  # type: ignore[no-any-return]


def _bounded_rule(schema: dict[str, Any]) -> str | None:
    """The grammar rule for a bounded integer or number, or None to leave it to the converter."""
    kind = schema.get("type")
    if kind not in ("integer", "number") or any(k in schema for k in ("enum", "const", "$ref", "anyOf", "oneOf")):
        return None
    lo, hi = _bound(schema, "minimum"), _bound(schema, "maximum")
    if kind == "integer":
        lo = _integer_bound(lo, _bound(schema, "exclusiveMinimum"), up=True)
        hi = _integer_bound(hi, _bound(schema, "exclusiveMaximum"), up=False)
        if lo is not None and hi is not None and 0 <= hi - lo < MAX_ENUMERATED:
            return "(" + " | ".join(f'"{v}"' for v in range(int(lo), int(hi) + 1)) + ") space"
        if lo is not None and lo >= 0:
            return "integral-part space"
        return None
    if "exclusiveMinimum" in schema or "exclusiveMaximum" in schema:
        return None
    if lo is not None and hi is not None and lo.is_integer() and hi.is_integer() and 0 <= hi - lo <= MAX_ENUMERATED:
        return _number_range(int(lo), int(hi))
    if lo == 0 and hi is None:
        return 'integral-part ("." decimal-part)? space'
    return None


def _bound(schema: dict[str, Any], key: str) -> float | None:
    value = schema.get(key)
    # A draft-4 boolean exclusiveMinimum is not a bound of its own; bool is an int in Python.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _integer_bound(inclusive: float | None, exclusive: float | None, *, up: bool) -> float | None:
    """The tightest whole bound of an integer, from its inclusive and exclusive bounds."""
    candidates = []
    if inclusive is not None:
        candidates.append(math.ceil(inclusive) if up else math.floor(inclusive))
    if exclusive is not None:
        candidates.append(math.floor(exclusive) + 1 if up else math.ceil(exclusive) - 1)
    if not candidates:
        return None
    return float(max(candidates) if up else min(candidates))


def _number_range(lo: int, hi: int) -> str:
    """A number in [lo, hi] for whole lo <= hi: each whole part, then a fraction; a bound's own
    whole part takes zeros only where a fraction would leave the range (hi, and lo below 0)."""
    fraction = '("." decimal-part)?'
    zeros = '("." "0"' + "".join(' ("0"' for _ in range(_FRACTION_DIGITS - 1)) + ")?" * _FRACTION_DIGITS
    alternatives = []
    for whole in range(max(lo, 0), hi + 1):  # 0 <= v: whole.fraction <= hi
        alternatives.append(f'"{whole}" {zeros if whole == hi else fraction}')
    for whole in range(0, -lo + 1) if lo < 0 else ():  # v < 0: -(whole.fraction) >= lo
        if -whole > hi:  # the whole range is below zero: -(whole.fraction) <= hi needs whole >= -hi
            continue
        alternatives.append(f'"-{whole}" {zeros if whole == -lo else fraction}')
    return "(" + " | ".join(alternatives) + ") space"
