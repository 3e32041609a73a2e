"""Request size limits per endpoint, in one place (the README's "Limits" table lists them).

A body over its endpoint's limit is answered 413 before it is read: by its Content-Length when
it has one, else by counting the chunks of a chunked body as they arrive. Reading and parsing a
200 MB JSON body on the event loop would stall every other caller for seconds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..engines import KNOWN_ENDPOINTS
from ._errors import APIError

if TYPE_CHECKING:
    from starlette.types import Message, Receive, Scope

    from ._config import ServerConfig

__all__ = ["MAX_ID_CHARS", "BATCH_CREATE_BYTES", "OTHER_BODY_BYTES", "body_limit", "check_length", "counting"]

#: Longest object id (file, batch) looked up; ours are 30 characters. A longer one is a 404
#: without a database lookup, and its error shows only its start (`_text.clip`).
MAX_ID_CHARS = 128
#: POST /v1/batches: four short fields and at most 16 metadata pairs (about 10 KB) fit many times over.
BATCH_CREATE_BYTES = 1024 * 1024
#: Every other request (cancel, GET, DELETE) carries no body worth reading.
OTHER_BODY_BYTES = 64 * 1024


def body_limit(scope: Scope, config: ServerConfig) -> int | None:
    """The most body bytes the request in `scope` may send; None: its route counts them itself
    (uploads stop writing past `max_file_bytes`, see `_upload`)."""
    method, path = scope["method"], scope["path"]
    if method == "POST":
        if path in KNOWN_ENDPOINTS:
            return config.max_request_bytes
        if path == "/v1/files":
            return None
        if path == "/v1/batches":
            return BATCH_CREATE_BYTES
    return OTHER_BODY_BYTES


def _too_large(scope: Scope, limit: int, size: str) -> APIError:
    return APIError(
        413,
        f"The request body is {size}; {scope['method']} {scope['path']} takes at most {limit:,} bytes.",
        code="request_too_large",
    )


def check_length(scope: Scope, limit: int) -> None:
    """Raises APIError 413 when the request's Content-Length is over `limit`."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                return  # the HTTP parser has already refused it
            if length > limit:
                raise _too_large(scope, limit, f"{length:,} bytes")


def counting(scope: Scope, receive: Receive, limit: int) -> Receive:
    """`receive`, raising APIError 413 once the body passes `limit` bytes (a chunked body has no
    Content-Length to check first)."""
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _too_large(scope, limit, f"over {limit:,} bytes")
        return message

    return wrapped
