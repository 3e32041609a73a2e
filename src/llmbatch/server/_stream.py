"""`stream: true` on the direct endpoints: server-sent events, as OpenAI sends them.

Chat and completions answers go out as `chat.completion.chunk` / `text_completion` chunks and
end with `data: [DONE]`; `stream_options.include_usage` adds a last chunk with the usage and no
choices. Responses answers go out as the Responses API's typed events (`response.created`,
`response.output_text.delta`, ..., `response.completed`).

Every engine streams: one that generates token by token (`Engine.stream` yields `TextDelta`s:
llamacpp) sends text as it comes; any other is answered whole and its text sent in one piece.
An error before the first piece is an ordinary JSON error answer with its status; one after it
is an `error` event, as OpenAI sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson

from ..engines import CHAT, RESPONSES, EngineResponse, TextDelta, hex_id
from ._errors import APIError

if TYPE_CHECKING:
    from starlette.types import Receive, Send

__all__ = ["stream_options", "send_stream"]

_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # proxies such as nginx would otherwise hold the events back
]


def stream_options(body: dict[str, Any]) -> bool | None:
    """None when `body` asks for no stream, else whether it asks for a usage chunk; removes both
    fields from `body` (the engine answers the request as if unstreamed). APIError when invalid."""
    stream = body.pop("stream", None)
    options = body.pop("stream_options", None)
    if stream not in (None, True, False):
        raise APIError(400, "Invalid 'stream': expected a boolean.", param="stream", code="invalid_value")
    if not stream:
        if options is not None:
            message = "The 'stream_options' parameter is only allowed when 'stream' is enabled."
            raise APIError(400, message, param="stream_options", code="invalid_value")
        return None
    if options is None:
        return False
    usage = options.get("include_usage") if isinstance(options, dict) else None
    if not isinstance(options, dict) or usage not in (None, True, False):
        message = "Invalid 'stream_options': expected an object with a boolean 'include_usage'."
        raise APIError(400, message, param="stream_options", code="invalid_value")
    return bool(usage)


async def send_stream(
    pieces: AsyncIterator[TextDelta | EngineResponse],
    endpoint: str,
    body: dict[str, Any],
    include_usage: bool,
    receive: Receive,
    send: Send,
) -> EngineResponse | None:
    """Streams `pieces` (an engine's `stream`) to the caller; returns the engine's final answer,
    or None when the caller hung up first (the engine's generation is then cancelled)."""
    events = _Responses(body) if endpoint == RESPONSES else _Chunks(endpoint, body, include_usage)
    hung_up = asyncio.ensure_future(_disconnected(receive))
    started = False
    try:
        async for piece in _until(pieces, hung_up):
            if isinstance(piece, TextDelta):
                if not started:
                    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
                    await _send(send, events.start())
                    started = True
                await _send(send, events.delta(piece.index, piece.text))
                continue
            if not started and not piece.ok:
                return piece  # nothing sent yet: the caller gets the error with its status
            if not started:
                await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
                await _send(send, events.start())
            body_of = piece.body if isinstance(piece.body, dict) else orjson.loads(b"".join(_parts(piece.body)))
            await _send(send, events.end(body_of) if piece.ok else events.error(body_of))
            await send({"type": "http.response.body", "body": b""})
            return piece
        return None
    finally:
        hung_up.cancel()
        with contextlib.suppress(Exception):  # already closed by the cancelled step
            await pieces.aclose()  # type: ignore[attr-defined]


def _parts(body: bytes | list[bytes]) -> list[bytes]:
    return body if isinstance(body, list) else [body]


async def _disconnected(receive: Receive) -> None:
    """Returns once the caller hangs up (the request's body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _until(
    pieces: AsyncIterator[TextDelta | EngineResponse], hung_up: asyncio.Future[None]
) -> AsyncIterator[TextDelta | EngineResponse]:
    """`pieces`, until the caller hangs up."""
    while True:
        step = asyncio.ensure_future(anext(pieces))
        done, _ = await asyncio.wait({step, hung_up}, return_when=asyncio.FIRST_COMPLETED)
        if step not in done:
            step.cancel()
            return
        try:
            yield step.result()
        except StopAsyncIteration:
            return


async def _send(send: Send, events: list[bytes]) -> None:
    if events:
        await send({"type": "http.response.body", "body": b"".join(events), "more_body": True})


def _data(value: Any) -> bytes:
    return b"data: " + orjson.dumps(value) + b"\n\n"


class _Chunks:
    """Chat and completions chunks: text per choice as it comes, then each choice's
    finish_reason, the usage chunk when asked for, and `[DONE]`."""

    def __init__(self, endpoint: str, body: dict[str, Any], include_usage: bool) -> None:
        self.chat = endpoint == CHAT
        self.include_usage = include_usage
        self.sent: dict[int, int] = {}  # characters of each choice's text already sent
        self.head: dict[str, Any] = {
            "id": hex_id("chatcmpl-" if self.chat else "cmpl-"),
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": int(time.time()),
            "model": body.get("model"),
        }

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        usage = {"usage": None} if self.include_usage else {}
        return _data({**self.head, "choices": choices, **usage, **extra})

    def _choice(self, index: int, text: str | None, finish: str | None) -> dict[str, Any]:
        if self.chat:
            delta = {} if text is None else {"content": text}
            if index not in self.sent:
                delta = {"role": "assistant", **delta}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"text": text or "", "index": index, "logprobs": None, "finish_reason": finish}
        self.sent.setdefault(index, 0)
        return choice

    def start(self) -> list[bytes]:
        return []

    def delta(self, index: int, text: str) -> list[bytes]:
        choice = self._choice(index, text, None)
        self.sent[index] += len(text)
        return [self._chunk([choice])]

    def end(self, body: dict[str, Any]) -> list[bytes]:
        out = []
        self.head["model"] = body.get("model", self.head["model"])
        for i, c in enumerate(body.get("choices") or []):
            index = c.get("index", i)
            text = (c.get("message") or {}).get("content") if self.chat else c.get("text")
            rest = (text or "")[self.sent.get(index, 0) :]  # a buffered answer: all of it
            if rest:
                out += self.delta(index, rest)
            out.append(self._chunk([self._choice(index, None, c.get("finish_reason"))]))
        if self.include_usage:
            out.append(_data({**self.head, "choices": [], "usage": body.get("usage")}))
        return [*out, b"data: [DONE]\n\n"]

    def error(self, body: dict[str, Any]) -> list[bytes]:
        return [_data(body)]


class _Responses:
    """The Responses API's events for one message of output text."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.seq = 0
        self.item_id = hex_id("msg_")
        self.text: list[str] = []
        self.response: dict[str, Any] = {
            "id": hex_id("resp_"),
            "object": "response",
            "created_at": int(time.time()),
            "status": "in_progress",
            "error": None,
            "incomplete_details": None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "model": body.get("model"),
            "output": [],
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "temperature": body.get("temperature", 1.0),
            "tool_choice": body.get("tool_choice") or "auto",
            "tools": [],
            "top_p": body.get("top_p", 1.0),
            "metadata": body.get("metadata") or {},
            "usage": None,
        }

    def _event(self, kind: str, **fields: Any) -> bytes:
        self.seq += 1
        data = orjson.dumps({"type": kind, "sequence_number": self.seq - 1, **fields})
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "output_index": 0, "content_index": 0}

    def _item(self, status: str, text: str | None) -> dict[str, Any]:
        content = [] if text is None else [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        return {"type": "message", "id": self.item_id, "status": status, "role": "assistant", "content": content}

    def start(self) -> list[bytes]:
        return [
            self._event("response.created", response=self.response),
            self._event("response.in_progress", response=self.response),
            self._event("response.output_item.added", output_index=0, item=self._item("in_progress", None)),
            self._event(
                "response.content_part.added",
                **self._where(),
                part={"type": "output_text", "text": "", "annotations": [], "logprobs": []},
            ),
        ]

    def delta(self, index: int, text: str) -> list[bytes]:
        self.text.append(text)
        return [self._event("response.output_text.delta", **self._where(), delta=text, logprobs=[])]

    def end(self, body: dict[str, Any]) -> list[bytes]:
        output = body.get("output") or [{}]
        text = "".join(p.get("text", "") for p in output[0].get("content") or [])
        sent = "".join(self.text)
        out = self.delta(0, text[len(sent) :]) if len(text) > len(sent) else []
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        final = {**body, "id": self.response["id"], "created_at": self.response["created_at"]}
        final["output"] = [{**output[0], "id": self.item_id}]
        done = "response.completed" if body.get("status") == "completed" else "response.incomplete"
        return [
            *out,
            self._event("response.output_text.done", **self._where(), text=text, logprobs=[]),
            self._event("response.content_part.done", **self._where(), part=part),
            self._event("response.output_item.done", output_index=0, item=final["output"][0]),
            self._event(done, response=final),
        ]

    def error(self, body: dict[str, Any]) -> list[bytes]:
        error = body.get("error") or {}
        return [self._event("error", code=error.get("code"), message=error.get("message"), param=error.get("param"))]
