"""Pieces every translating adapter needs: OpenAI result lines and chat completion bodies.

Adapters for providers whose batch results are not OpenAI's (Anthropic, Gemini) translate
each result into an OpenAI batch output line built here, so the job runner and the user see
one format whatever ran the batch. The provider's own result rides along under `"native"`.

Providers whose result lines are OpenAI-like already (Together, Mistral) keep the envelope:
`openai_like_line` rewrites what differs, with the adapter's own body and error translation,
and `error_body` / `error_fields` read the error shapes those APIs answer with.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import AsyncIterator, Callable, Collection
from typing import IO, Any

import orjson

__all__ = [
    "HTTP_STATUS_OF_ERROR",
    "NEUTRAL_PARAMS",
    "chat_completion",
    "content_part_reasons",
    "error_body",
    "error_fields",
    "error_result",
    "error_type",
    "failed_line",
    "not_run_line",
    "openai_like_line",
    "parse_data_url",
    "parse_json",
    "result_line",
    "split_lines",
    "text_of",
    "write_lines",
]

log = logging.getLogger("llmbatch.providers")

#: HTTP status for a provider's per-request error type, so the runner's retry rules apply:
#: 429, 408 and 5xx are retried, other 4xx are final.
HTTP_STATUS_OF_ERROR = {
    "invalid_request_error": 400,
    "invalid_argument": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "resource_exhausted": 429,
    "api_error": 500,
    "internal": 500,
    "unavailable": 503,
    "timeout_error": 504,
    "deadline_exceeded": 504,
    "overloaded_error": 529,
}

#: Chat parameters at values that change nothing (OpenAI's defaults): a provider without the
#: parameter takes it at these values and refuses any other.
NEUTRAL_PARAMS: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "stream": (False,),
    "logprobs": (False,),
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "store": (False,),
    "logit_bias": ({},),
    "metadata": ({},),
    "modalities": (["text"],),
    "service_tier": ("auto", "default"),
}

#: OpenAI's error type for a 4xx status, where the provider's error names none (other 4xx:
#: `invalid_request_error`).
_TYPE_OF_STATUS = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                   429: "rate_limit_error"}  # fmt: skip


def chat_completion(
    *,
    id: str,
    model: str,
    created: int,
    content: str | None,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
    reasoning_tokens: int = 0,
    tool_calls: list[dict[str, Any]] | None = None,
    refusal: str | None = None,
) -> dict[str, Any]:
    """An OpenAI chat completion body (`object: "chat.completion"`) with one choice."""
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": refusal}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
        },
    }


def result_line(
    custom_id: str,
    status_code: int,
    body: dict[str, Any],
    *,
    id: str | None = None,
    request_id: str | None = None,
    native: Any = None,
) -> dict[str, Any]:
    """An OpenAI batch output line for a request that got an HTTP answer (2xx or an error)."""
    line: dict[str, Any] = {
        "id": id,
        "custom_id": custom_id,
        "response": {"status_code": status_code, "request_id": request_id, "body": body},
        "error": None,
    }
    if native is not None:
        line["native"] = native
    return line


def error_result(
    custom_id: str, status_code: int, message: str, *, type: str = "api_error", native: Any = None
) -> dict[str, Any]:
    """An output line for a request the provider answered with an error (OpenAI's error body shape)."""
    body = {"error": {"message": message, "type": type, "param": None, "code": None}}
    return result_line(custom_id, status_code, body, native=native)


def not_run_line(custom_id: str, code: str, message: str, *, native: Any = None) -> dict[str, Any]:
    """An output line for a request that never ran: `batch_expired`, `batch_cancelled` (retried by the runner)."""
    line: dict[str, Any] = {
        "id": None,
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }
    if native is not None:
        line["native"] = native
    return line


def text_of(content: Any) -> str:
    """The text of an OpenAI message content: a string, or the `text` parts of a list joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")


def content_part_reasons(n: int, content: Any, types: Collection[str], provider: str) -> list[str]:
    """Why `provider` cannot take the content of `messages[n]`: the parts whose type is not in `types`."""
    reasons: list[str] = []
    if isinstance(content, list):
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in types:
                reasons.append(f"messages[{n}]: {provider} takes no {kind!r} content parts")
    return reasons


def parse_data_url(url: str) -> tuple[str, str] | None:
    """(media type, base64 data) of a `data:image/png;base64,...` URL; None for other URLs or bad data."""
    if not url.startswith("data:"):
        return None
    head, sep, data = url[5:].partition(",")
    if not sep or not head.endswith(";base64"):
        return None
    try:
        base64.b64decode(data[:64] + "=" * (-len(data[:64]) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    return head.removesuffix(";base64") or "application/octet-stream", data


# -- OpenAI-like result lines (Together, Mistral) ----------------------------------------------


def error_type(status: int) -> str:
    """OpenAI's error type for an HTTP status, for an error that names none."""
    return "api_error" if status >= 500 else _TYPE_OF_STATUS.get(status, "invalid_request_error")


def error_body(body: Any, status: int, message_keys: tuple[str, ...] = ("message", "error")) -> dict[str, Any]:
    """OpenAI's `{"error": {message, type, param, code}}` from a provider's error answer.

    `body` is `{"error": {...}}`, a flat `{message, type, param, code}` (the message under the
    first of `message_keys` it has), `{"error": "string"}` or a bare string.
    """
    src = body["error"] if isinstance(body, dict) and isinstance(body.get("error"), dict) else body
    if isinstance(src, dict):
        message = next((src[key] for key in message_keys if key in src), None)
        etype, param, code = src.get("type"), src.get("param"), src.get("code")
    else:
        message, etype, param, code = src, None, None, None
    if not isinstance(message, str):
        message = orjson.dumps(message).decode() if message is not None else f"HTTP {status}"
    return {"error": {"message": message, "type": etype or error_type(status), "param": param, "code": code}}


def error_fields(error: Any, status_keys: tuple[str, ...] = ("status_code",)) -> tuple[str, Any, Any, Any]:
    """(message, code, type, HTTP status) of a result line's bare `error`: a string or `{message, code, type}`.

    The status is the first of `status_keys` the error gives. The message is made a string, and a
    code that is an HTTP status (100 to 599, a number or digits) becomes the status where none is given.
    """
    status: Any = None
    if isinstance(error, dict):
        message, code, etype = error.get("message"), error.get("code"), error.get("type")
        for key in status_keys:
            status = status or error.get(key)
    else:
        message, code, etype = error, None, None
    message = message if isinstance(message, str) else orjson.dumps(message).decode()
    if isinstance(code, int) and 100 <= code < 600:
        status, code = status or code, None
    elif isinstance(code, str) and code.isdigit() and 100 <= int(code) < 600:
        status, code = status or int(code), None
    return message, code, etype, status


def failed_line(custom_id: Any, message: str, code: Any, etype: Any, status: Any) -> dict[str, Any]:
    """The line for a request reported only by an error (one that is not "not run").

    An error result where the HTTP status is known or follows from the type or code; else a line
    with the error alone, under the provider's code (the shape `not_run_line` builds).
    """
    if not isinstance(status, int):
        status = HTTP_STATUS_OF_ERROR.get(etype or "") or HTTP_STATUS_OF_ERROR.get(code or "")
    if isinstance(status, int):
        return error_result(custom_id, status, message, type=etype or error_type(status))
    return not_run_line(custom_id, str(code or "error"), message)


def openai_like_line(
    rec: dict[str, Any],
    provider: str,
    *,
    success: Callable[[Any], Any],
    failure: Callable[[Any, int], Any],
    error_line: Callable[[Any, Any], dict[str, Any]],
) -> dict[str, Any]:
    """An OpenAI-like result line (`{id, custom_id, response: {status_code, request_id, body}, error}`)
    as OpenAI's, the original under `"native"` where anything changed.

    A response body (parsed where it is JSON text) goes through `success(body)` for a 2xx status,
    `failure(body, status)` for others; a line with only an error is `error_line(custom_id, error)`.
    """
    cid = rec.get("custom_id")
    response, error = rec.get("response"), rec.get("error")
    status = response.get("status_code") if isinstance(response, dict) else None
    if isinstance(status, int):
        assert isinstance(response, dict)
        body = parse_json(response.get("body"))
        body = success(body) if 200 <= status < 300 else failure(body, status)
        line = result_line(cid, status, body, id=rec.get("id"), request_id=response.get("request_id"))
    elif error is not None:
        line = {**error_line(cid, error), "id": rec.get("id")}
    else:
        missing = not_run_line(cid, "missing_response", f"{provider} sent neither a response nor an error")
        line = {**missing, "id": rec.get("id")}
    if line != _filled(rec):
        line["native"] = rec
    return line


def _filled(rec: dict[str, Any]) -> dict[str, Any]:
    """`rec` with the keys an OpenAI line always has (`id`, `response.request_id`) filled with null."""
    response = rec.get("response")
    if isinstance(response, dict):
        response = {"request_id": None, **response}
    return {"id": None, **rec, "response": response}


def parse_json(raw: Any) -> Any:
    """Parsed JSON where `raw` is JSON text, else `raw` itself."""
    if isinstance(raw, str | bytes) and raw:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            return raw
    return raw


async def split_lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Lines split on b"\\n" only: JSON strings may hold U+2028, which `splitlines` would cut at."""
    rest = b""
    async for chunk in chunks:
        rest += chunk
        *lines, rest = rest.split(b"\n")
        for line in lines:
            yield line
    if rest:
        yield rest


async def write_lines(
    chunks: AsyncIterator[bytes],
    out: IO[bytes],
    translate: Callable[[dict[str, Any]], Any],
    provider: str,
    file_id: str,
) -> None:
    """Writes each JSON line of the result file `file_id` (its bytes in `chunks`) to `out` as `translate`
    makes it; lines that are not JSON are skipped with a warning."""
    async for raw in split_lines(chunks):
        if not raw.strip():
            continue
        try:
            rec = orjson.loads(raw)
        except orjson.JSONDecodeError:
            log.warning("%s file %s: skipping a line that is not JSON", provider, file_id)
            continue
        out.write(orjson.dumps(translate(rec)) + b"\n")
