"""Streaming multipart upload for POST /v1/files: the file goes straight to disk.

Starlette's form parser spools the upload to a temporary file and then we would copy it;
parsing the stream ourselves writes it once, counts its bytes as they arrive and stops
writing as soon as the size limit is passed.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from ._disk import free_bytes, is_disk_full

__all__ = ["Upload", "UploadError", "receive_upload"]

#: Largest accepted non-file form field; purpose and expires_after values are tiny.
_MAX_FIELD = 64 * 1024


class UploadError(Exception):
    """The request is not a usable multipart upload; `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code


@dataclass
class Upload:
    """What arrived: the form fields, and the file (already on disk at `path`)."""

    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None
    path: Path | None = None
    bytes: int = 0
    #: True when the file passed the size limit (its bytes were discarded).
    too_large: bool = False


async def receive_upload(content_type: str, stream: AsyncIterator[bytes], dest: Path, max_bytes: int) -> Upload:
    """Parses a multipart body from `stream`, writing the `file` part to `dest`.

    The whole body is read even past the size limit, so the client receives the error
    response instead of a reset connection.
    """
    ctype, params = parse_options_header(content_type)
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise UploadError("expected a multipart/form-data body with a 'file' part and a 'purpose' field")
    up = Upload()
    state: dict[str, object] = {
        "name": None,
        "filename": None,
        "header_field": b"",
        "header_value": b"",
        "ended": False,
    }
    headers: dict[bytes, bytes] = {}
    field_buf = bytearray()
    out: BinaryIO | None = None

    def on_part_begin() -> None:
        headers.clear()
        field_buf.clear()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["header_field"] = bytes(state["header_field"]) + data[start:end]  # type: ignore[arg-type]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["header_value"] = bytes(state["header_value"]) + data[start:end]  # type: ignore[arg-type]

    def on_header_end() -> None:
        headers[bytes(state["header_field"]).lower()] = bytes(state["header_value"])  # type: ignore[arg-type]
        state["header_field"] = b""
        state["header_value"] = b""

    def on_headers_finished() -> None:
        nonlocal out
        _, disp = parse_options_header(headers.get(b"content-disposition", b""))
        name = disp.get(b"name", b"").decode("utf-8", "replace")
        state["name"] = name
        if b"filename" in disp:
            if up.path is not None:
                raise UploadError("more than one file part in the upload", param="file")
            up.filename = disp[b"filename"].decode("utf-8", "replace") or "upload.jsonl"
            up.path = dest
            out = open(dest, "wb")  # noqa: SIM115 - closed in on_part_end / finally

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if out is not None and state["name"] is not None and up.path is not None and not out.closed:
            n = end - start
            if n == 0:
                return
            up.bytes += n
            if up.bytes > max_bytes:
                up.too_large = True
                return
            out.write(data[start:end])
        else:
            if len(field_buf) + (end - start) > _MAX_FIELD:
                raise UploadError(f"form field {state['name']!r} is too large")
            field_buf.extend(data[start:end])

    def on_part_end() -> None:
        if out is not None and not out.closed:
            out.close()
        elif state["name"]:
            up.fields[str(state["name"])] = field_buf.decode("utf-8", "replace")
        state["name"] = None

    def on_end() -> None:
        state["ended"] = True

    parser = MultipartParser(
        params[b"boundary"],
        {
            "on_part_begin": on_part_begin,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_end": on_end,
        },
    )
    try:
        async for chunk in stream:
            parser.write(chunk)
        parser.finalize()
        if not state["ended"]:
            # python-multipart's finalize() does not check this: without the closing boundary
            # the body was cut off, and the file part may be missing its last bytes.
            raise UploadError("malformed multipart body: it ends before the closing boundary")
        if out is not None and not out.closed:
            out.close()  # its last bytes are written here: a full disk must show now, not be ignored
    except (UploadError, ClientDisconnect):  # a caller that hung up did not send a malformed body
        raise
    except OSError as exc:  # writing the file failed: the server's disk, not the caller's body
        raise storage_error(exc, dest.parent) from exc
    except Exception as exc:  # the parser's own errors: a malformed body
        raise UploadError(f"malformed multipart body: {exc}") from exc
    finally:
        if out is not None and not out.closed:
            try:
                out.close()
            except OSError:
                pass  # already failing; the caller removes the file
        if up.too_large and up.path is not None:
            os.unlink(up.path)
    return up


def storage_error(exc: OSError, where: Path) -> UploadError:
    """The error for an upload the server could not store: 507 when the disk is full."""
    if is_disk_full(exc):
        return UploadError(
            f"Insufficient storage: the server's disk is full ({free_bytes(where)} bytes free) and the file "
            "was not stored. Try again later.",
            status=507,
            code="insufficient_storage",
        )
    return UploadError(f"The server could not store the file: {exc}", status=500, code="storage_error")
