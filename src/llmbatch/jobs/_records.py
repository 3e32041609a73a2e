"""The records a job's parts hand each other: rows and chunks as the store reads them, and the
outcome of collecting a batch as the store applies it. Named fields, never positional tuples."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import NamedTuple

import orjson

__all__ = [
    "Usage",
    "CHUNK_STATES",
    "ROW_STATES",
    "IN_FLIGHT",
    "CachedResult",
    "CheckedRow",
    "Chunk",
    "ChunkRow",
    "DirectRow",
    "ExportRow",
    "Failure",
    "InputRow",
    "ModelEstimate",
    "Outcome",
    "PendingRow",
    "RequestRow",
    "Result",
    "ResultFile",
    "ResultRef",
    "Retry",
    "Success",
]

#: pending: waiting for a chunk · queued: in a chunk not yet collected · succeeded / failed:
#: final · invalid: failed validation (final, never sent).
ROW_STATES = ("pending", "queued", "succeeded", "failed", "invalid")
#: planned -> uploading -> uploaded -> creating -> submitted -> collected (or abandoned).
CHUNK_STATES = ("planned", "uploading", "uploaded", "creating", "submitted", "collected", "abandoned")
#: Chunk states between the first remote call and collection: they count against the limits.
IN_FLIGHT = ("uploading", "uploaded", "creating", "submitted")


class ResultRef(NamedTuple):
    """Where a row's result line lies: in a downloaded result file (`result_files`), by byte range."""

    file: int
    offset: int
    length: int


class CachedResult(NamedTuple):
    """A row's answer taken from the response cache (`_cache.py`): the answer's result record as
    the cache keeps it (zlib-compressed, without id and custom_id), made into the row's line when
    it is read: 100,000 answers are copied in one statement, not built a line at a time."""

    custom_id: str | None
    packed: bytes

    def line(self) -> bytes:
        """The row's result line: under its own custom_id, marked `"cached": true`, with no id
        (the export gives it one derived from the job and the row)."""
        record = zlib.decompress(self.packed)
        return b'{"id":null,"custom_id":' + orjson.dumps(self.custom_id) + b',"cached":true,' + record[1:]


#: A row's result: its line's bytes, where the line lies in a downloaded file, or an answer
#: from the response cache.
Result = bytes | ResultRef | CachedResult


@dataclass(slots=True)
class Chunk:
    """A planned remote batch and where it stands."""

    id: int
    tag: str
    endpoint: str
    model: str
    rows: int
    bytes: int
    est_input: int
    est_output: int
    est_cost: float
    state: str
    file_id: str | None
    batch_id: str | None
    remote_status: str | None
    remote_completed: int
    remote_failed: int
    submit_errors: int
    intent_at: int | None
    created_at: int
    submitted_at: int | None
    finished_at: int | None
    #: Which provider holds it: 0 the job's own, n its n-th fallback (`_failover.py`).
    lane: int = 0
    #: 1 once `--fallback-after` cancelled its batch: what it did not answer goes to the next provider.
    cut: int = 0


class CheckedRow(NamedTuple):
    """One input line after validation and estimation (`RowRules.check`)."""

    custom_id: str | None
    #: The id sent to the provider when the row's own does not fit its rules.
    remote_id: str | None
    #: 1 when the line must be rewritten before sending (the job sets its model).
    rewrite: int
    endpoint: str | None
    model: str | None
    est_input: int
    est_output: int
    #: 1 when the row sets no output cap (its output estimate is a guess).
    uncapped: int
    state: str
    error: str | None
    #: Bytes the row takes in a batch as the provider receives it (`Provider.check_and_measure`);
    #: None: its line and a newline.
    wire_length: int | None = None
    #: The request's content address (`_rows.request_key`), for the response cache.
    request_key: bytes | None = None
    #: 1 when the request's answer is sampled (`_rows.samples`): cached only with `--cache all`.
    sampled: int = 0

    @classmethod
    def invalid(
        cls, custom_id: str | None, error: str, endpoint: str | None = None, model: str | None = None
    ) -> CheckedRow:
        return cls(custom_id, None, 0, endpoint, model, 0, 0, 0, "invalid", error, None, None, 0)


class InputRow(NamedTuple):
    """A checked line of an input file as the store keeps it: where it is, and what checking it
    found (the fields of `CheckedRow`, flat: rows are written by the hundred thousand)."""

    idx: int
    file_no: int
    line: int
    offset: int
    length: int
    custom_id: str | None
    remote_id: str | None
    rewrite: int
    endpoint: str | None
    model: str | None
    est_input: int
    est_output: int
    uncapped: int
    state: str
    error: str | None
    wire_length: int | None = None
    request_key: bytes | None = None
    sampled: int = 0

    @classmethod
    def of(cls, idx: int, file_no: int, line: int, offset: int, length: int, row: CheckedRow) -> InputRow:
        return tuple.__new__(cls, (idx, file_no, line, offset, length, *row))


