"""What the engines share to read OpenAI request bodies and to build their answers.

The echo engine, the model engines and the sentence embedder parse the same fields and fail
the same way (`BadRequest`, answered with a 400 naming the parameter), so those pieces live
here rather than in any one engine. Plain code, no pydantic: it runs once per request.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import sys
from array import array
from collections.abc import Iterator
from typing import Any

import orjson

__all__ = [
    "BadRequest",
    "MODEL_CREATED",
    "hex_id",
    "opt_positive_int",
    "stop_strings",
    "embedding_base64",
    "resolve_future",
    "check_json_schema",
    "json_parts",
    "short_gil_turns",
]

#: The `created` time of every model in GET /v1/models: fixed, so the list is stable across restarts.
MODEL_CREATED = 1_700_000_000

_LITTLE_ENDIAN = sys.byteorder == "little"
# Ids need uniqueness, not secrecy; a private generator leaves the global `random` state alone.
_rng = random.Random()


class BadRequest(Exception):
    """A request body OpenAI would reject with 400; `param` names the offending field."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


#: Largest count a schema may ask of an answer (minItems, minLength, ...): engines build or
#: generate at least that much, so `minItems: 10**12` would exhaust memory or never end.
MAX_SCHEMA_COUNT = 10_000
#: Most `enum` values in one schema, all enums together: OpenAI's own limit for structured
#: outputs. Each is an alternative an engine's grammar weighs at every token (llama.cpp takes
#: ~3 s just to build a grammar of 50,000).
MAX_ENUM_VALUES = 1_000
#: Deepest nesting and most nodes checked in a schema: a bound on the work of checking it.
_MAX_SCHEMA_DEPTH = 64
_MAX_SCHEMA_NODES = 100_000
_COUNT_KEYWORDS = ("minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties")


