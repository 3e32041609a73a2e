"""A finished batch's output and error files, written from its input and its journal."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import orjson

from ._ids import new_id
from ._journal import Journal, Totals
from ._validate import iter_lines

__all__ = ["EXPIRED", "CANCELLED", "write_outputs", "fsync_dir"]

#: The error of a row that never ran, by why.
EXPIRED = {
    "code": "batch_expired",
    "message": "This request could not be executed before the completion window expired.",
}
CANCELLED = {
    "code": "batch_cancelled",
    "message": "This request was not executed because the batch was cancelled.",
}


def _unrun_line(custom_id: str, error: dict[str, str]) -> bytes:
    return orjson.dumps({"id": new_id("batch_req_", 16), "custom_id": custom_id, "response": None, "error": error})


def write_outputs(
    input_path: Path, journal_path: Path, out_path: Path, err_path: Path, unrun: dict[str, str]
) -> tuple[int, Totals]:
    """Streams input and journal into the output and error files, in input order.

    Returns the number of rows written and their totals (unrun rows count as failed).
    """
    journal = Journal(journal_path) if journal_path.exists() else None
    counts = Totals()
    total = 0
    if journal is not None:
        journal.close()
        t = journal.totals
        counts.input_tokens, counts.output_tokens = t.input_tokens, t.output_tokens
        counts.cached_tokens, counts.reasoning_tokens = t.cached_tokens, t.reasoning_tokens
    records: BinaryIO | None = open(journal_path, "rb") if journal is not None else None
    try:
        with open(out_path, "wb", buffering=1 << 20) as out, open(err_path, "wb", buffering=1 << 20) as err:
            for n, raw in iter_lines(input_path):
                if not raw.strip():
                    continue
                offset = journal.offset(n) if journal is not None else -1
                if offset >= 0 and records is not None:
                    ok, line = Journal.read_record(records, offset)
                else:
                    try:
                        custom_id = orjson.loads(raw)["custom_id"]
                    except Exception:  # never validated (expired while queued): cannot name it
                        continue
                    ok, line = False, _unrun_line(custom_id, unrun)
                total += 1
                if ok:
                    counts.completed += 1
                    out.write(line + b"\n")
                else:
                    counts.failed += 1
                    err.write(line + b"\n")
            for f in (out, err):  # on the disk before the store records them (a power loss)
                f.flush()
                os.fsync(f.fileno())
    finally:
        if records is not None:
            records.close()
    return total, counts


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
