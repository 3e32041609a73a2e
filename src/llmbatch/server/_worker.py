"""The batch worker: validates, runs and finalizes batches, and resumes them after a crash.

One supervisor task looks at the store (on a tick, or when woken) and starts what each batch
needs next:

    validating  -> validate the input file (in a thread) -> in_progress | failed
    in_progress -> run the rows, bounded, journaling each -> finalizing -> completed
                   (or, when the window passes, expired; when cancelled, cancelling -> cancelled)
    finalizing / cancelling with no task (after a restart) -> finish the job

Everything a batch has done lives in the store and in its journal, so the supervisor needs
no memory of its own to resume after kill -9: it simply starts what the store says is owed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from .._exceptions import StateError
from ..engines import Engine, EngineRequest, EngineResponse, error_body
from ._config import ServerConfig
from ._ids import new_id
from ._journal import Journal, Totals
from ._store import BatchRow, FileRow, Store
from ._validate import ValidationResult, iter_lines, validate_input

__all__ = ["BatchWorker", "output_line", "files_dir"]

log = logging.getLogger("llmbatch.server")

_EXPIRED = {
    "code": "batch_expired",
    "message": "This request could not be executed before the completion window expired.",
}
_CANCELLED = {
    "code": "batch_cancelled",
    "message": "This request was not executed because the batch was cancelled.",
}


def files_dir(config: ServerConfig) -> Path:
    return config.data_dir / "files"


def output_line(custom_id: str | None, resp: EngineResponse) -> bytes:
    """One line of an output or error file, in OpenAI's batch output format."""
    body = resp.body
    if isinstance(body, list):  # a big answer in parts (echo); a batch line holds it whole
        body = b"".join(body)
    if isinstance(body, bytes):
        # Passed through unchanged, unless it would break the one-line-per-row format.
        body = orjson.Fragment(body) if b"\n" not in body and b"\r" not in body else orjson.loads(body)
    return orjson.dumps(
        {
            "id": new_id("batch_req_", 16),
            "custom_id": custom_id,
            "response": {"status_code": resp.status_code, "request_id": new_id("req_", 16), "body": body},
            "error": None,
        }
    )


def _unrun_line(custom_id: str, error: dict[str, str]) -> bytes:
    return orjson.dumps({"id": new_id("batch_req_", 16), "custom_id": custom_id, "response": None, "error": error})


@dataclass
class _Run:
    """A batch the worker is busy with: its task, and why it should stop early, if it should."""

    task: asyncio.Task[None]
    #: True while the batch's rows are being executed (what --max-active-batches bounds).
    executing: bool = False
    stop: str | None = None  # "cancel" or "expire"
    wake: asyncio.Event | None = None


