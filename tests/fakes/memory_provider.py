"""An in-memory fake of the remote side of the provider seam: OpenAI's Batch API, in a dict.

`MemoryProvider` implements `llmbatch.providers.Provider` the way OpenAI's Batch API behaves
(shared/reference/provider-batch-apis.md, section 1), with no HTTP and no real time, so the job
runner's planning, retries, budget and reconcile logic can be tested in-process in milliseconds
(as Inspect AI tests its `Batcher` with a fake subclass). It is a fake of the provider, not a
mock of our code: it keeps uploads (tagged by filename) and batches (tagged by metadata), moves
batches through `validating -> in_progress -> completed | failed | expired | cancelling ->
cancelled`, and writes output and error files in OpenAI's result-line format with
`request_counts` and usage.

Time is counted in polls: each `get_batch` call advances that batch one step, so a batch ends
after `BatchScript.polls` polls, whatever the wall clock says. Everything is scriptable per test:

- `answer(request) -> (status_code, body) | RowError`: each row's answer (default: an echo of
  the last user message with `usage`); `Request.attempt` counts how often the fake saw the row;
- `scripts`: how the next batches created end (`BatchScript`: completed, expired after some
  rows, failed with validation errors such as `token_limit_exceeded`, or ended after K polls);
- `fail(kind, ...)`: the next calls of one kind raise a retryable or final `ProviderError`,
  or act and then lose their answer (`lose=True`: the batch exists but the caller hears a
  timeout), or act and then crash the caller (`crash=True`: raises `Crash`, a BaseException,
  as if the process died right there);
- `calls` counts calls of each kind; `max_in_flight_seen` the most batches not yet ended at once;
  `sent` and `ran` count each custom_id sent in a batch and answered 2xx.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from llmbatch._exceptions import ProviderError
from llmbatch.providers import Provider, ProviderLimits, RemoteBatch, RemoteStatus
from llmbatch.providers._base import JOB_KEY, TAG_KEY

__all__ = [
    "Answer",
    "BatchScript",
    "Crash",
    "MemoryBatch",
    "MemoryFile",
    "MemoryProvider",
    "Request",
    "RowError",
    "chat_completion",
    "tagged_filename",
]

#: Every kind of call the seam has, as counted in `MemoryProvider.calls`.
CALL_KINDS = (
    "upload", "find_upload", "create_batch", "find_batch", "get_batch", "download", "cancel", "direct", "delete_file",
    "list_job_batches",
)  # fmt: skip
_FILE_ERROR_CODES = {"expired": "batch_expired", "cancelled": "batch_cancelled"}
_NOT_RUN = {
    "expired": "This request could not be executed before the completion window expired.",
    "cancelled": "This request was not executed because the batch was cancelled.",
}


class Crash(BaseException):
    """The process "died" inside a call (raised by a fault with `crash=True`). A BaseException,
    so nothing in the runner that catches errors catches it."""


def tagged_filename(tag: str) -> str:
    """The upload filename that carries a chunk's tag (the OpenAI adapter's convention)."""
    return f"llmbatch-{tag}.jsonl"


@dataclass(frozen=True)
class Request:
    """One request the fake answers: a batch input line, or a direct call (`custom_id` None)."""

    custom_id: str | None
    url: str
    body: dict[str, Any]
    #: 1 the first time the fake sees this row (by custom_id; a direct call by its body), 2 the next, ...
    attempt: int
    via: str  # "batch" | "direct"

    @property
    def text(self) -> str:
        """The last user message's text ("" without one)."""
        for m in reversed(self.body.get("messages") or []):
            if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str):
                return str(m["content"])
        return ""


@dataclass(frozen=True)
class RowError:
    """A row answered with OpenAI's line-level `error` (`response: null`), e.g. `batch_expired`."""

    code: str
    message: str = "error"


#: What `answer` returns: an HTTP status and JSON body, or a line-level error.
Answer = tuple[int, Any] | RowError


