"""A fake of Anthropic's Message Batches API and Messages API (shared/reference/provider-batch-apis.md, section 3).

`anthropic_fake(**options)` returns `(app, fake)`: an ASGI app and the `FakeAnthropic` that holds
its state (batches, every call received) and the controls tests steer it with.

Wire details as the real API has them: the key (`x-api-key`, or `Authorization: Bearer`, which
the SDK sends since 2.x) and `anthropic-version` headers required (`?beta=true` accepted);
errors in the `{"type": "error", "error": {type, message}}` envelope; RFC 3339 timestamps;
lists newest first with `limit`, `after_id`, `before_id`, `has_more`, `first_id`, `last_id`;
request counts all 0 but `processing` until a batch ends; `results_url` only once ended;
results as JSONL in shuffled order; delete only after processing ended.

Create checks what the real API checks up front (custom_id pattern and uniqueness, `max_tokens`,
at most 100,000 requests and 256 MB) and answers 400; each request's params are checked when the
batch ends (roles alternate, known blocks, tool results answer tool uses, sampling ranges, stop
sequences with text...), and a bad one ends `errored` with `invalid_request_error`, as real
batches do.

A batch ends after `end_after_polls` retrievals or `end_after_seconds`, whichever comes first.
A marker in a request's last user message picks its fate: `FAIL400` errored
(invalid_request_error), `FAIL429` errored (rate_limit_error) the first time its custom_id is
seen and answered after, `FAIL500` errored (api_error) every time, `EXPIRE` expired. A success
echoes the user's text as `content[0].text` (JSON `{"echo": text}` under a structured output
format; a `tool_use` block when tools are offered), cut at a stop sequence or at `max_tokens`
words, with usage counting words, cache reads for requests with a system prompt.
Controls: `expire(batch_id)` ends a batch now with its requests expired; `add_batch(...)` plants
a batch made by someone else; `create_latency` delays create's answer after the batch exists
(a window for kills); `cancel_completes` requests of a cancelled batch still finish; `max_body`
lowers the 256 MB a create's body may have (413 past it), so that tests of size limits stay small.
"""

from __future__ import annotations

import datetime as dt
import random
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import anyio
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

__all__ = ["FakeAnthropic", "FakeBatch", "anthropic_fake", "MARKERS"]

MARKERS = ("FAIL400", "FAIL429", "FAIL500", "EXPIRE")
CUSTOM_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")
MAX_REQUESTS = 100_000
MAX_BODY = 256_000_000
_PARAMS = {
    "model", "max_tokens", "messages", "system", "stop_sequences", "temperature", "top_p", "top_k", "tools",
    "tool_choice", "metadata", "output_config", "thinking", "cache_control", "service_tier", "inference_geo",
}  # fmt: skip
_IMAGE_TYPES = {"image/jpeg", "image/png", "image/gif", "image/webp"}


def rfc3339(t: float | None) -> str | None:
    if t is None:
        return None
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat().replace("+00:00", "Z")


def error(status: int, kind: str, message: str) -> Response:
    body = {"type": "error", "error": {"type": kind, "message": message}, "request_id": f"req_{uuid.uuid4().hex[:24]}"}
    return Response(orjson.dumps(body), status, media_type="application/json")


def ok(obj: Any) -> Response:
    return Response(orjson.dumps(obj), 200, media_type="application/json", headers={"request-id": "req_fake"})


@dataclass
class FakeBatch:
    id: str
    requests: list[dict[str, Any]]
    created_at: float
    status: str = "in_progress"
    polls: int = 0
    ended_at: float | None = None
    cancel_initiated_at: float | None = None
    #: custom_id -> result object, once ended.
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    foreign: bool = False

    @property
    def custom_ids(self) -> list[str]:
        return [r["custom_id"] for r in self.requests]