def check_json_schema(schema: Any, param: str = "response_format.json_schema.schema") -> None:
    """Raises BadRequest naming the path of the first keyword in `schema` that no answer could
    satisfy within this server's bounds: counts that are not non-negative integers, a `min*`
    above MAX_SCHEMA_COUNT, more than MAX_ENUM_VALUES enum values, a schema nested or sized past
    what is checked. Every engine calls it
    before synthesising or compiling an answer, so absurd schemas are the caller's 400, not a 500."""
    nodes = enums = 0
    stack: list[tuple[Any, str, int]] = [(schema, param, 0)]
    while stack:
        node, path, depth = stack.pop()
        nodes += 1
        if depth > _MAX_SCHEMA_DEPTH or nodes > _MAX_SCHEMA_NODES:
            raise BadRequest(
                f"Invalid schema: nested deeper than {_MAX_SCHEMA_DEPTH} or larger than this server takes.", path
            )
        if isinstance(node, list):
            stack += [(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(node)]
            continue
        if not isinstance(node, dict):
            continue
        for key in _COUNT_KEYWORDS:
            if key not in node:
                continue
            value = node[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise BadRequest(f"Invalid schema: '{key}' must be a non-negative integer.", f"{path}.{key}")
            if key.startswith("min") and value > MAX_SCHEMA_COUNT:
                raise BadRequest(
                    f"Invalid schema: '{key}' is at most {MAX_SCHEMA_COUNT} on this server.", f"{path}.{key}"
                )
        if isinstance(node.get("enum"), list):
            enums += len(node["enum"])
            if enums > MAX_ENUM_VALUES:
                raise BadRequest(
                    f"Invalid schema: at most {MAX_ENUM_VALUES} enum values in all (OpenAI's limit).", f"{path}.enum"
                )
        stack += [(v, f"{path}.{k}", depth + 1) for k, v in node.items() if isinstance(v, (dict, list))]


#: Bytes of JSON per part of a big answer (see `json_parts`).
PART_BYTES = 1 << 20


def json_parts(body: dict[str, Any]) -> list[bytes]:
    """`body` as JSON in parts of about PART_BYTES, which concatenated are `orjson.dumps(body)`.

    For big answers, built in a worker thread: orjson holds the GIL for a whole call, and one copy
    of a 130 MB answer takes 0.2 s; item by item of its top-level arrays (embeddings, choices), the
    GIL changes hands between calls and no single copy is large.
    """
    parts: list[bytes] = []
    buf: list[bytes] = []
    size = 0
    for i, (key, value) in enumerate(body.items()):
        buf.append(b'{"' if i == 0 else b',"')
        buf.append(orjson.dumps(key)[1:] + b":")
        if not isinstance(value, list):
            buf.append(orjson.dumps(value))
            continue
        buf.append(b"[")
        for j, item in enumerate(value):
            piece = orjson.dumps(item)
            buf.append(b"," + piece if j else piece)
            size += len(piece)
            if size >= PART_BYTES:
                parts.append(b"".join(buf))
                buf, size = [], 0
        buf.append(b"]")
    buf.append(b"}" if body else b"{}")
    parts.append(b"".join(buf))
    return parts


_SHORT_TURN = 0.001
_short_turn_users = 0
_usual_turn = 0.005


@contextlib.contextmanager
def short_gil_turns() -> Iterator[None]:
    """While held, threads take the GIL in 1 ms turns instead of 5 ms. Enter it on the event loop
    around work sent to a thread: the loop waits for the GIL at each of its several handovers
    per request, so with 5 ms turns a health check takes ~12 ms (p99 ~57 ms) while a big answer
    is built, with 1 ms ~4 ms (p99 ~35 ms). Only then: shorter turns cost a batch of ordinary
    rows ~12% of its speed. Holders are counted, so overlapping ones restore the usual turn once."""
    global _short_turn_users, _usual_turn
    if _short_turn_users == 0:
        _usual_turn = sys.getswitchinterval()
        sys.setswitchinterval(_SHORT_TURN)
    _short_turn_users += 1
    try:
        yield
    finally:
        _short_turn_users -= 1
        if _short_turn_users == 0:
            sys.setswitchinterval(_usual_turn)


def hex_id(prefix: str) -> str:
    """A random id in OpenAI's style: `prefix` and 24 hex digits."""
    return f"{prefix}{_rng.getrandbits(96):024x}"


def opt_positive_int(body: dict[str, Any], name: str, maximum: int | None = None) -> int | None:
    """`body[name]` when present: a positive integer, at most `maximum`; BadRequest otherwise."""
    value = body.get(name)
    if value is None:
        return None
    # `type(...) is int` rather than isinstance: JSON true must not pass as 1.
    if type(value) is not int or value < 1:
        raise BadRequest(f"Invalid '{name}': expected a positive integer, got {value!r}.", name)
    if maximum is not None and value > maximum:
        raise BadRequest(f"Invalid '{name}': must be at most {maximum}, got {value}.", name)
    return value


def stop_strings(body: dict[str, Any]) -> tuple[str, ...]:
    """The non-empty stop strings of `body["stop"]` (a string or an array of strings)."""
    stop = body.get("stop")
    if stop is None:
        return ()
    if type(stop) is str:
        return (stop,) if stop else ()
    if isinstance(stop, list) and all(type(s) is str for s in stop):
        return tuple(s for s in stop if s)
    raise BadRequest("Invalid 'stop': expected a string or an array of strings.", "stop")


def embedding_base64(vector: array) -> str:
    """A float32 vector as OpenAI's `encoding_format: base64` writes it (little-endian)."""
    if not _LITTLE_ENDIAN:
        vector = array("f", vector)
        vector.byteswap()
    return base64.b64encode(vector.tobytes()).decode("ascii")


def resolve_future(future: asyncio.Future[None]) -> None:
    """Marks `future` done unless it already is (its waiter may have been cancelled).

    Worker threads hand it to `loop.call_soon_threadsafe` when a queued request is finished.
    """
    with contextlib.suppress(asyncio.InvalidStateError):
        future.set_result(None)
