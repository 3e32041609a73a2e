"""Exporting: one output line per input row, in input order, read from the store and the
downloaded result files it points into."""

from __future__ import annotations

import hashlib
import mmap
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson

from .._exceptions import DamagedResults
from ._records import CachedResult, Result, ResultRef
from ._settings import JobSettings
from ._store import JobStore
from ._verify import check_results

__all__ = [
    "ResultReader",
    "error_line",
    "export",
    "line_id",
    "output_lines",
    "output_paths",
    "with_id",
    "with_provider",
]


def output_paths(inputs: list[Path], settings: JobSettings, job_dir: Path | None = None) -> tuple[Path, Path]:
    """The results and errors files: as set, else next to the first input (a job of calls made
    through the Python API has no input file: its files go in its job directory)."""
    first = inputs[0] if inputs else (job_dir or Path.cwd()) / "calls.jsonl"
    stem = first.name[: -len(".jsonl")] if first.name.endswith(".jsonl") else first.name
    out = settings.output or first.with_name(f"{stem}.results.jsonl")
    err = settings.errors or out.with_name(
        out.name.replace(".results.jsonl", ".errors.jsonl") if ".results." in out.name else f"{out.stem}.errors.jsonl"
    )
    return out, err


def output_lines(
    store: JobStore,
    inputs: list[Path],
    *,
    check: bool = True,
    answered_by: Callable[[int, str | None], str] | None = None,
) -> Iterator[tuple[str, bytes]]:
    """(row state, output line) of every row, in input order: its result line when it succeeded,
    the provider's error line (or one naming its file and line) when it failed or was invalid,
    a `not_run` error line when the job stopped before it ran. With `answered_by` (a job with
    fallbacks: `JobSettings.answered_by`), each line the provider answered also says which
    provider and model did, as `"provider": "anthropic/claude-sonnet-4-5"`.

    Raises DamagedResults before the first line when a result file rows point into is missing,
    cut or changed since it was downloaded (`check`: False when the caller just checked)."""
    if check:
        check_results(store)
    job = store.job()
    assert job is not None
    job_id: str = job["id"]
    with ResultReader(store) as results:
        for row in store.export_rows():
            state = row.state
            if state in ("succeeded", "failed", "invalid") and row.result is not None:
                line = results.line(row.result)
                if answered_by is not None and state != "invalid":
                    line = with_provider(line, answered_by(row.lane, row.model))
            elif state in ("failed", "invalid"):
                where = f"{inputs[row.file_no].name}:{row.line}" if row.file_no >= 0 else "a call"
                line = error_line(row.custom_id, "invalid_request", f"{where}: {row.error}")
            else:  # pending or queued: the job stopped before this row ran
                line = error_line(row.custom_id, "not_run", "not run: the job stopped before this row was sent")
            yield state, with_id(line, job_id, row.idx)


def export(store: JobStore, inputs: list[Path], settings: JobSettings) -> tuple[Path, Path]:
    """Writes one line per input row, in input order; final failures also to the errors file."""
    check_results(store)  # before a byte is written: a damaged file must not give a wrong export
    out_path, err_path = output_paths(inputs, settings, store.path.parent)
    tmp_out, tmp_err = out_path.with_name(out_path.name + ".part"), err_path.with_name(err_path.name + ".part")
    any_errors = False
    with open(tmp_out, "wb") as out, open(tmp_err, "wb") as err:
        by = settings.answered_by if settings.fallbacks else None
        for state, line in output_lines(store, inputs, check=False, answered_by=by):
            if state in ("failed", "invalid"):
                err.write(line + b"\n")
                any_errors = True
            out.write(line + b"\n")
    os.replace(tmp_out, out_path)
    if any_errors:
        os.replace(tmp_err, err_path)
    else:
        tmp_err.unlink()
        err_path.unlink(missing_ok=True)
    return out_path, err_path


