"""Validation of a batch input file: every line checked, every problem named with its line.

Runs in a worker thread (it is CPU work over a whole file). Memory stays flat whatever the
file's size: lines are streamed, and seen custom_ids live in a temporary SQLite file rather
than in a Python set.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._rows import check_row, iter_lines
from .._text import clip
from ._eta import OutputBudget

__all__ = ["ValidationResult", "validate_input", "iter_lines"]  # iter_lines re-exported for the worker


@dataclass
class ValidationResult:
    """Requests counted, the one model used, and the errors found (capped)."""

    total: int = 0
    model: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    #: Errors found beyond the cap (not listed).
    more_errors: int = 0
    #: What the rows may generate (their max_tokens), for the server's estimate of the batch's time.
    output: OutputBudget = field(default_factory=OutputBudget)


class _SeenIds:
    """custom_ids seen so far, with the line each was first seen on, on disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=OFF")
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.execute("CREATE TABLE ids (custom_id TEXT PRIMARY KEY, line INTEGER) WITHOUT ROWID")
        self.db.execute("BEGIN")

    def first_line(self, custom_id: str, line: int) -> int | None:
        """Records the id; returns the earlier line when it was already seen."""
        try:
            self.db.execute("INSERT INTO ids VALUES (?, ?)", (custom_id, line))
            return None
        except sqlite3.IntegrityError:
            return self.db.execute("SELECT line FROM ids WHERE custom_id=?", (custom_id,)).fetchone()[0]

    def close(self) -> None:
        self.db.close()
        for suffix in ("", "-journal", "-wal", "-shm"):
            try:
                os.unlink(str(self.path) + suffix)
            except FileNotFoundError:
                pass


def validate_input(
    path: Path,
    endpoint: str,
    *,
    max_lines: int,
    max_errors: int,
    tmp_dir: Path,
    check_model: Callable[[str], str | None] = lambda model: None,
    model_family: Callable[[str], str] = lambda model: model,
    max_line_bytes: int | None = None,
) -> ValidationResult:
    """Checks every line of a batch input file against OpenAI's rules for `endpoint`.

    Each line must be a JSON object with a unique non-empty string `custom_id`, `method`
    "POST", `url` equal to the endpoint and an object `body` naming a `model`; every line
    must name the same model (or models of one `model_family`: a base model and its LoRA
    adapters) and the engine must serve it (`check_model` says why not). A line over
    `max_line_bytes` is refused unparsed, as a direct request over that size is.
    Blank lines are skipped. Errors carry OpenAI's `{code, message, param, line}`.
    """
    result = ValidationResult()
    seen = _SeenIds(tmp_dir / f"validate-{os.getpid()}-{id(result)}.sqlite")
    first_model_line = 0
    family: str | None = None
    checked: dict[str, str | None] = {}

    def error(line: int, code: str, message: str, param: str | None = None) -> None:
        if len(result.errors) < max_errors:
            result.errors.append({"code": code, "message": f"Line {line}: {message}", "param": param, "line": line})
        else:
            result.more_errors += 1

    try:
        for n, raw in iter_lines(path):
            if not raw.strip():
                continue
            result.total += 1
            if result.total > max_lines:
                error(
                    n,
                    "too_many_requests",
                    f"the file has more than {max_lines} requests, this server's limit per batch; "
                    "split it into several batches",
                )
                break
            if max_line_bytes is not None and len(raw) > max_line_bytes:
                error(
                    n,
                    "request_too_large",
                    f"the request is {len(raw):,} bytes; this server takes at most {max_line_bytes:,} per request",
                )
                continue
            obj, problems = check_row(raw, endpoint)
            for p in problems:
                error(n, p.code, p.message, p.param)
            if obj is None:
                continue
            custom_id = obj.get("custom_id")
            if isinstance(custom_id, str) and custom_id:
                earlier = seen.first_line(custom_id, n)
                if earlier is not None:
                    error(
                        n,
                        "duplicate_custom_id",
                        f"custom_id {clip(custom_id, quote=True)} was already used on line {earlier}; "
                        "custom_ids must be unique",
                        "custom_id",
                    )
            body = obj.get("body")
            result.output.add(body)
            model = body.get("model") if isinstance(body, dict) else None
            if not isinstance(model, str) or not model:
                continue
            if model not in checked:
                if len(checked) > 1000:  # a file of endless distinct names: stay bounded
                    checked.clear()
                checked[model] = check_model(model)
            why = checked[model]
            if why:
                error(n, "model_not_found", clip(why, limit=1000), "body.model")  # engines may echo the name
                continue
            if result.model is None:
                result.model = model
                first_model_line = n
                family = model_family(model)
            elif model != result.model and model_family(model) != family:
                error(
                    n,
                    "mismatched_model",
                    f"model {clip(model, quote=True)} differs from {clip(result.model, quote=True)} "
                    f"on line {first_model_line}; "
                    "a batch runs one model, so split the file by model",
                    "body.model",
                )
        if result.total == 0:
            error(1, "empty_file", "the input file holds no requests")
    finally:
        seen.close()
    return result