class RequestRow(NamedTuple):
    """A call made through the Python API: its checked row and its request line (stored, not in a file)."""

    idx: int
    row: CheckedRow
    request: bytes


class PendingRow(NamedTuple):
    """What planning needs of a pending row."""

    idx: int
    #: Bytes in a batch as the provider receives it (its line and newline, or its wire length).
    size: int
    est_input: int
    est_output: int


class ChunkRow(NamedTuple):
    """A row of a chunk being written or collected."""

    idx: int
    file_no: int
    offset: int
    length: int
    custom_id: str
    remote_id: str | None
    rewrite: int
    model: str
    attempts: int


class DirectRow(NamedTuple):
    """A row handed to the direct API."""

    idx: int
    file_no: int
    offset: int
    length: int
    custom_id: str
    remote_id: str | None
    rewrite: int
    endpoint: str
    model: str
    attempts: int


class ExportRow(NamedTuple):
    """A row as the export reads it, in input order."""

    idx: int
    file_no: int
    line: int
    custom_id: str | None
    state: str
    result: Result | None
    error: str | None
    #: Which provider's answer it holds (`_failover.py`), and the model it was sent as.
    lane: int = 0
    model: str | None = None


class ResultFile(NamedTuple):
    """A downloaded result file that rows point into, as recorded when it was applied.

    `size` and `sha256` are None for files recorded before llmbatch kept them (schema
    version 2), `file_id` and `chunk_id` likewise. `extent` is the end of the furthest line a
    row points at: the file must be at least that long.
    """

    id: int
    path: str
    size: int | None
    sha256: str | None
    file_id: str | None
    chunk_id: int | None
    extent: int
    rows: int


class ModelEstimate(NamedTuple):
    """Estimated tokens of one model's valid rows, and of those with long prompts."""

    model: str
    rows: int
    input_tokens: int
    output_tokens: int
    uncapped: int
    long_rows: int
    long_input_tokens: int
    long_output_tokens: int


class Success(NamedTuple):
    """A row answered successfully, with its usage and cost."""

    result: Result
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    cost: float
    idx: int


class Failure(NamedTuple):
    """A row that failed for good."""

    result: Result
    error: str
    idx: int
    #: Failed for a reason another provider may not have (expired, cancelled, 5xx, quota): a
    #: job with fallbacks sends it to the next one (`_failover.py`).
    failover: bool = False


class Retry(NamedTuple):
    """A row going back to pending, with its last error."""

    error: str
    idx: int


@dataclass
class Usage:
    """Tokens and cost added up (results that matched no row)."""

    results: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cost: float = 0.0

    def add(self, s: Success) -> None:
        self.results += 1
        self.input_tokens += s.input_tokens
        self.output_tokens += s.output_tokens
        self.cached_tokens += s.cached_tokens
        self.reasoning_tokens += s.reasoning_tokens
        self.cost += s.cost


@dataclass
class Outcome:
    """What collecting a batch (or a round of direct calls) did to its rows, applied in one
    transaction by `JobStore.apply`."""

    max_attempts: int
    #: The user cancelled the job: rows its cancel cut off get their attempt back.
    user_cancelled: bool = False
    succeeded: list[Success] = field(default_factory=list)
    retry: list[Retry] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)
    #: Back to pending with the attempt given back: rows the user's own cancel cut off.
    refund: list[Retry] = field(default_factory=list)
    #: Successful results that matched no row: their usage is spent all the same.
    unmatched: Usage = field(default_factory=Usage)
    #: The batch was cut off by `--fallback-after`: rows it did not answer fail at once, for the
    #: next provider, instead of being tried here again.
    cut: bool = False

    def give_up_or_retry(
        self, idx: int, attempts: int, result: Result, message: str, *, cut_off: bool = False, refund: bool = False
    ) -> None:
        """A retryable failure: another attempt while the row has some left, else final.

        `cut_off`: the row's batch was cancelled before it ran (refunded when the user cancelled);
        `refund`: the row was never tried (a batch refused for a full quota).
        """
        if refund or (cut_off and self.user_cancelled):
            self.refund.append(Retry(message, idx))
        elif attempts < self.max_attempts and not self.cut:
            self.retry.append(Retry(message, idx))
        else:
            self.failed.append(Failure(result, message, idx, failover=True))

    def describe(self) -> str:
        return (
            f"{len(self.succeeded)} succeeded, {len(self.retry) + len(self.refund)} to retry, {len(self.failed)} failed"
        )
