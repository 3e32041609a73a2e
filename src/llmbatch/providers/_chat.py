"""Pieces every translating adapter needs: OpenAI result lines and chat completion bodies.

Adapters for providers whose batch results are not OpenAI's (Anthropic, Gemini) translate
each result into an OpenAI batch output line built here, so the job runner and the user see
one format whatever ran the batch. The provider's own result rides along under `"native"`.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

__all__ = [
    "HTTP_STATUS_OF_ERROR",
    "chat_completion",
    "error_result",
    "not_run_line",
    "parse_data_url",
    "result_line",
    "text_of",
]

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
