"""The direct API (POST /v1/chat/completions, ...) as a bare ASGI handler.

With the `openai` engine, a llmbatch server is often the upstream of another, answering
thousands of direct requests a second; Starlette's routing and middleware would cost more
CPU per request than the engine itself. So these few endpoints are answered here, in front
of the FastAPI app, which serves everything else.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import orjson

from .._text import clip
from ..engines import KNOWN_ENDPOINTS, EngineRequest, error_body
from ._errors import APIError, parse_json_object
from ._limits import body_limit, check_length, counting
from ._stream import send_stream, stream_options

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from ._state import ServerState

__all__ = ["DirectAPI"]

log = logging.getLogger("llmbatch.server")

#: Bytes of an answer handed to the server per send: a 100 MB answer goes out in pieces, with the
#: event loop free between them, instead of being copied whole into the transport's buffer.
_SEND_PIECE = 1024 * 1024


class DirectAPI:
    """ASGI app: refuses bodies over their endpoint's limit (`_limits`, for every route, before
    the key is checked: nothing about tenants is revealed), answers POSTs to the direct
    endpoints, passes everything else to `app`."""

    def __init__(self, app: ASGIApp, server: ServerState) -> None:
        self.app = app
        self.server = server

    def _lifespan_send(self, send: Send) -> Send:
        """When the engine cannot start, the server's log gets its reason, not Starlette's traceback."""

        async def clean(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed" and self.server.start_error is not None:
                message = {**message, "message": self.server.start_error}
            await send(message)

        return clean

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and len(scope["path"]) > 1 and scope["path"].endswith("/"):
            # `/v1/files/` is `/v1/files`: Starlette would answer a 307 redirect before the route
            # checks the caller's key, telling a caller without one which paths exist.
            raw_path = scope.get("raw_path")
            scope = {**scope, "path": scope["path"].rstrip("/") or "/"}
            if raw_path:
                scope["raw_path"] = raw_path.rstrip(b"/") or b"/"
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._lifespan_send(send))
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = body_limit(scope, self.server.config)
        if limit is not None:
            try:
                check_length(scope, limit)
            except APIError as exc:
                await _respond(send, exc.status, orjson.dumps(exc.body), None)
                return
            receive = counting(scope, receive, limit)
        if scope["method"] != "POST" or scope["path"] not in KNOWN_ENDPOINTS:
            await self.app(scope, receive, send)
            return
        chunks = []
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":  # the caller hung up mid-body: not our failure
                    log.info("client disconnected before sending the body of POST %s", scope["path"])
                    return
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    break
        except APIError as exc:  # a chunked body past the limit
            await _respond(send, exc.status, orjson.dumps(exc.body), None)
            return
        checked = self._check(scope, b"".join(chunks))
        if isinstance(checked, APIError):
            await _respond(send, checked.status, orjson.dumps(checked.body), None)
            return
        body, size = checked
        try:
            include_usage = stream_options(body)
        except APIError as exc:
            await _respond(send, exc.status, orjson.dumps(exc.body), None)
            return
        request = EngineRequest(scope["path"], body, size=size)
        if include_usage is None:
            await _respond(send, *await self._answer(request))
            return
        meter = self.server.meter
        t0 = time.perf_counter()
        with meter.busy("direct"):
            pieces = self.server.engine.stream(request)
            answer = await send_stream(pieces, request.endpoint, body, include_usage, receive, send)
        if answer is not None:
            meter.record("direct", request.endpoint, answer, time.perf_counter() - t0)
            if not answer.ok:  # nothing was streamed yet: an ordinary error answer
                await _respond(send, answer.status_code, _json(answer.body), answer.headers)

    def _check(self, scope: Scope, raw: bytes) -> tuple[dict[str, Any], int] | APIError:
        """The request's body and size once the key, the endpoint and the model are checked."""
        srv = self.server
        engine = srv.engine
        endpoint = scope["path"]
        try:
            auth = ""
            for name, value in scope["headers"]:
                if name == b"authorization":
                    auth = value.decode("latin-1")
            srv.owner_of(auth)
            if endpoint not in engine.endpoints:
                raise APIError(
                    404,
                    f"The {engine.name!r} engine does not serve {endpoint}; "
                    f"it serves {', '.join(sorted(engine.endpoints))}.",
                    code="unsupported_endpoint",
                )
            body = parse_json_object(raw)
            model = body.get("model")
            why = engine.validate_model(model) if isinstance(model, str) else None
            if why:
                raise APIError(404, clip(why, limit=1000), param="model", code="model_not_found")
        except APIError as exc:
            return exc
        return body, len(raw)

    async def _answer(self, request: EngineRequest) -> tuple[int, bytes | list[bytes], dict[str, str] | None]:
        try:
            resp = await self.server.meter.handle(self.server.engine, "direct", request)
        except Exception as exc:  # engines should not raise; if one does, answer like the rest of the API
            log.exception("engine failed on a direct %s request", request.endpoint)
            return 500, orjson.dumps(error_body(f"Internal server error: {exc}", "server_error")), None
        return resp.status_code, _json(resp.body), resp.headers

    def __getattr__(self, name: str) -> Any:
        # `app.state`, `app.routes`, ... of the wrapped FastAPI app stay reachable.
        return getattr(self.app, name)


def _json(body: dict[str, Any] | bytes | list[bytes]) -> bytes | list[bytes]:
    return body if isinstance(body, (bytes, list)) else orjson.dumps(body)


async def _respond(send: Send, status: int, content: bytes | list[bytes], headers: dict[str, str] | None) -> None:
    """Sends `content` (JSON, or JSON in parts) in pieces of at most about _SEND_PIECE bytes."""
    parts = content if isinstance(content, list) else [content]
    length = sum(len(p) for p in parts)
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(length).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    if len(parts) == 1 and length <= _SEND_PIECE:
        await send({"type": "http.response.body", "body": parts[0]})
        return
    for i, part in enumerate(parts):
        last_part = i == len(parts) - 1
        if len(part) <= _SEND_PIECE:
            await send({"type": "http.response.body", "body": part, "more_body": not last_part})
            continue
        view = memoryview(part)
        for start in range(0, len(part), _SEND_PIECE):
            piece = bytes(view[start : start + _SEND_PIECE])
            more = not last_part or start + _SEND_PIECE < len(part)
            await send({"type": "http.response.body", "body": piece, "more_body": more})