class ResultReader:
    """Reads result lines out of a job's downloaded result files (memory-mapped).

    At most `_OPEN_MAPS` files stay mapped (and open), the least recently read closed first: an
    export in input order moves from one chunk's files to the next, and a mapped file's pages count
    towards the process's memory while it stays mapped, so a long job's export would otherwise
    grow with it (and run out of file handles).
    """

    def __init__(self, store: JobStore) -> None:
        self.root = store.path.parent
        self.paths = store.result_files()
        self.maps: OrderedDict[int, mmap.mmap] = OrderedDict()

    def __enter__(self) -> ResultReader:
        return self

    def __exit__(self, *exc: object) -> None:
        for m in self.maps.values():
            m.close()
        self.maps.clear()

    def line(self, result: Result) -> bytes:
        if not isinstance(result, ResultRef):
            return result.line() if isinstance(result, CachedResult) else result
        maps = self.maps
        m = maps.get(result.file)
        if m is None:
            path = self.root / self.paths[result.file]
            try:
                with open(path, "rb") as fh:
                    m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as exc:  # mmap refuses an empty file with ValueError
                raise DamagedResults(
                    f"{path}: a result file of this job is missing or unreadable: {exc}", files={str(path): str(exc)}
                ) from exc
            maps[result.file] = m
            if len(maps) > _OPEN_MAPS:
                maps.popitem(last=False)[1].close()
        elif next(reversed(maps)) != result.file:
            maps.move_to_end(result.file)
        end = result.offset + result.length
        if end > len(m):  # cut short since it was downloaded: never hand out a part of a line
            path = self.root / self.paths[result.file]
            problem = f"cut short: {len(m):,} bytes, a row points up to byte {end:,}"
            raise DamagedResults(f"{path}: a result file of this job is {problem}", files={str(path): problem})
        return m[result.offset : end]


#: Result files a `ResultReader` keeps mapped at once: enough for the files an export in input
#: order moves between (a chunk's output and errors, and the chunks its retried rows went in).
_OPEN_MAPS = 16


def line_id(job_id: str, idx: int) -> str:
    """The id of a row's output line where no provider gave one (a translated result, a direct
    call's answer, an error line of our own): derived from the job and the row, so every export
    gives the same one. OpenAI's shape: `batch_req_` and 32 hex digits."""
    return "batch_req_" + hashlib.sha256(f"{job_id}/{idx}".encode()).hexdigest()[:32]


#: A line whose `id` is a string, as OpenAI writes them (`{"id": "batch_req_...`): kept as it is.
_HAS_ID = re.compile(rb'\{\s*"id"\s*:\s*"[^"]')
#: How llmbatch's own lines without an id begin (orjson, `id` first): the id goes in without parsing.
_NULL_ID = b'{"id":null,'


def with_id(line: bytes, job_id: str, idx: int) -> bytes:
    """`line` with a non-empty string `id` (OpenAI's batch output lines always have one, and
    peers key on it): the provider's own where it gave one, else `line_id(job_id, idx)`.

    Export runs over every row, so the usual cases are settled on the line's first bytes;
    only a line of another shape (no `id`, or not first) is parsed.
    """
    if _HAS_ID.match(line):
        return line
    new = b'{"id":"' + line_id(job_id, idx).encode() + b'",'
    if line.startswith(_NULL_ID):
        return new + line[len(_NULL_ID) :]
    rec = orjson.loads(line)
    if isinstance(rec.get("id"), str) and rec["id"]:
        return line
    return orjson.dumps({"id": line_id(job_id, idx), **{k: v for k, v in rec.items() if k != "id"}})


def with_provider(line: bytes, provider: str) -> bytes:
    """`line` (a JSON object) with `"provider"` last; appended to the bytes, not re-serialized."""
    line = line.rstrip()
    if not line.endswith(b"}"):
        return line
    rec_end = b"," if line[:-1].rstrip() != b"{" else b""
    return line[:-1] + rec_end + b'"provider":' + orjson.dumps(provider) + b"}"


def error_line(custom_id: str | None, code: str, message: str) -> bytes:
    return orjson.dumps(
        {"id": None, "custom_id": custom_id, "response": None, "error": {"code": code, "message": message}}
    )