class FakeAnthropic:
    """The fake's state and controls; `app` serves it."""

    def __init__(
        self,
        *,
        api_key: str = "test",
        end_after_polls: int | None = 2,
        end_after_seconds: float | None = None,
        create_latency: float = 0.0,
        cancel_completes: int = 0,
        page_cap: int = 1000,
        max_body: int = MAX_BODY,
        seed: int = 0,
    ) -> None:
        self.api_key = api_key
        self.end_after_polls = end_after_polls
        self.end_after_seconds = end_after_seconds
        self.create_latency = create_latency
        self.cancel_completes = cancel_completes
        self.page_cap = page_cap
        self.max_body = max_body
        self.rng = random.Random(seed)
        self.lock = threading.RLock()
        self.batches: dict[str, FakeBatch] = {}
        #: (method, path?query) of every call, in order.
        self.calls: list[tuple[str, str]] = []
        self.creates = 0
        #: The body size of every create asked for (refused ones too), in order.
        self.create_sizes: list[int] = []
        #: Bodies sent to POST /v1/messages.
        self.direct_requests: list[dict[str, Any]] = []
        self._seen_429: set[str] = set()
        self.app = Starlette(
            routes=[
                Route("/v1/messages/batches", self._create, methods=["POST"]),
                Route("/v1/messages/batches", self._list, methods=["GET"]),
                Route("/v1/messages/batches/{id}", self._retrieve, methods=["GET"]),
                Route("/v1/messages/batches/{id}", self._delete, methods=["DELETE"]),
                Route("/v1/messages/batches/{id}/cancel", self._cancel, methods=["POST"]),
                Route("/v1/messages/batches/{id}/results", self._results, methods=["GET"]),
                Route("/v1/messages", self._message, methods=["POST"]),
            ]
        )

    # -- controls ------------------------------------------------------------------------

    def add_batch(
        self, custom_ids: list[str], *, created_at: float | None = None, ended: bool = False, text: str = "theirs"
    ) -> FakeBatch:
        """Plants a batch somebody else made (same API key, other requests)."""
        requests = [
            {
                "custom_id": cid,
                "params": {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": text}]},
            }
            for cid in custom_ids
        ]
        with self.lock:
            b = FakeBatch(f"msgbatch_{uuid.uuid4().hex[:24]}", requests, created_at or time.time(), foreign=True)
            self.batches[b.id] = b
            if ended:
                self._end(b)
            return b

    def expire(self, batch_id: str) -> None:
        """Ends a batch now: its requests expired (the 24 hours passed)."""
        with self.lock:
            b = self.batches[batch_id]
            b.results = {cid: {"type": "expired"} for cid in b.custom_ids}
            b.status, b.ended_at = "ended", time.time()

    def custom_id_sets(self) -> dict[str, frozenset[str]]:
        """batch id -> the custom_ids it was sent (batches this fake was asked to create)."""
        with self.lock:
            return {b.id: frozenset(b.custom_ids) for b in self.batches.values() if not b.foreign}

    # -- batch lifecycle -----------------------------------------------------------------

    def _tick(self, b: FakeBatch) -> None:
        if b.status == "canceling":
            self._end(b, cancelled=True)
        elif b.status == "in_progress":
            by_polls = self.end_after_polls is not None and b.polls >= self.end_after_polls
            by_time = self.end_after_seconds is not None and time.time() - b.created_at >= self.end_after_seconds
            if by_polls or by_time:
                self._end(b)

    def _end(self, b: FakeBatch, cancelled: bool = False) -> None:
        for n, req in enumerate(b.requests):
            if cancelled and n >= self.cancel_completes:
                b.results[req["custom_id"]] = {"type": "canceled"}
            else:
                b.results[req["custom_id"]] = self._answer(req["custom_id"], req["params"], batch=True)
        b.status, b.ended_at = "ended", time.time()

    def _answer(self, custom_id: str, params: dict[str, Any], *, batch: bool) -> dict[str, Any]:
        """The result of one request: succeeded, errored or expired."""
        problem = check_params(params)
        if problem:
            return _errored("invalid_request_error", problem)
        text = last_user_text(params)
        if "FAIL400" in text:
            return _errored("invalid_request_error", "FAIL400 marker: this request is invalid")
        if "FAIL500" in text:
            return _errored("api_error", "FAIL500 marker: internal error")
        if "FAIL429" in text and custom_id not in self._seen_429:
            self._seen_429.add(custom_id)
            return _errored("rate_limit_error", "FAIL429 marker: rate limited, once")
        if "EXPIRE" in text and batch:
            return {"type": "expired"}
        return {"type": "succeeded", "message": reply(params, text)}

    def _json(self, b: FakeBatch, base: str) -> dict[str, Any]:
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        if b.status == "ended":
            for r in b.results.values():
                counts[r["type"]] += 1
        else:
            counts["processing"] = len(b.requests)
        return {
            "id": b.id,
            "type": "message_batch",
            "processing_status": b.status,
            "request_counts": counts,
            "created_at": rfc3339(b.created_at),
            "expires_at": rfc3339(b.created_at + 86400),
            "ended_at": rfc3339(b.ended_at),
            "cancel_initiated_at": rfc3339(b.cancel_initiated_at),
            "archived_at": None,
            "results_url": f"{base}v1/messages/batches/{b.id}/results" if b.status == "ended" else None,
        }

    # -- HTTP ----------------------------------------------------------------------------

    def _auth(self, request: Request) -> Response | None:
        with self.lock:
            query = request.url.query
            self.calls.append((request.method, request.url.path + (f"?{query}" if query else "")))
        # The reference names x-api-key; the installed SDK (2.x) sends `Authorization: Bearer KEY`.
        bearer = request.headers.get("authorization", "")
        key = request.headers.get("x-api-key") or (bearer[7:] if bearer.startswith("Bearer ") else None)
        if key != self.api_key:
            return error(401, "authentication_error", "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            return error(400, "invalid_request_error", "anthropic-version: header is required")
        return None

    async def _create(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        raw = await request.body()
        with self.lock:
            self.create_sizes.append(len(raw))
        if len(raw) > self.max_body:
            return error(413, "request_too_large", "Request exceeds the maximum allowed number of bytes")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return error(400, "invalid_request_error", "the body is not valid JSON")
        requests = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(requests, list) or not requests:
            return error(400, "invalid_request_error", "requests: a non-empty list is required")
        if len(requests) > MAX_REQUESTS:
            return error(400, "invalid_request_error", f"requests: at most {MAX_REQUESTS} per batch")
        seen: set[str] = set()
        for i, req in enumerate(requests):
            cid = req.get("custom_id") if isinstance(req, dict) else None
            params = req.get("params") if isinstance(req, dict) else None
            if not isinstance(cid, str) or not CUSTOM_ID.fullmatch(cid):
                return error(
                    400, "invalid_request_error", f"requests.{i}.custom_id: must match ^[a-zA-Z0-9_-]{{1,64}}$"
                )
            if cid in seen:
                return error(400, "invalid_request_error", f"requests.{i}.custom_id: {cid} is not unique in the batch")
            seen.add(cid)
            if not isinstance(params, dict):
                return error(400, "invalid_request_error", f"requests.{i}.params: required")
            mt = params.get("max_tokens")
            if isinstance(mt, bool) or not isinstance(mt, int) or mt < 1:
                return error(400, "invalid_request_error", f"requests.{i}.params.max_tokens: Field required")
            if not isinstance(params.get("model"), str) or not isinstance(params.get("messages"), list):
                return error(400, "invalid_request_error", f"requests.{i}.params: model and messages are required")
        with self.lock:
            b = FakeBatch(f"msgbatch_{uuid.uuid4().hex[:24]}", requests, time.time())
            self.batches[b.id] = b
            self.creates += 1
            answer = self._json(b, str(request.base_url))
        if self.create_latency:
            await anyio.sleep(self.create_latency)
        return ok(answer)

    async def _retrieve(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        with self.lock:
            b = self.batches.get(request.path_params["id"])
            if b is None:
                return error(404, "not_found_error", "batch not found")
            b.polls += 1
            self._tick(b)
            return ok(self._json(b, str(request.base_url)))

    async def _list(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        q = request.query_params
        try:
            limit = int(q.get("limit", "20"))
        except ValueError:
            return error(400, "invalid_request_error", "limit: must be an integer")
        if not 1 <= limit <= 1000:
            return error(400, "invalid_request_error", "limit: must be between 1 and 1000")
        limit = min(limit, self.page_cap)
        with self.lock:
            for b in self.batches.values():
                self._tick(b)
            items = sorted(self.batches.values(), key=lambda b: b.created_at, reverse=True)
            ids = [b.id for b in items]
            after, before = q.get("after_id"), q.get("before_id")
            if after is not None:
                if after not in ids:
                    return error(400, "invalid_request_error", "after_id: unknown batch")
                start = ids.index(after) + 1
                page, has_more = items[start : start + limit], start + limit < len(items)
            elif before is not None:
                if before not in ids:
                    return error(400, "invalid_request_error", "before_id: unknown batch")
                end = ids.index(before)
                page, has_more = items[max(0, end - limit) : end], end - limit > 0
            else:
                page, has_more = items[:limit], limit < len(items)
            base = str(request.base_url)
            data = [self._json(b, base) for b in page]
        return ok(
            {
                "data": data,
                "has_more": has_more,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }
        )

    async def _cancel(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        with self.lock:
            b = self.batches.get(request.path_params["id"])
            if b is None:
                return error(404, "not_found_error", "batch not found")
            if b.status == "ended":
                return error(400, "invalid_request_error", "the batch has already ended")
            if b.status == "in_progress":
                b.status, b.cancel_initiated_at = "canceling", time.time()
            return ok(self._json(b, str(request.base_url)))

    async def _delete(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        with self.lock:
            b = self.batches.get(request.path_params["id"])
            if b is None:
                return error(404, "not_found_error", "batch not found")
            if b.status != "ended":
                return error(400, "invalid_request_error", "a batch can be deleted only once processing has ended")
            del self.batches[b.id]
            return ok({"id": b.id, "type": "message_batch_deleted"})

    async def _results(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        with self.lock:
            b = self.batches.get(request.path_params["id"])
            if b is None:
                return error(404, "not_found_error", "batch not found")
            if b.status != "ended":
                return error(400, "invalid_request_error", "results are available once processing has ended")
            lines = [orjson.dumps({"custom_id": cid, "result": r}) for cid, r in b.results.items()]
        self.rng.shuffle(lines)
        return Response(b"".join(line + b"\n" for line in lines), 200, media_type="application/binary")

    async def _message(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        try:
            params = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return error(400, "invalid_request_error", "the body is not valid JSON")
        with self.lock:
            self.direct_requests.append(params)
        mt = params.get("max_tokens")
        if isinstance(mt, bool) or not isinstance(mt, int) or mt < 1:
            return error(400, "invalid_request_error", "max_tokens: Field required")
        key = "direct:" + last_user_text(params)
        with self.lock:
            result = self._answer(key, params, batch=False)
        if result["type"] == "succeeded":
            return ok(result["message"])
        inner = result["error"]["error"]
        status = {"invalid_request_error": 400, "rate_limit_error": 429}.get(inner["type"], 500)
        return error(status, inner["type"], inner["message"])


def anthropic_fake(**options: Any) -> tuple[Starlette, FakeAnthropic]:
    """(ASGI app, its state and controls); options as `FakeAnthropic` takes them."""
    fake = FakeAnthropic(**options)
    return fake.app, fake


# -- one request -----------------------------------------------------------------------------


def _errored(kind: str, message: str) -> dict[str, Any]:
    return {
        "type": "errored",
        "error": {"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_fake"},
    }


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(b.get("text", "") for b in content or [] if isinstance(b, dict) and b.get("type") == "text")


def last_user_text(params: dict[str, Any]) -> str:
    for msg in reversed(params.get("messages") or []):
        if isinstance(msg, dict) and msg.get("role") == "user":
            text = _text_of(msg.get("content"))
            if text:
                return text
    return ""


def _words(text: str) -> int:
    return len(text.split())


def reply(params: dict[str, Any], text: str) -> dict[str, Any]:
    """The Message answering a valid request: an echo of the user's text."""
    system = params.get("system")
    prompt = _text_of(system) if system else ""
    prompt_words = _words(prompt) + sum(_words(_text_of(m.get("content"))) for m in params["messages"])
    cache_read = min(5, prompt_words) if system else 0
    usage = {
        "input_tokens": prompt_words - cache_read + 3,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cache_read,
        "output_tokens": 0,
        "service_tier": "batch",
    }
    message: dict[str, Any] = {
        "id": f"msg_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": params["model"],
        "content": [],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": usage,
    }
    tools = params.get("tools") or []
    choice = params.get("tool_choice") or {"type": "auto"}
    if tools and choice.get("type") != "none":
        name = choice.get("name") if choice.get("type") == "tool" else tools[0]["name"]
        message["content"] = [
            {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:20]}", "name": name, "input": {"text": text}}
        ]
        message["stop_reason"] = "tool_use"
        usage["output_tokens"] = 5
        return message
    if ((params.get("output_config") or {}).get("format") or {}).get("type") == "json_schema":
        text = orjson.dumps({"echo": text}).decode()
    for stop in params.get("stop_sequences") or []:
        if stop in text:
            text = text[: text.index(stop)]
            message["stop_reason"], message["stop_sequence"] = "stop_sequence", stop
            break
    words = text.split(" ")
    if len(words) > params["max_tokens"]:
        text = " ".join(words[: params["max_tokens"]])
        message["stop_reason"] = "max_tokens"
    message["content"] = [{"type": "text", "text": text}]
    usage["output_tokens"] = len(text.split(" "))
    return message


def check_params(params: dict[str, Any]) -> str | None:
    """What the real API would refuse in one request's params (None: nothing)."""
    unknown = set(params) - _PARAMS
    if unknown:
        return f"{sorted(unknown)[0]}: Extra inputs are not permitted"
    problem = _check_system(params.get("system")) or _check_messages(params.get("messages"))
    if problem:
        return problem
    temperature, top_p = params.get("temperature"), params.get("top_p")
    for key, value in (("temperature", temperature), ("top_p", top_p)):
        if value is not None and not (isinstance(value, int | float) and 0 <= value <= 1):
            return f"{key}: Input should be less than or equal to 1"
    if temperature is not None and top_p is not None:
        return "`temperature` and `top_p` cannot both be specified for this model. Please use only one."
    stops = params.get("stop_sequences")
    if stops is not None and (
        not isinstance(stops, list) or any(not isinstance(s, str) or not s.strip() for s in stops)
    ):
        return "stop_sequences: each stop sequence must contain non-whitespace"
    tools = params.get("tools")
    names = set()
    if tools is not None:
        for i, tool in enumerate(tools):
            if not isinstance(tool.get("name"), str) or (tool.get("input_schema") or {}).get("type") != "object":
                return f"tools.{i}: a name and an object input_schema are required"
            names.add(tool["name"])
    choice = params.get("tool_choice")
    if choice is not None:
        if not tools:
            return "tool_choice: may only be specified while providing tools"
        if choice.get("type") not in ("auto", "any", "tool", "none"):
            return "tool_choice.type: must be auto, any, tool or none"
        if choice.get("type") == "tool" and choice.get("name") not in names:
            return f"tool_choice.name: no tool named {choice.get('name')!r}"
    fmt = (params.get("output_config") or {}).get("format")
    if fmt is not None and (fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict)):
        return "output_config.format: a json_schema format with a schema is required"
    metadata = params.get("metadata")
    if metadata is not None and set(metadata) - {"user_id"}:
        return "metadata: only user_id is allowed"
    return None


def _check_system(system: Any) -> str | None:
    if system is None or isinstance(system, str):
        return None
    if not isinstance(system, list) or any(
        not isinstance(b, dict) or b.get("type") != "text" or not b.get("text") for b in system
    ):
        return "system: must be a string or a list of non-empty text blocks"
    return None


def _check_messages(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "messages: at least one message is required"
    previous_tool_uses: set[str] = set()
    for i, msg in enumerate(messages):
        role = msg.get("role") if isinstance(msg, dict) else None
        if role not in ("user", "assistant"):
            return f"messages.{i}.role: must be user or assistant"
        if i and messages[i - 1].get("role") == role:
            return f"messages.{i}: roles must alternate between user and assistant"
        content = msg.get("content")
        if isinstance(content, str):
            if not content and i != len(messages) - 1:
                return f"messages.{i}: all messages must have non-empty content"
            previous_tool_uses = set()
            continue
        if not isinstance(content, list) or not content:
            return f"messages.{i}.content: a string or a non-empty list of blocks is required"
        tool_uses: set[str] = set()
        for j, block in enumerate(content):
            problem = _check_block(block, role, previous_tool_uses)
            if problem:
                return f"messages.{i}.content.{j}: {problem}"
            if block["type"] == "tool_use":
                tool_uses.add(block["id"])
        previous_tool_uses = tool_uses
    return None


def _check_block(block: Any, role: str, tool_uses: set[str]) -> str | None:
    kind = block.get("type") if isinstance(block, dict) else None
    cc = block.get("cache_control") if isinstance(block, dict) else None
    if cc is not None and cc.get("type") != "ephemeral":
        return "cache_control.type: must be ephemeral"
    if kind == "text":
        return None if isinstance(block.get("text"), str) and block["text"] else "text blocks must be non-empty"
    if kind == "image" and role == "user":
        src = block.get("source") or {}
        if src.get("type") == "base64" and src.get("media_type") in _IMAGE_TYPES and src.get("data"):
            return None
        if src.get("type") == "url" and str(src.get("url", "")).startswith(("http://", "https://")):
            return None
        return "image.source: a base64 source of a supported image type or a url source is required"
    if kind == "document" and role == "user":
        src = block.get("source") or {}
        return None if src.get("media_type") == "application/pdf" and src.get("data") else "document.source: invalid"
    if kind == "tool_use" and role == "assistant":
        ok_ = (
            isinstance(block.get("id"), str)
            and isinstance(block.get("name"), str)
            and isinstance(block.get("input"), dict)
        )
        return None if ok_ else "tool_use: id, name and an object input are required"
    if kind == "tool_result" and role == "user":
        if block.get("tool_use_id") not in tool_uses:
            return "tool_result: tool_use_id does not answer a tool_use in the previous message"
        content = block.get("content")
        if content is None or isinstance(content, str):
            return None
        return (
            None
            if all(isinstance(c, dict) and c.get("type") in ("text", "image") for c in content)
            else "tool_result.content: invalid"
        )
    return f"{kind!r} blocks are not allowed in {role} messages"
