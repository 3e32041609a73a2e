"""Errors as Python callers read them: the flags a message names become keyword arguments.

The jobs layer words its errors for the CLI ("set OPENAI_API_KEY or pass --api-key"); a caller
of `run_file` or `BatchClient` has no flags, so the message is reworded once, here at the
boundary ("... or pass api_key="). Only flags that are parameters are reworded: commands a
message suggests (`llmbatch jobs rm ID`) stay as they are.
"""

from __future__ import annotations

import re
from typing import TypeVar

from .._exceptions import LLMBatchError
from ..engines import ENGINE_OPTIONS
from ..jobs import JobSettings

__all__ = ["python_names"]

E = TypeVar("E", bound=BaseException)

#: A flag, and the metavar after it if any ("--price-file FILE").
_FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9-]*)(?: ([A-Z][A-Z_]*)\b)?")
_PARAMS = frozenset(
    {"api_key", *JobSettings.model_fields, *(f for model in ENGINE_OPTIONS.values() for f in model.model_fields)}
)


def python_names(exc: E) -> E:
    """`exc` with the flags its message names as the Python parameters they are (in place)."""
    if isinstance(exc, LLMBatchError) and exc.args and isinstance(exc.args[0], str):
        exc.args = (_FLAG.sub(_param, exc.args[0]), *exc.args[1:])
    return exc


def _param(match: re.Match[str]) -> str:
    name = match.group(1).replace("-", "_")
    if name not in _PARAMS:
        return match.group(0)
    return f"{name}={match.group(2) or ''}"
