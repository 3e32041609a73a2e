"""Batch input rows: reading JSONL lines and checking each against OpenAI's batch rules.

Shared by the server (validating an uploaded batch file) and the client (validating a job's
input before spending anything), so both reject exactly the same rows for the same reasons.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ._exceptions import InputError
from ._text import clip
from .engines import KNOWN_ENDPOINTS

__all__ = [
    "RowProblem",
    "check_row",
    "input_stat",
    "iter_lines",
    "iter_lines_with_offsets",
    "not_jsonl",
    "request_key",
    "samples",
]

_BOM = b"\xef\xbb\xbf"
#: Endpoints whose answer has no sampling in it: the same request always gets the same answer.
_UNSAMPLED_ENDPOINTS = frozenset({"/v1/embeddings", "/v1/moderations"})
#: orjson's position suffix: a row is one line, so "line 1" says nothing and the column is enough.
_JSON_WHERE = re.compile(r": line \d+ column (\d+) \(char \d+\)$")
#: Non-blank lines looked at to tell a file that is not JSONL at all from one with a bad line.
_SNIFF_LINES = 5


@dataclass(slots=True)
class RowProblem:
    """Why a row is not a valid batch request: OpenAI's error code, a message, the field."""

    code: str
    message: str
    param: str | None = None


def input_stat(path: Path) -> os.stat_result:
    """The input file's stat; InputError naming it when it cannot be read or is not a file."""
    try:
        st = path.stat()
    except OSError as exc:
        raise InputError(f"{path}: cannot read the input file: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path}: not a file")
    return st


def iter_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line without its newline) for each line of the file.

    A UTF-8 byte order mark at the start (files saved by some Windows editors) is dropped.
    """
    for n, _offset, raw in iter_lines_with_offsets(path):
        yield n, raw


def iter_lines_with_offsets(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset of the line, raw line without its newline)."""
    offset = 0
    with open(path, "rb", buffering=1 << 20) as f:
        for n, line in enumerate(f, start=1):
            start, raw = offset, line
            offset += len(line)
            if n == 1 and raw.startswith(_BOM):
                raw, start = raw[3:], start + 3
            yield n, start, raw.rstrip(b"\r\n")


def check_row(raw: bytes, endpoint: str | None = None) -> tuple[dict[str, Any] | None, list[RowProblem]]:
    """Parses one non-blank input line and checks it against OpenAI's batch rules.

    The row must be a UTF-8 JSON object with a non-empty string `custom_id`, `method` "POST",
    a `url` equal to `endpoint` (or, when None, one of OpenAI's batch endpoints), and an object
    `body` naming a `model`, without `stream: true`. Returns the parsed object (None when it
    could not be parsed) and every problem found; no problems means the row is valid.
    Uniqueness of custom_ids and of the model are for the caller, who sees all rows.
    """
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, [RowProblem("invalid_encoding", f"not valid UTF-8 (byte {exc.start + 1} of the line)")]
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        where = _JSON_WHERE.sub(r" at column \1", str(exc))
        return None, [RowProblem("invalid_json_line", f"not valid JSON ({where})")]
    if not isinstance(obj, dict):
        return None, [RowProblem("invalid_json_line", f"expected a JSON object, got {type(obj).__name__}")]
    problems: list[RowProblem] = []
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        problems.append(RowProblem("missing_required_parameter", "custom_id must be a non-empty string", "custom_id"))
    method = obj.get("method")
    if method != "POST":
        problems.append(
            RowProblem("invalid_method", f'method must be "POST", got {clip(method, quote=True)}', "method")
        )
    url = obj.get("url")
    if endpoint is not None and url != endpoint:
        problems.append(
            RowProblem(
                "mismatched_url", f"url {clip(url, quote=True)} does not match the batch's endpoint {endpoint!r}", "url"
            )
        )
    elif endpoint is None and url not in KNOWN_ENDPOINTS:
        problems.append(
            RowProblem(
                "invalid_url",
                f"url {clip(url, quote=True)} is not a batch endpoint ({', '.join(sorted(KNOWN_ENDPOINTS))})",
                "url",
            )
        )
    body = obj.get("body")
    if not isinstance(body, dict):
        problems.append(RowProblem("invalid_body", "body must be a JSON object", "body"))
        return obj, problems
    if body.get("stream"):
        problems.append(RowProblem("invalid_body", "stream=true is not supported in batches", "body.stream"))
    model = body.get("model")
    if not isinstance(model, str) or not model:
        problems.append(RowProblem("missing_required_parameter", "body.model must be a non-empty string", "body.model"))
    return obj, problems


def request_key(endpoint: str, body: dict[str, Any]) -> bytes:
    """The content address of a request (16 bytes): sha256 of its endpoint and body as canonical
    JSON (keys sorted, fields set to null left out), so its custom_id, key order and spacing
    make no difference. The body is the one the provider is sent (after the job's `--model`).

    The Python API's client keys its calls by it, and the response cache looks answers up by it.
    """
    canonical = orjson.dumps([endpoint, {k: v for k, v in body.items() if v is not None}], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).digest()[:16]


def samples(endpoint: str, body: dict[str, Any]) -> bool:
    """Whether the request's answer is drawn at random, so that asking again may answer
    differently: a generation at a temperature above 0 (the APIs' default is 1) with no `seed`.
    """
    if endpoint in _UNSAMPLED_ENDPOINTS or body.get("seed") is not None:
        return False
    temperature = body.get("temperature")
    return not (isinstance(temperature, int | float) and not isinstance(temperature, bool) and temperature == 0)


def not_jsonl(path: Path) -> str | None:
    """Why the file is not JSONL at all (None: it may be): none of its first few non-blank lines
    is a JSON object, as in a CSV file, a JSON array or plain text. One message then says so,
    instead of one `invalid_json_line` per line."""
    seen: list[tuple[int, bytes]] = []
    for n, raw in iter_lines(path):
        if not raw.strip():
            continue
        try:
            if isinstance(orjson.loads(raw), dict):
                return None
        except orjson.JSONDecodeError:
            pass
        seen.append((n, raw))
        if len(seen) == _SNIFF_LINES:
            break
    if not seen:
        return None
    n, first = seen[0]
    text = first.decode("utf-8", "replace")
    suffix = path.suffix.lower()
    commas = (b"," in first or b"\t" in first) and not first.lstrip().startswith((b"{", b"["))
    if suffix in (".csv", ".tsv") or commas:
        what = "it looks like CSV; convert each row to a request line first"
    elif first.lstrip().startswith(b"[") or suffix == ".json":
        what = "a JSON array or document? write each request object on a line of its own"
    else:
        what = "llmbatch reads OpenAI batch JSONL"
    lines = f"its first {len(seen)} non-blank lines are" if len(seen) > 1 else "its only non-blank line is"
    return (
        f"not JSONL (one JSON request object per line): {lines} not JSON objects "
        f"(line {n}: {clip(text, quote=True, limit=60)}); {what}"
    )
