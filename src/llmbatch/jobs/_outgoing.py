"""What the provider receives for a row: one reader for every path that sends rows (a batch's
chunk file, the direct API, and retries through either), so that they cannot differ.

They once did: chunk files carried the job's `--model`, direct calls the row's own model (a
404 at Anthropic or Gemini for a row naming `gpt-4o-mini`, and the row failed).
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, Protocol

import orjson

from ._store import JobStore

__all__ = ["OutgoingRow", "RequestLines", "request_line"]


class OutgoingRow(Protocol):
    """What sending needs of a row (`ChunkRow`, `DirectRow`)."""

    @property
    def idx(self) -> int: ...
    @property
    def file_no(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def length(self) -> int: ...
    @property
    def remote_id(self) -> str | None: ...
    @property
    def rewrite(self) -> int: ...
    @property
    def model(self) -> str: ...


def request_line(line: bytes, row: OutgoingRow) -> bytes:
    """The OpenAI batch input line the provider receives for `row` (whose input line is `line`):
    under the id the provider accepts, with the model the job sets. The provider's adapter
    translates it to its own format, the same way for a batch and for a direct call.

    Most rows go as they are, byte for byte (no parsing: chunk files hold up to 200 MB).
    """
    if not (row.remote_id or row.rewrite):
        return line
    rec = orjson.loads(line)
    if row.remote_id:
        rec["custom_id"] = row.remote_id
    if row.rewrite:
        rec["body"]["model"] = row.model
    return orjson.dumps(rec)


class RequestLines:
    """Reads rows' request lines as the provider receives them (`request_line`), from the job's
    input files (kept open while rows are read) or, for calls made through the Python API,
    from the store."""

    def __init__(self, store: JobStore, inputs: list[Path]) -> None:
        self.store = store
        self.inputs = inputs
        self._handles: dict[int, IO[bytes]] = {}

    def __enter__(self) -> RequestLines:
        return self

    def __exit__(self, *exc: object) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()

    def line(self, row: OutgoingRow) -> bytes:
        if row.file_no < 0:  # a call made through the Python API: its request is in the store
            raw = self.store.request(row.idx)
        else:
            fh = self._handles.get(row.file_no)
            if fh is None:
                fh = self._handles[row.file_no] = open(self.inputs[row.file_no], "rb")  # noqa: SIM115
            fh.seek(row.offset)
            raw = fh.read(row.length)
        return request_line(raw, row)
