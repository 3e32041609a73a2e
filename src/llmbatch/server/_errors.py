"""The server's errors: `APIError`, answered in OpenAI's envelope, and the handlers that
turn every other failure of a route into the same envelope."""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from .._text import clip
from ..engines import error_body
from ._disk import free_bytes, is_disk_full

__all__ = ["APIError", "parse_json_object", "json_response", "add_error_handlers"]

log = logging.getLogger("llmbatch.server")


class APIError(Exception):
    """An error answered with OpenAI's envelope and an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(message, type, param=param, code=code)


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """`data` as a JSON response, serialised with orjson."""
    return Response(orjson.dumps(data), status_code=status, media_type="application/json", headers=headers)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """A request body that must be a JSON object; APIError 400 otherwise."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise APIError(400, f"We could not parse the JSON body of your request: {exc}") from exc
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.")
    return body


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return json_response(exc.body, exc.status)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        message = f"Unknown request URL: {request.method} {clip(request.url.path)}."
    else:
        message = str(exc.detail)
    return json_response(error_body(message, "invalid_request_error"), exc.status_code)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return json_response(error_body(f"Invalid request: {exc.errors()}", "invalid_request_error"), 400)


async def _client_disconnect(request: Request, exc: Exception) -> Response:
    # The caller hung up before sending its whole body: nothing failed here, and nobody reads the answer.
    log.info("client disconnected before sending the body of %s %s", request.method, clip(request.url.path))
    return Response(status_code=400)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("internal error on %s %s", request.method, request.url.path)
    return json_response(error_body(f"Internal server error: {exc}", "server_error"), 500)


async def _storage_error(request: Request, exc: Exception) -> Response:
    """OSError and SQLite errors. Handled here, not as 500s by Starlette's ServerErrorMiddleware,
    which would re-raise them to uvicorn for a second traceback."""
    if not is_disk_full(exc):
        return await _internal_error(request, exc)
    # A full disk (or SQLite full) is the server's state, not a bug: one line, no traceback.
    srv = request.app.state.server
    if srv.worker is not None:
        srv.worker.note_disk_full(True)
    where = srv.config.data_dir
    log.warning("%s %s: disk full in %s (%s)", request.method, clip(request.url.path), where, exc)
    message = (
        f"Insufficient storage: the server's disk is full ({free_bytes(where)} bytes free); "
        "nothing was changed. Try again later."
    )
    return json_response(error_body(message, "server_error", code="insufficient_storage"), 507)


def add_error_handlers(app: FastAPI) -> None:
    """Answers APIError, unknown URLs, invalid requests and unexpected failures in OpenAI's envelope."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ClientDisconnect, _client_disconnect)
    app.add_exception_handler(OSError, _storage_error)
    app.add_exception_handler(sqlite3.Error, _storage_error)
    app.add_exception_handler(Exception, _internal_error)