def chat_completion(content: str, prompt_tokens: int = 10, completion_tokens: int = 5, model: str = "m") -> Any:
    """A chat completion body, with the usage the runner prices."""
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def echo(request: Request) -> Answer:
    """The default answer: the last user message echoed (10 prompt + 5 completion tokens);
    other endpoints get a body with usage only."""
    model = str(request.body.get("model", "m"))
    if request.url.endswith("/chat/completions"):
        return 200, chat_completion(request.text, model=model)
    return 200, {"object": "list", "model": model, "data": [], "usage": {"prompt_tokens": 10, "total_tokens": 10}}


@dataclass
class BatchScript:
    """How one batch ends. `polls`: get_batch calls until it ends (the first moves it out of
    `validating`; the rows run evenly over the polls between)."""

    ends: str = "completed"  # completed | expired | failed
    polls: int = 2
    #: expired: how many rows (in file order) ran before the window passed.
    run_rows: int = 0
    #: failed: OpenAI's validation errors, `{code, message, param, line}` (line 1-based or None).
    errors: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def expire(cls, run_rows: int, polls: int = 2) -> BatchScript:
        return cls("expired", polls, run_rows=run_rows)

    @classmethod
    def fail(cls, code: str, message: str = "refused", line: int | None = None) -> BatchScript:
        return cls("failed", 1, errors=[{"code": code, "message": message, "param": None, "line": line}])


@dataclass
class MemoryFile:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int
    deleted: bool = False


@dataclass
class MemoryBatch:
    """A batch as the fake keeps it (OpenAI's batch object, plus what the fake needs)."""

    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    metadata: dict[str, str]
    created_at: int
    script: BatchScript
    lines: list[dict[str, Any]]
    status: RemoteStatus = RemoteStatus.VALIDATING
    polls: int = 0
    #: Rows run so far (a prefix of `lines`), with their output lines.
    ran: list[bytes] = field(default_factory=list)
    failed_lines: list[bytes] = field(default_factory=list)
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=lambda: {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0})

    @property
    def tag(self) -> str | None:
        return self.metadata.get(TAG_KEY)

    @property
    def custom_ids(self) -> list[str]:
        return [str(line["custom_id"]) for line in self.lines]

    @property
    def models(self) -> set[str]:
        return {str(line["body"].get("model")) for line in self.lines}

    def remote(self, hide_input: bool = False) -> RemoteBatch:
        return RemoteBatch(
            id=self.id,
            status=self.status,
            output_file_id=self.output_file_id,
            error_file_id=self.error_file_id,
            total=len(self.lines) if self.status is not RemoteStatus.VALIDATING else 0,
            completed=len(self.ran),
            failed=len(self.failed_lines),
            errors=[dict(e) for e in self.errors],
            metadata=dict(self.metadata),
            created_at=self.created_at,
            input_file_id=None if hide_input else self.input_file_id,
        )


@dataclass
class _Fault:
    error: ProviderError
    lose: bool
    crash: bool
    before: bool


