"""Checks of query and body parameters that several routes share, and OpenAI's list page."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from starlette.responses import Response

from .._text import clip
from ._errors import APIError, json_response
from ._store import BatchRow, FileRow

__all__ = ["int_param", "expires_after", "list_page"]

_EXPIRES_MIN, _EXPIRES_MAX = 3600, 2_592_000


def int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    """The integer query parameter `name`, from `lo` to `hi`; `default` when absent."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        got = clip(raw, quote=True)
        raise APIError(400, f"Invalid '{name}': expected an integer, got {got}.", param=name) from None
    if not lo <= value <= hi:
        raise APIError(400, f"Invalid '{name}': must be between {lo} and {hi}, got {value}.", param=name)
    return value


def expires_after(anchor: Any, seconds: Any, param: str) -> int:
    """Seconds of an `expires_after` object (`param` names it in errors); only the created_at anchor."""
    if anchor != "created_at":
        raise APIError(400, f"Invalid '{param}[anchor]': the only supported anchor is 'created_at'.", param=param)
    try:
        secs = int(seconds)
    except (TypeError, ValueError):
        raise APIError(400, f"Invalid '{param}[seconds]': expected an integer.", param=param) from None
    if not _EXPIRES_MIN <= secs <= _EXPIRES_MAX:
        raise APIError(
            400, f"Invalid '{param}[seconds]': must be between {_EXPIRES_MIN} and {_EXPIRES_MAX}.", param=param
        )
    return secs


def list_page(page: tuple[list[FileRow] | list[BatchRow], bool] | None, after: str | None, noun: str) -> Response:
    """OpenAI's list object for a page from the store; 400 when `after` named nothing."""
    if page is None:
        raise APIError(400, f"Invalid 'after': no {noun} with id {clip(after, quote=True)}.", param="after")
    data = [item.to_api() for item in page[0]]
    return json_response(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": page[1],
        }
    )
