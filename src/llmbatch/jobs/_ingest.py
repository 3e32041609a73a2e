"""Reading a job's inputs: every row validated and estimated, streamed into the job store.

The per-row work (JSON parsing, OpenAI's batch rules, the provider's own rules, offline
token counting) is CPU-bound, so large inputs are cut into byte ranges on line boundaries
and checked by a pool of worker processes while this process writes their rows to SQLite,
in input order. Small inputs are checked in-process (a pool costs more than it saves).
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import hashlib
import multiprocessing
import os
import re
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._exceptions import InputError
from .._rows import _BOM as BOM
from .._rows import check_row, input_stat, not_jsonl, request_key, samples
from ..pricing import estimate_row
from ..providers import Provider, provider_class, split_model
from ._records import CheckedRow, InputRow
from ._settings import JobSettings
from ._store import JobStore

__all__ = ["IngestReport", "RowRules", "ingest"]

#: Bytes per range handed to a worker; rows are written to the store a range at a time.
_RANGE_BYTES = 8 << 20
#: Inputs smaller than this are checked in-process.
_POOL_MIN_BYTES = 16 << 20
_EMPTY = "no requests: the file is empty"


@dataclass
class IngestReport:
    rows: int = 0
    invalid: int = 0
    problems: list[str] | None = None


@dataclass(frozen=True)
class RowRules:
    """What a row is checked against: picklable, so worker processes get the same rules."""

    provider: str | None = None
    model: str | None = None
    default_output_tokens: int = 1024
    #: The model names the local provider's engine answers (None: any), with the engine's name.
    models: tuple[str, ...] | None = None
    engine: str | None = None

    @classmethod
    def of(cls, settings: JobSettings) -> RowRules:
        models = engine = None
        if settings.provider == "local":
            from ..engines import create_engine

            engine = settings.engine
            models = create_engine(engine, settings.local_engine_options()).served_models()
        return cls(settings.provider, settings.model, settings.default_output_tokens, models, engine)

    def check(self, raw: bytes) -> CheckedRow:
        """One input line validated (OpenAI's batch rules, the provider's own) and estimated."""
        obj, problems = check_row(raw)
        custom_id = obj.get("custom_id") if isinstance(obj, dict) else None
        custom_id = custom_id if isinstance(custom_id, str) and custom_id else None
        if problems or obj is None:
            message = "; ".join(f"{p.code}: {p.message}" for p in problems)
            return CheckedRow.invalid(custom_id, message)
        assert custom_id is not None
        body, endpoint = obj["body"], obj["url"]
        model = split_model(self.model or body["model"], self.provider)[1]
        rewrite = int(model != body["model"])
        if self.models is not None and model not in self.models:
            message = (
                f"unknown_model: the local {self.engine} engine serves {self.models[0]!r}, not {model!r}; "
                f"run with --model {self.models[0]} to send every row to it"
            )
            return CheckedRow.invalid(custom_id, message, endpoint, model)
        if rewrite:
            body = {**body, "model": model}
        remote_id = wire = None
        cls: type[Provider] | None = None
        if self.provider is not None:
            cls = _provider_classes.get(self.provider) or _provider_classes.setdefault(
                self.provider, provider_class(self.provider)
            )
            remote_id = remote_id_for(custom_id, cls.custom_id_pattern)
            reasons, wire = cls.check_and_measure(remote_id or custom_id, endpoint, body)
            if reasons:
                message = "; ".join(f"unsupported_by_provider: {r}" for r in reasons)
                return CheckedRow.invalid(custom_id, message, endpoint, model)
        default_out = (cls.default_max_tokens if cls is not None else None) or self.default_output_tokens
        est = estimate_row(endpoint, body, default_output_tokens=default_out)
        # The cache's key: 2 µs a row here, in the checking workers, spares a second read of the inputs.
        return CheckedRow(custom_id, remote_id, rewrite, endpoint, model, est.input_tokens, est.output_tokens,
                          int(not est.capped), "pending", None, wire, request_key(endpoint, body),
                          int(samples(endpoint, body)))  # fmt: skip


_provider_classes: dict[str, type[Provider]] = {}
_input_row = functools.partial(tuple.__new__, InputRow)


def remote_id_for(custom_id: str, pattern: re.Pattern[str] | None) -> str | None:
    """The id to send instead of `custom_id` when the provider's pattern refuses it (else None).

    Derived from the id itself (stable across runs) and kept in the job store with the row.
    """
    if pattern is None or pattern.fullmatch(custom_id):
        return None
    return "lb_" + hashlib.sha256(custom_id.encode()).hexdigest()[:40]


def _ranges(path: Path, size: int, step: int) -> Iterator[tuple[int, int]]:
    """Byte ranges of about `step` bytes that start and end on line boundaries."""
    start = 0
    with open(path, "rb") as f:
        while start < size:
            end = min(start + step, size)
            if end < size:
                f.seek(end)
                f.readline()  # to the end of the line `end` falls in
                end = f.tell()
            yield start, end
            start = end


#: A checked line of a range, as a worker sends it back: the line number in the range, its byte
#: offset and length, then the fields of its `CheckedRow` (a plain tuple: it crosses processes
#: by the hundred thousand, and a plain tuple pickles fastest).
_Checked = tuple[Any, ...]


def _check_range(path: Path, start: int, end: int, rules: RowRules) -> tuple[int, list[_Checked]]:
    """(lines in the range, its non-blank lines checked)."""
    rows: list[_Checked] = []
    n = 0
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    pos = 0
    check = rules.check
    while pos < len(data):
        nl = data.find(b"\n", pos)
        stop = len(data) if nl < 0 else nl
        raw, offset = data[pos:stop], start + pos
        pos = stop + 1
        n += 1
        if offset == 0 and raw.startswith(BOM):
            raw, offset = raw[len(BOM) :], len(BOM)
        raw = raw.rstrip(b"\r")
        if raw.strip():
            rows.append((n, offset, len(raw), *check(raw)))
    return n, rows


def _pool(workers: int) -> cf.ProcessPoolExecutor:
    # fork shares the loaded modules with the workers; each loads the vocabularies its rows need
    # (tens of milliseconds), so this process keeps none it does not use.
    return cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"))


def _can_fork() -> bool:
    """Whether worker processes can be forked safely: only from a single-threaded process.

    Forking a process that runs other threads (a notebook kernel, `run_file(wait=False)`)
    can deadlock the child, and spawned workers would re-import the user's `__main__` script;
    such callers check rows in-process instead.
    """
    return "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1


def ingest(
    store: JobStore,
    inputs: list[Path],
    settings: JobSettings | RowRules,
    max_problems: int = 50,
    *,
    workers: int | None = None,
    range_bytes: int = _RANGE_BYTES,
) -> IngestReport:
    """Validates and estimates every row of every input, in order, into the job store.

    Rows are checked by the job's `settings` (or by `RowRules` given directly: `llmbatch
    estimate` checks without a job). Each invalid row is stored as `invalid` with a message
    naming its file, line and reason; the report names the first `max_problems`.
    `workers`: checking processes (default: one per core, none for small inputs);
    `range_bytes`: the size of the pieces they check.
    """
    rules = settings if isinstance(settings, RowRules) else RowRules.of(settings)
    if rules.provider is not None:
        provider_class(rules.provider)  # a missing SDK is a configuration error, said once
    report = IngestReport(problems=[])
    sizes = [input_stat(p).st_size for p in inputs]
    for path, size in zip(inputs, sizes):
        # Said once, before any row is read: an empty file (the server refuses it as
        # `empty_file`), or one that is not JSONL at all (a CSV would be an error per line).
        if size == 0:
            raise InputError(f"{path}: {_EMPTY}")
        if (why := not_jsonl(path)) is not None:
            raise InputError(f"{path}: {why}")
    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if sum(sizes) >= _POOL_MIN_BYTES and _can_fork() else 0
    tasks = [
        (n, path, s, e)
        for n, (path, size) in enumerate(zip(inputs, sizes))
        for s, e in _ranges(path, size, range_bytes)
    ]
    idx = 0
    line_base = [0] * len(inputs)
    rows_in = [0] * len(inputs)

    names = [p.name for p in inputs]

    def store_range(file_no: int, lines: int, rows: list[_Checked]) -> None:
        nonlocal idx
        base = line_base[file_no]
        line_base[file_no] += lines
        rows_in[file_no] += len(rows)
        batch = [_input_row((idx + n, file_no, base + r[0], *r[1:])) for n, r in enumerate(rows)]
        idx += len(rows)
        problems = [(file_no, r.line, r.error or "") for r in batch if r.state == "invalid"]
        if batch:
            problems += store.insert_checked(batch, names)
        assert report.problems is not None
        for f, line, message in sorted(problems)[: max(0, max_problems - len(report.problems))]:
            report.problems.append(f"{inputs[f]}:{line}: {message}")

    if workers <= 1 or len(tasks) <= 1:
        for file_no, path, s, e in tasks:
            store_range(file_no, *_check_range(path, s, e, rules))
    else:
        with _pool(workers) as pool:
            window: deque[tuple[int, cf.Future[tuple[int, list[_Checked]]]]] = deque()
            todo = iter(tasks)
            for file_no, path, s, e in todo:
                window.append((file_no, pool.submit(_check_range, path, s, e, rules)))
                if len(window) >= 2 * workers:  # bounded: memory stays flat however large the input
                    done_no, fut = window.popleft()
                    store_range(done_no, *fut.result())
            while window:
                done_no, fut = window.popleft()
                store_range(done_no, *fut.result())
    for path, n in zip(inputs, rows_in):
        if not n:  # blank lines only
            raise InputError(f"{path}: {_EMPTY}")
    report.rows = idx
    report.invalid = store.invalid_count()
    return report
