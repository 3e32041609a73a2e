"""The Batches API: create, list, retrieve and cancel batches; the worker runs them."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from .._text import clip
from ..engines import KNOWN_ENDPOINTS
from ._errors import APIError, json_response, parse_json_object
from ._ids import new_id
from ._params import expires_after, int_param, list_page
from ._state import ServerState, server_state
from ._store import BatchRow

__all__ = ["router", "cancel"]

router = APIRouter()


@router.post("/v1/batches")
async def create_batch(request: Request) -> Response:
    srv = server_state(request)
    owner = srv.owner(request)
    body = parse_json_object(await request.body())
    for name in ("input_file_id", "endpoint", "completion_window"):
        if not isinstance(body.get(name), str):
            raise APIError(400, f"Missing required parameter: '{name}'.", param=name)
    endpoint, window = body["endpoint"], body["completion_window"]
    if endpoint not in KNOWN_ENDPOINTS:
        raise APIError(
            400,
            f"Invalid 'endpoint': {clip(endpoint, quote=True)}. Supported: {', '.join(sorted(KNOWN_ENDPOINTS))}.",
            param="endpoint",
        )
    if window not in srv.config.completion_windows:
        raise APIError(
            400,
            f"Invalid 'completion_window': {clip(window, quote=True)}. This server accepts "
            f"{', '.join(sorted(srv.config.completion_windows))}.",
            param="completion_window",
        )
    metadata = _validate_metadata(body.get("metadata"))
    output_expires = None
    if body.get("output_expires_after") is not None:
        oe = body["output_expires_after"]
        if not isinstance(oe, dict):
            raise APIError(400, "Invalid 'output_expires_after': expected an object.", param="output_expires_after")
        output_expires = expires_after(oe.get("anchor"), oe.get("seconds"), "output_expires_after")
    try:
        f = srv.file(body["input_file_id"], owner)
    except APIError as exc:
        exc.body["error"]["param"] = "input_file_id"
        raise
    if f.purpose != "batch":
        raise APIError(
            400,
            f"File {f.id} has purpose {f.purpose!r}; a batch's input file must be uploaded with purpose 'batch'.",
            param="input_file_id",
            code="invalid_file_purpose",
        )
    now = int(time.time())
    b = BatchRow(
        id=new_id("batch_"), owner=owner, status="validating", endpoint=endpoint, input_file_id=f.id,
        completion_window=window, model=None, metadata=metadata, output_expires_after=output_expires,
        output_file_id=None, error_file_id=None, errors=None, created_at=now, in_progress_at=None,
        expires_at=now + srv.config.completion_windows[window], finalizing_at=None, completed_at=None,
        failed_at=None, expired_at=None, cancelling_at=None, cancelled_at=None, total=0, completed=0,
        failed=0, input_tokens=0, output_tokens=0, cached_tokens=0, reasoning_tokens=0,
    )  # fmt: skip
    assert srv.store is not None and srv.worker is not None
    srv.store.insert_batch(b)
    srv.worker.notify()
    return json_response(b.to_api())


@router.get("/v1/batches")
async def list_batches(request: Request) -> Response:
    srv = server_state(request)
    owner = srv.owner(request)
    assert srv.store is not None
    after = request.query_params.get("after")
    page = srv.store.list_batches(owner, after=after, limit=int_param(request, "limit", 20, 1, 100))
    return list_page(page, after, "batch")


@router.get("/v1/batches/{batch_id}")
async def get_batch(batch_id: str, request: Request) -> Response:
    srv = server_state(request)
    return json_response(srv.batch(batch_id, srv.owner(request)).to_api())


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, request: Request) -> Response:
    srv = server_state(request)
    return json_response(cancel(srv, batch_id, srv.owner(request)).to_api())


def cancel(srv: ServerState, batch_id: str, owner: str) -> BatchRow:
    """Cancels `owner`'s batch (the API and the dashboard's button): the batch in `cancelling`;
    APIError 404 when it is not owner's, 409 when it has ended."""
    b = srv.batch(batch_id, owner)
    assert srv.store is not None and srv.worker is not None
    if b.status == "cancelling":
        return b
    if b.status not in ("validating", "in_progress"):
        raise APIError(
            409, f"Cannot cancel a batch with status '{b.status}'.", param="batch_id", code="batch_not_cancellable"
        )
    try:
        b = srv.store.transition(b.id, "cancelling", ("validating", "in_progress"))
    except Exception:
        b = srv.batch(batch_id, b.owner)
        if b.status != "cancelling":
            raise APIError(
                409,
                f"Cannot cancel a batch with status '{b.status}'.",
                param="batch_id",
                code="batch_not_cancellable",
            ) from None
    srv.worker.request_cancel(b.id)
    return b


def _validate_metadata(metadata: Any) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise APIError(400, "Invalid 'metadata': expected an object of string keys and values.", param="metadata")
    if len(metadata) > 16:
        raise APIError(400, f"Invalid 'metadata': at most 16 pairs, got {len(metadata)}.", param="metadata")
    for k, v in metadata.items():
        if len(k) > 64:
            raise APIError(
                400, f"Invalid 'metadata': key {k[:20]!r}... is longer than 64 characters.", param="metadata"
            )
        if not isinstance(v, str):
            raise APIError(400, f"Invalid 'metadata': the value of {k!r} must be a string.", param="metadata")
        if len(v) > 512:
            raise APIError(
                400, f"Invalid 'metadata': the value of {k!r} is longer than 512 characters.", param="metadata"
            )
    return metadata