class BatchWorker:
    """Runs every batch the store says is owed work, with one engine."""

    def __init__(self, config: ServerConfig, store: Store, engine: Engine) -> None:
        self.config = config
        self.store = store
        self.engine = engine
        self.rows_done: Counter[tuple[str, int]] = Counter()  # (endpoint, status) -> rows
        self._runs: dict[str, _Run] = {}
        self._wake = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._tmp = config.data_dir / "tmp"
        self._jobs = config.data_dir / "batches"

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        for d in (files_dir(self.config), self._tmp, self._jobs):
            d.mkdir(parents=True, exist_ok=True)
        self._sweep_orphans()
        self._supervisor = asyncio.create_task(self._supervise(), name="llmbatch-supervisor")

    async def stop(self) -> None:
        if self._supervisor:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        for run in list(self._runs.values()):
            run.task.cancel()
        for run in list(self._runs.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await run.task
        self._runs.clear()

    def notify(self) -> None:
        """Wakes the supervisor (a batch was created or cancelled)."""
        self._wake.set()

    def request_cancel(self, batch_id: str) -> None:
        """Tells a running batch to stop; the store already says `cancelling`."""
        run = self._runs.get(batch_id)
        if run is not None:
            run.stop = "cancel"
            if run.wake is not None:
                run.wake.set()
        self.notify()

    def _sweep_orphans(self) -> None:
        """Removes what a crash can leave behind: temp files, and output files never recorded."""
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        known = self.store.all_file_ids()
        for p in files_dir(self.config).iterdir():
            if p.name not in known:
                p.unlink(missing_ok=True)

    # -- supervisor ----------------------------------------------------------------------

    async def _supervise(self) -> None:
        while True:
            try:
                self._tick()
            except Exception:  # a bug here must not stop every batch for good
                log.exception("batch supervisor tick failed")
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=0.5)

    def _tick(self) -> None:
        now = int(time.time())
        running = sum(1 for r in self._runs.values() if r.executing and r.stop is None)
        for b in self.store.batches_in(("validating", "in_progress", "finalizing", "cancelling")):
            run = self._runs.get(b.id)
            expired = b.expires_at is not None and now >= b.expires_at and b.status in ("validating", "in_progress")
            if run is not None:
                if expired and run.stop is None:
                    run.stop = "expire"
                    if run.wake is not None:
                        run.wake.set()
                continue
            if b.status == "validating" and not expired:
                self._launch(b, self._validate(b))
            elif b.status == "in_progress" and (expired or running < self.config.max_active_batches):
                self._launch(b, self._execute(b), stop="expire" if expired else None, executing=True)
                running += 0 if expired else 1
            elif expired:  # validating past its window: nothing ran
                self._launch(b, self._finish(b, "expired"))
            elif b.status == "finalizing":
                self._launch(b, self._finish(b, "completed"))
            elif b.status == "cancelling":
                self._launch(b, self._finish(b, "cancelled"))
        for file_id in self.store.expired_files(now):
            self._delete_file(file_id)

    def _launch(
        self, b: BatchRow, coro: Coroutine[Any, Any, None], stop: str | None = None, executing: bool = False
    ) -> None:
        task = asyncio.create_task(coro, name=f"batch-{b.id}")
        self._runs[b.id] = _Run(task, executing=executing, stop=stop)

        def done(t: asyncio.Task[None], batch_id: str = b.id) -> None:
            self._runs.pop(batch_id, None)
            if not t.cancelled() and t.exception() is not None:
                log.error("batch %s: worker task failed", batch_id, exc_info=t.exception())
            self.notify()

        task.add_done_callback(done)

    def _delete_file(self, file_id: str) -> None:
        if self.store.delete_file(file_id):
            (files_dir(self.config) / file_id).unlink(missing_ok=True)

    # -- validating ----------------------------------------------------------------------

    async def _validate(self, b: BatchRow) -> None:
        if b.endpoint not in self.engine.endpoints:
            supported = ", ".join(sorted(self.engine.endpoints))
            result = ValidationResult()
            result.errors.append(
                {
                    "code": "unsupported_endpoint",
                    "message": f"The {self.engine.name!r} engine does not serve {b.endpoint}; it serves {supported}.",
                    "param": "endpoint",
                    "line": None,
                }
            )
        else:
            result = await asyncio.to_thread(
                validate_input,
                files_dir(self.config) / b.input_file_id,
                b.endpoint,
                max_lines=self.config.max_file_lines,
                max_errors=self.config.max_validation_errors,
                tmp_dir=self._tmp,
                check_model=self.engine.validate_model,
                model_family=self.engine.model_family,
                max_line_bytes=self.config.max_request_bytes,
            )
        try:
            self._record_validation(b, result)
        except StateError:
            pass  # cancelled while validating: the supervisor finishes it as cancelled

    def _record_validation(self, b: BatchRow, result: ValidationResult) -> None:
        if result.errors:
            errors = result.errors
            if result.more_errors:
                errors = [
                    *errors,
                    {
                        "code": "too_many_errors",
                        "message": f"{result.more_errors} more errors not listed",
                        "param": None,
                        "line": None,
                    },
                ]
            self.store.transition(b.id, "failed", ("validating",), errors=errors, total=result.total)
        else:
            self.store.transition(b.id, "in_progress", ("validating",), total=result.total, model=result.model)

    # -- running -------------------------------------------------------------------------

    async def _execute(self, b: BatchRow) -> None:
        run = self._runs[b.id]
        run.wake = asyncio.Event()
        if run.stop is not None:
            run.wake.set()
        journal_dir = self._jobs / b.id
        journal_dir.mkdir(parents=True, exist_ok=True)
        journal = Journal(journal_dir / "journal")
        inflight: set[asyncio.Task[None]] = set()
        limit = asyncio.Semaphore(self.engine.max_concurrency)
        checkpoint = asyncio.create_task(self._checkpoints(b.id, journal))
        try:
            async for n, raw in _aiter_lines(files_dir(self.config) / b.input_file_id):
                if run.stop is not None:
                    break
                if not raw.strip() or journal.is_done(n):
                    continue
                await limit.acquire()
                if run.stop is not None:
                    limit.release()
                    break
                task = asyncio.create_task(self._row(b.endpoint, n, raw, journal, limit))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
                # Let the row (and the API's requests) run before the next row is read: without
                # this, rows that need no I/O (echo) pile up as ready tasks by the hundred, and
                # every API request waits behind all of them.
                await asyncio.sleep(0)
            if inflight and run.stop is None:
                # Wait for the last rows, unless told to stop meanwhile.
                stopper = asyncio.create_task(run.wake.wait())
                everything = asyncio.gather(*inflight, return_exceptions=True)
                await asyncio.wait({stopper, everything}, return_when=asyncio.FIRST_COMPLETED)
                stopper.cancel()
            for task in list(inflight):  # rows cut off by cancellation or expiry
                task.cancel()
            if inflight:
                await asyncio.gather(*inflight, return_exceptions=True)
        finally:
            checkpoint.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checkpoint
            journal.close()
        self.store.set_progress(b.id, **journal.totals.columns())
        if run.stop == "cancel":
            outcome = "cancelled"
        elif run.stop == "expire":
            outcome = "expired"
        else:
            try:
                self.store.transition(b.id, "finalizing", ("in_progress",))
                outcome = "completed"
            except StateError:
                # Cancelled in the instant between the last row and this transition.
                outcome = "cancelled"
        await self._finish(b, outcome)

    async def _row(self, endpoint: str, n: int, raw: bytes, journal: Journal, limit: asyncio.Semaphore) -> None:
        try:
            custom_id: str | None = None
            try:
                obj = orjson.loads(raw)
                custom_id = obj["custom_id"]
                resp = await self.engine.handle(EngineRequest(endpoint, obj["body"], custom_id, len(raw)))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # an engine bug fails its row, never the batch
                log.exception("engine failed on line %d", n)
                resp = EngineResponse(500, error_body(f"engine error: {exc}", "server_error"))
            usage = resp.usage
            line = output_line(custom_id, resp)
            if usage is not None and resp.ok:
                journal.append(
                    n, True, line, usage.input_tokens, usage.output_tokens, usage.cached_tokens, usage.reasoning_tokens
                )
            else:
                journal.append(n, resp.ok, line)
            self.rows_done[(endpoint, resp.status_code)] += 1
        finally:
            limit.release()

    async def _checkpoints(self, batch_id: str, journal: Journal) -> None:
        """Writes the running counts to the store, so request_counts move while rows finish."""
        last = None
        while True:
            await asyncio.sleep(self.config.checkpoint_interval)
            cols = journal.totals.columns()
            if cols != last:
                self.store.set_progress(batch_id, **cols)
                last = cols

    # -- finishing -----------------------------------------------------------------------

    async def _finish(self, b: BatchRow, outcome: str) -> None:
        """Writes the output and error files from the journal and records the final status.

        Rows appear in input order. Rows that never ran (expired or cancelled batches) go to
        the error file with `batch_expired` / `batch_cancelled`. Files and status are recorded
        in one transaction, so a crash here just means doing it again on restart.
        """
        journal_path = self._jobs / b.id / "journal"
        out_id, err_id = new_id("file-"), new_id("file-")
        out_tmp, err_tmp = self._tmp / out_id, self._tmp / err_id
        unrun = _EXPIRED if outcome == "expired" else _CANCELLED
        total, counts = await asyncio.to_thread(
            _write_outputs, files_dir(self.config) / b.input_file_id, journal_path, out_tmp, err_tmp, unrun
        )
        now = int(time.time())
        expires = now + b.output_expires_after if b.output_expires_after else None
        new_files: list[FileRow] = []
        ids: dict[str, str | None] = {"output_file_id": None, "error_file_id": None}
        for key, fid, tmp, kind in (
            ("output_file_id", out_id, out_tmp, "output"),
            ("error_file_id", err_id, err_tmp, "error"),
        ):
            size = tmp.stat().st_size
            if size == 0:
                tmp.unlink()
                continue
            os.replace(tmp, files_dir(self.config) / fid)
            new_files.append(FileRow(fid, b.owner, f"batch_{b.id}_{kind}.jsonl", "batch_output", size, now, expires))
            ids[key] = fid
        from_ = {"completed": ("finalizing",), "expired": ("in_progress", "validating"), "cancelled": ("cancelling",)}
        try:
            self.store.transition(
                b.id, outcome, from_[outcome], new_files=new_files, **ids, **counts.columns(), total=total
            )
        except Exception:
            for f in new_files:
                (files_dir(self.config) / f.id).unlink(missing_ok=True)
            raise
        shutil.rmtree(self._jobs / b.id, ignore_errors=True)


def _write_outputs(
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
    finally:
        if records is not None:
            records.close()
    return total, counts


async def _aiter_lines(path: Path, batch: int = 512) -> AsyncIterator[tuple[int, bytes]]:
    """Lines of a file, read in the event loop but yielding control every `batch` lines."""
    count = 0
    for item in iter_lines(path):
        yield item
        count += 1
        if count % batch == 0:
            await asyncio.sleep(0)
