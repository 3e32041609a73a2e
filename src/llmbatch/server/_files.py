"""The Files API: upload, list, retrieve, download and delete files."""

from __future__ import annotations

import logging
import os
import time

from fastapi import APIRouter, Request
from starlette.responses import FileResponse, Response

from ._errors import APIError, json_response
from ._ids import new_id
from ._params import expires_after, int_param, list_page
from ._state import server_state
from ._store import FileRow
from ._upload import UploadError, receive_upload
from ._worker import files_dir

__all__ = ["router", "FILE_PURPOSES"]

FILE_PURPOSES = frozenset({"assistants", "batch", "fine-tune", "vision", "user_data", "evals"})

router = APIRouter()

log = logging.getLogger("llmbatch.server")


class _FileResponse(FileResponse):
    """File downloads in 1 MiB pieces (Starlette's are 64 KiB): each piece is a read in a thread
    and a send, each waiting its turn on the event loop that also runs batches' rows, so fewer
    pieces mean fewer waits (a 59 MB file during a batch: 1.8 s instead of 2.2 s, 0.10 s instead
    of 0.18 s idle)."""

    chunk_size = 1 << 20


@router.post("/v1/files")
async def create_file(request: Request) -> Response:
    srv = server_state(request)
    owner = srv.owner(request)
    file_id = new_id("file-")
    tmp = srv.config.data_dir / "tmp" / file_id
    try:
        up = await receive_upload(
            request.headers.get("content-type", ""), request.stream(), tmp, srv.config.max_file_bytes
        )
    except UploadError as exc:
        tmp.unlink(missing_ok=True)
        if exc.code == "insufficient_storage" and srv.worker is not None:
            srv.worker.note_disk_full(True)
            log.warning("upload refused: disk full in %s", srv.config.data_dir)
        kind = "server_error" if exc.status >= 500 else "invalid_request_error"
        raise APIError(exc.status, str(exc), type=kind, param=exc.param, code=exc.code) from exc
    try:
        purpose = up.fields.get("purpose")
        if up.path is None:
            raise APIError(400, "Missing required parameter: 'file'.", param="file")
        if purpose is None:
            raise APIError(400, "Missing required parameter: 'purpose'.", param="purpose")
        if purpose not in FILE_PURPOSES:
            raise APIError(
                400,
                f"Invalid value for 'purpose': {purpose!r}. Use one of {', '.join(sorted(FILE_PURPOSES))}.",
                param="purpose",
            )
        if up.too_large:
            raise APIError(
                413,
                f"File {up.filename!r} is {up.bytes} bytes; this server accepts at most {srv.config.max_file_bytes}. "
                "Split it into several files.",
                param="file",
                code="file_too_large",
            )
        if purpose == "batch" and up.bytes == 0:
            raise APIError(400, f"File {up.filename!r} is empty.", param="file", code="empty_file")
        expires_at = None
        if "expires_after[anchor]" in up.fields or "expires_after[seconds]" in up.fields:
            secs = expires_after(
                up.fields.get("expires_after[anchor]"), up.fields.get("expires_after[seconds]"), "expires_after"
            )
            expires_at = int(time.time()) + secs
        f = FileRow(file_id, owner, up.filename or "upload.jsonl", purpose, up.bytes, int(time.time()), expires_at)
        os.replace(tmp, files_dir(srv.config) / file_id)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    assert srv.store is not None
    try:
        srv.store.insert_file(f)  # SQLite full: 507 from the error handler, and no stray file
    except BaseException:
        (files_dir(srv.config) / file_id).unlink(missing_ok=True)
        raise
    if srv.worker is not None:
        srv.worker.note_disk_full(False)
    return json_response(f.to_api())


@router.get("/v1/files")
async def list_files(request: Request) -> Response:
    srv = server_state(request)
    owner = srv.owner(request)
    assert srv.store is not None
    order = request.query_params.get("order", "desc")
    if order not in ("asc", "desc"):
        raise APIError(400, f"Invalid 'order': {order!r}; use 'asc' or 'desc'.", param="order")
    after = request.query_params.get("after")
    page = srv.store.list_files(
        owner,
        after=after,
        limit=int_param(request, "limit", 10_000, 1, 10_000),
        order=order,
        purpose=request.query_params.get("purpose"),
    )
    return list_page(page, after, "file")


@router.get("/v1/files/{file_id}")
async def get_file(file_id: str, request: Request) -> Response:
    srv = server_state(request)
    return json_response(srv.file(file_id, srv.owner(request)).to_api())


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, request: Request) -> Response:
    srv = server_state(request)
    f = srv.file(file_id, srv.owner(request))
    return _FileResponse(files_dir(srv.config) / f.id, media_type="application/octet-stream", filename=f.filename)


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, request: Request) -> Response:
    srv = server_state(request)
    f = srv.file(file_id, srv.owner(request))
    assert srv.store is not None
    user = srv.store.file_in_use(f.id)
    if user is not None:
        raise APIError(
            409,
            f"File {f.id} is the input of batch {user}, which has not finished; cancel the batch first.",
            param="file_id",
            code="file_in_use",
        )
    srv.store.delete_file(f.id)
    (files_dir(srv.config) / f.id).unlink(missing_ok=True)
    return json_response({"id": f.id, "object": "file", "deleted": True})