class MemoryProvider(Provider):
    """OpenAI's Batch API held in memory; see the module docstring for what a test can script."""

    name = "memory"

    def __init__(
        self,
        *,
        answer: Callable[[Request], Answer] = echo,
        limits: ProviderLimits | None = None,
        polls: int = 2,
        billed: bool = True,
        report_unrun: bool = True,
        hide_inputs: bool = False,
    ) -> None:
        self.answer = answer
        self.limits = limits or ProviderLimits()
        self.billed = billed
        #: Polls a batch takes when no script says otherwise.
        self.polls = polls
        #: Whether rows a batch never ran get `batch_expired`/`batch_cancelled` lines in its error
        #: file (OpenAI) or are simply missing from its results.
        self.report_unrun = report_unrun
        #: Whether batches name no input file (as Gemini's and Anthropic's: a batch's rows can
        #: then be read only from its results, once it ends).
        self.hide_inputs = hide_inputs
        #: How the next batches created end, in creation order (then the default).
        self.scripts: deque[BatchScript] = deque()
        self.files: dict[str, MemoryFile] = {}
        self.batches: dict[str, MemoryBatch] = {}
        self.calls: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()
        self.ran: Counter[str] = Counter()
        self.seen: Counter[str] = Counter()
        self.max_in_flight_seen = 0
        self._faults: dict[str, deque[_Fault]] = {k: deque() for k in CALL_KINDS}
        self._ids = itertools.count(1)

    # -- scripting ---------------------------------------------------------------------------

    def fail(
        self,
        kind: str,
        times: int = 1,
        *,
        status: int | None = 503,
        lose: bool = False,
        crash: bool = False,
        before: bool = False,
    ) -> None:
        """The next `times` calls of `kind` fail: with `ProviderError(status)` without acting
        (retryable for None, 408, 409, 429, 5xx; final otherwise); with `lose`, after acting
        (the answer was lost: a timeout, status None); with `crash`, by raising `Crash` after
        acting (or `before` acting)."""
        assert kind in CALL_KINDS, kind
        if lose:
            status = None
        error = ProviderError(
            f"{kind} failed: " + (f"HTTP {status}" if status is not None else "timed out"), status=status
        )
        for _ in range(times):
            self._faults[kind].append(_Fault(error, lose, crash, before))

    def script(self, *scripts: BatchScript) -> None:
        """The next batches created end as these say, in order."""
        self.scripts.extend(scripts)

    @property
    def batch_list(self) -> list[MemoryBatch]:
        """Every batch, in creation order."""
        return list(self.batches.values())

    def in_flight(self) -> int:
        return sum(1 for b in self.batches.values() if not b.status.terminal)

    def file_lines(self, file_id: str) -> list[dict[str, Any]]:
        return [orjson.loads(x) for x in self.files[file_id].data.splitlines() if x.strip()]

    # -- plumbing ------------------------------------------------------------------------------

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids):04d}"

    async def _enter(self, kind: str) -> _Fault | None:
        """Counts the call, yields to the loop once (so a task can be cancelled inside a call),
        and applies a scripted fault that strikes before acting."""
        self.calls[kind] += 1
        await asyncio.sleep(0)
        faults = self._faults[kind]
        fault = faults.popleft() if faults else None
        if fault is not None and not (fault.lose or fault.crash):
            raise fault.error
        if fault is not None and fault.crash and fault.before:
            raise Crash(f"crashed before {kind}")
        return fault

    @staticmethod
    def _exit(kind: str, fault: _Fault | None) -> None:
        """After acting: a lost answer or a crash, when scripted."""
        if fault is None:
            return
        if fault.crash:
            raise Crash(f"crashed after {kind}")
        raise fault.error

    def _answer(self, request_line: dict[str, Any], via: str) -> Answer:
        cid = request_line.get("custom_id")
        key = str(cid) if cid is not None else orjson.dumps(request_line["body"], option=orjson.OPT_SORT_KEYS).decode()
        self.seen[key] += 1
        request = Request(cid, str(request_line.get("url")), request_line["body"], self.seen[key], via)
        return self.answer(request)

    # -- files ---------------------------------------------------------------------------------

    async def upload(self, tag: str, path: Path) -> str:
        fault = await self._enter("upload")
        f = MemoryFile(self._new_id("file"), tagged_filename(tag), "batch", path.read_bytes(), int(time.time()))
        self.files[f.id] = f
        self._exit("upload", fault)
        return f.id

    async def find_upload(self, tag: str, since: int) -> str | None:
        fault = await self._enter("find_upload")
        name = tagged_filename(tag)
        found = next(
            (
                f.id
                for f in reversed(self.files.values())
                if not f.deleted and f.purpose == "batch" and f.filename == name and f.created_at >= since
            ),
            None,
        )
        self._exit("find_upload", fault)
        return found

    async def download(self, file_id: str, dest: Path) -> None:
        fault = await self._enter("download")
        f = self.files.get(file_id)
        if f is None or f.deleted:
            raise ProviderError(f"downloading {file_id} failed: HTTP 404", status=404)
        tmp = dest.with_suffix(dest.suffix + ".part")
        tmp.write_bytes(f.data)
        shutil.move(tmp, dest)
        self._exit("download", fault)

    async def delete_file(self, file_id: str) -> None:
        fault = await self._enter("delete_file")
        f = self.files.get(file_id)
        if f is None or f.deleted:
            raise ProviderError(f"deleting {file_id} failed: HTTP 404", status=404)
        f.deleted = True
        self._exit("delete_file", fault)

    # -- batches -------------------------------------------------------------------------------

    async def create_batch(
        self, tag: str, job: str, file_id: str, endpoint: str, completion_window: str = "24h"
    ) -> RemoteBatch:
        fault = await self._enter("create_batch")
        f = self.files.get(file_id)
        if f is None or f.deleted or f.purpose != "batch":
            raise ProviderError(f"creating a batch failed: HTTP 400: no input file {file_id}", status=400)
        script = self.scripts.popleft() if self.scripts else BatchScript(polls=self.polls)
        lines = [orjson.loads(x) for x in f.data.splitlines() if x.strip()]
        b = MemoryBatch(
            id=self._new_id("batch"),
            endpoint=endpoint,
            input_file_id=file_id,
            completion_window=completion_window,
            metadata={TAG_KEY: tag, JOB_KEY: job},
            created_at=int(time.time()),
            script=script,
            lines=lines,
        )
        # OpenAI's validation: every line's url is the batch's endpoint, one model per file.
        problems = [
            {"code": "invalid_url", "message": f"line {n}: url is not {endpoint}", "param": "url", "line": n}
            for n, line in enumerate(lines, start=1)
            if line.get("url") != endpoint
        ]
        if len(b.models) > 1:
            problems.append({"code": "mixed_models", "message": "one model per file", "param": "model", "line": None})
        if problems:
            b.script = BatchScript("failed", 1, errors=problems)
        self.batches[b.id] = b
        self.sent.update(b.custom_ids)
        self.max_in_flight_seen = max(self.max_in_flight_seen, self.in_flight())
        self._exit("create_batch", fault)
        return b.remote(self.hide_inputs)

    async def find_batch(self, tag: str, since: int, file_id: str | None = None) -> RemoteBatch | None:
        fault = await self._enter("find_batch")
        found = None
        for b in reversed(self.batches.values()):  # newest first, as OpenAI lists them
            if b.created_at >= since and (b.tag == tag or (file_id is not None and b.input_file_id == file_id)):
                found = b.remote(self.hide_inputs)
                break
        self._exit("find_batch", fault)
        return found

    async def list_job_batches(
        self, job_id: str, since: int, chunks_dir: Path | None = None
    ) -> list[RemoteBatch] | None:
        fault = await self._enter("list_job_batches")
        found = [
            b.remote(self.hide_inputs)
            for b in reversed(self.batches.values())  # newest first, as OpenAI lists them
            if b.created_at >= since and b.metadata.get(JOB_KEY) == job_id
        ]
        self._exit("list_job_batches", fault)
        return found

    async def get_batch(self, batch_id: str) -> RemoteBatch:
        fault = await self._enter("get_batch")
        b = self._batch(batch_id)
        self._advance(b)
        self._exit("get_batch", fault)
        return b.remote(self.hide_inputs)

    async def cancel(self, batch_id: str) -> RemoteBatch:
        fault = await self._enter("cancel")
        b = self._batch(batch_id)
        if b.status.terminal:
            raise ProviderError(f"cancelling {batch_id} failed: HTTP 409: the batch has ended", status=409)
        b.status = RemoteStatus.CANCELLING
        self._exit("cancel", fault)
        return b.remote(self.hide_inputs)

    async def direct(self, endpoint: str, body: dict[str, Any]) -> tuple[int, Any]:
        fault = await self._enter("direct")
        answer = self._answer({"custom_id": None, "url": endpoint, "body": body}, "direct")
        self._exit("direct", fault)
        if isinstance(answer, RowError):
            return 500, {"error": {"message": answer.message, "type": answer.code}}
        return answer

    def _batch(self, batch_id: str) -> MemoryBatch:
        b = self.batches.get(batch_id)
        if b is None:
            raise ProviderError(f"no batch {batch_id}: HTTP 404", status=404)
        return b

    # -- the lifecycle ---------------------------------------------------------------------------

    def _advance(self, b: MemoryBatch) -> None:
        """One poll's worth of progress."""
        if b.status.terminal:
            return
        b.polls += 1
        s = b.script
        if b.status is RemoteStatus.CANCELLING:
            self._end(b, RemoteStatus.CANCELLED)
            return
        if b.status is RemoteStatus.VALIDATING:
            if s.ends == "failed":
                b.errors = list(s.errors)
                self._end(b, RemoteStatus.FAILED)
                return
            b.status = RemoteStatus.IN_PROGRESS
        limit = s.run_rows if s.ends == "expired" else len(b.lines)
        if b.polls >= s.polls:
            self._run(b, limit)
            self._end(b, RemoteStatus.EXPIRED if s.ends == "expired" else RemoteStatus.COMPLETED)
        else:
            steps = max(s.polls - 1, 1)
            self._run(b, min(limit, len(b.lines) * (b.polls - 1) // steps))

    def _run(self, b: MemoryBatch, upto: int) -> None:
        """Runs the batch's rows up to `upto` (in file order)."""
        while len(b.ran) + len(b.failed_lines) < upto:
            line = b.lines[len(b.ran) + len(b.failed_lines)]
            answer = self._answer(line, "batch")
            rid = self._new_id("batch_req")
            cid = line["custom_id"]
            if isinstance(answer, RowError):
                out = {"id": rid, "custom_id": cid, "response": None,
                       "error": {"code": answer.code, "message": answer.message}}  # fmt: skip
                b.failed_lines.append(orjson.dumps(out))
                continue
            status, body = answer
            out = {"id": rid, "custom_id": cid, "response": {"status_code": status, "request_id": rid, "body": body},
                   "error": None}  # fmt: skip
            if 200 <= status < 300:
                b.ran.append(orjson.dumps(out))
                self.ran[str(cid)] += 1
                usage = (body or {}).get("usage") or {}
                inp = int(usage.get("prompt_tokens", 0))
                outp = int(usage.get("completion_tokens", 0))
                b.usage["input_tokens"] += inp
                b.usage["output_tokens"] += outp
                b.usage["total_tokens"] += inp + outp
            else:
                b.failed_lines.append(orjson.dumps(out))

    def _end(self, b: MemoryBatch, status: RemoteStatus) -> None:
        """Ends the batch: its output file (rows answered 2xx) and error file (the others)."""
        done = len(b.ran) + len(b.failed_lines)
        if status in (RemoteStatus.EXPIRED, RemoteStatus.CANCELLED) and self.report_unrun:
            code, message = _FILE_ERROR_CODES[status.value], _NOT_RUN[status.value]
            for line in b.lines[done:]:
                out = {"id": self._new_id("batch_req"), "custom_id": line["custom_id"], "response": None,
                       "error": {"code": code, "message": message}}  # fmt: skip
                b.failed_lines.append(orjson.dumps(out))
        b.status = status
        if status is RemoteStatus.FAILED:
            return  # failed validation: no files
        if b.ran:
            b.output_file_id = self._file(b, b.ran, "output")
        if b.failed_lines:
            b.error_file_id = self._file(b, b.failed_lines, "error")

    def _file(self, b: MemoryBatch, lines: list[bytes], kind: str) -> str:
        f = MemoryFile(
            self._new_id("file"), f"{b.id}_{kind}.jsonl", "batch_output", b"".join(x + b"\n" for x in lines),
            int(time.time()),
        )  # fmt: skip
        self.files[f.id] = f
        return f.id
