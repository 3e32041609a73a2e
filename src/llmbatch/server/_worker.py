"""The batch worker: validates, runs and finalizes batches, and resumes them after a crash.

One supervisor task looks at the store (on a tick, or when woken) and starts what each batch
needs next:

    validating  -> validate the input file (in a thread) -> in_progress | failed
    in_progress -> run the rows, journaling each -> finalizing -> completed
                   (or, when the window passes, expired; when cancelled, cancelling -> cancelled)
    finalizing / cancelling with no task (after a restart) -> finish the job

Which batches validate and execute, and whose row gets the engine's next free slot, is decided
fairly between owners (API keys) by `_fair`: one owner's backlog does not hold up another's.

Everything a batch has done lives in the store and in its journal, so the supervisor needs
no memory of its own to resume after kill -9: it simply starts what the store says is owed.

A batch whose task fails (a full disk above all: a row's result cannot be journaled, the output
files cannot be written, SQLite is full) keeps its status and is started again after a backoff
(1 s, doubling to 60 s), with one log line per try: paused, never cancelled or relaunched on
every tick. Rows that were not journaled run again, so every row ends up in the output or error
file exactly once.
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
from typing import Any

import orjson

from .._exceptions import StateError
from ..engines import Engine, EngineRequest, EngineResponse, error_body
from ._config import ServerConfig
from ._disk import Backoff, free_bytes, is_disk_full
from ._eta import OutputBudget, estimate_line
from ._fair import EngineSlots, Share, admit
from ._history import ProgressHistory
from ._ids import new_id
from ._journal import Journal
from ._metrics import EngineMeter
from ._outputs import CANCELLED, EXPIRED, fsync_dir, write_outputs
from ._store import BatchRow, FileRow, Store
from ._validate import ValidationResult, iter_lines, validate_input

__all__ = ["BatchWorker", "output_line", "files_dir"]

log = logging.getLogger("llmbatch.server")
#: Endpoints whose rows generate tokens (the estimate of a batch's time is about those).
_GENERATING = ("/v1/chat/completions", "/v1/completions", "/v1/responses")

#: The statuses a batch can be finished from, by outcome.
_FINISHED_FROM = {"completed": ("finalizing",), "expired": ("in_progress", "validating"), "cancelled": ("cancelling",)}


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


@dataclass
class _Run:
    """A batch the worker is busy with: its task, and why it should stop early, if it should."""

    task: asyncio.Task[None]
    owner: str
    #: True while the batch's rows are being executed (what --max-active-batches bounds).
    executing: bool = False
    validating: bool = False
    stop: str | None = None  # "cancel" or "expire"
    wake: asyncio.Event | None = None
    #: Why a row's result could not be journaled: the batch pauses (see BatchWorker._launch).
    failure: OSError | None = None

    share: Share | None = None  # its place in the engine's row budget, while executing
    #: What its rows may generate (from validation; None after a restart) and whether its
    #: estimated time was said in the log.
    budget: OutputBudget | None = None
    eta_said: bool = False

    def halt(self, why: str, slots: EngineSlots) -> None:
        """Tells the batch to stop: its loop ends now, even while it waits for an engine slot."""
        self.stop = why
        if self.wake is not None:
            self.wake.set()
        if self.share is not None:
            slots.withdraw(self.share)


class _Retry:
    """When a batch whose task failed may be started again, and in which status it was started
    (a batch cancelled meanwhile is finished at once)."""

    __slots__ = ("at", "status")

    def __init__(self, at: float, status: str) -> None:
        self.at = at
        self.status = status


class BatchWorker:
    """Runs every batch the store says is owed work, with one engine."""

    def __init__(
        self,
        config: ServerConfig,
        store: Store,
        engine: Engine,
        meter: EngineMeter | None = None,
        history: ProgressHistory | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.engine = engine
        self.meter = meter or EngineMeter()
        #: Running batches' counts over time, as they are checkpointed (the dashboard's chart).
        self.history = history or ProgressHistory()
        self._runs: dict[str, _Run] = {}
        # Rows in flight, for all batches together: the engine's concurrency, shared fairly.
        self._slots = EngineSlots(engine.max_concurrency, config.scheduling, config.owner_weights())
        self._wake = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._tmp = config.data_dir / "tmp"
        self._jobs = config.data_dir / "batches"
        self._backoff = Backoff()
        self._retry: dict[str, _Retry] = {}
        self._tick_backoff = Backoff()
        #: time.time() of the last write that failed for a full disk, until one succeeds.
        self.disk_full_since: float | None = None

    def note_disk_full(self, full: bool) -> None:
        """Records that a write failed for lack of space (True) or that one succeeded (False)."""
        if not full:
            self.disk_full_since = None
        elif self.disk_full_since is None:
            self.disk_full_since = time.time()

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
            run.halt("cancel", self._slots)
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
            pause = 0.5
            try:
                self._tick()
                self._tick_backoff.succeed("tick")
            except Exception as exc:  # a bug or a full disk here must not stop every batch for good
                pause = self._tick_backoff.fail("tick")
                if is_disk_full(exc):
                    self.note_disk_full(True)
                    log.warning("batch supervisor: disk full in %s (%s); retrying in %g s", self._where(), exc, pause)
                else:
                    log.exception("batch supervisor tick failed; retrying in %g s", pause)
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=pause)

    def _where(self) -> str:
        return f"{self.config.data_dir} ({free_bytes(self.config.data_dir)} bytes free)"

    def _tick(self) -> None:
        now = int(time.time())
        running = Counter(r.owner for r in self._runs.values() if r.executing and r.stop is None)
        validating = Counter(r.owner for r in self._runs.values() if r.validating)
        to_validate: list[BatchRow] = []
        waiting: list[BatchRow] = []
        active = self.store.batches_in(("validating", "in_progress", "finalizing", "cancelling"))
        for b in active:
            run = self._runs.get(b.id)
            retry = self._retry.get(b.id)
            if run is None and retry is not None:
                cancelled = b.status == "cancelling" and retry.status != "cancelling"
                if time.monotonic() < retry.at and not cancelled:
                    continue  # failed lately (a full disk?): waiting out its backoff
                del self._retry[b.id]  # its time came, or it was cancelled meanwhile: go on at once
                log.info("batch %s: trying again (%s)", b.id, b.status)
            expired = b.expires_at is not None and now >= b.expires_at and b.status in ("validating", "in_progress")
            if run is not None:
                if expired and run.stop is None:
                    run.halt("expire", self._slots)
                continue
            if b.status == "validating" and not expired:
                to_validate.append(b)
            elif b.status == "in_progress" and not expired:
                waiting.append(b)
            elif b.status == "in_progress":  # expired while waiting to run: finish without running
                self._launch(b, self._execute(b), stop="expire", executing=True)
            elif expired:  # validating past its window: nothing ran
                self._launch(b, self._finish(b, "expired"))
            elif b.status == "finalizing":
                self._launch(b, self._finish(b, "completed"))
            elif b.status == "cancelling":
                self._launch(b, self._finish(b, "cancelled"))
        if self.config.scheduling == "fair":
            # One validation per owner at a time (its oldest first): validations share a few
            # threads and the GIL, so a key that uploads a dozen files at once would otherwise
            # hold up another key's one-line batch for as long as they all take.
            to_validate = admit(to_validate, validating, limit=0)
        for b in to_validate:
            self._launch(b, self._validate(b), validating=True)
        for b in admit(waiting, running, self.config.max_active_batches, self.config.scheduling):
            self._launch(b, self._execute(b), executing=True)
        for batch_id in self._retry.keys() - {b.id for b in active}:  # ended meanwhile
            del self._retry[batch_id]
            self._backoff.succeed(batch_id)
        for file_id in self.store.expired_files(now):
            self._delete_file(file_id)

    def _launch(
        self,
        b: BatchRow,
        coro: Coroutine[Any, Any, None],
        stop: str | None = None,
        executing: bool = False,
        validating: bool = False,
    ) -> None:
        task = asyncio.create_task(coro, name=f"batch-{b.id}")
        self._runs[b.id] = _Run(task, b.owner, executing=executing, validating=validating, stop=stop)

        def done(t: asyncio.Task[None], batch_id: str = b.id, status: str = b.status) -> None:
            self._runs.pop(batch_id, None)
            exc = None if t.cancelled() else t.exception()
            if exc is None:
                self._backoff.succeed(batch_id)
            else:
                # Not again at the next tick: that was a busy loop of tracebacks on a full disk.
                delay = self._backoff.fail(batch_id)
                self._retry[batch_id] = _Retry(time.monotonic() + delay, status)
                if is_disk_full(exc):
                    self.note_disk_full(True)
                    log.warning("batch %s: disk full in %s; pausing, retrying in %g s", batch_id, self._where(), delay)
                elif isinstance(exc, OSError):  # the file system failed otherwise: its message says it all
                    log.error("batch %s: %s; pausing, retrying in %g s", batch_id, exc, delay)
                else:
                    log.error("batch %s: worker task failed; retrying in %g s", batch_id, delay, exc_info=exc)
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
            run = self._runs.get(b.id)
            if run is not None and b.endpoint in _GENERATING:
                run.budget = result.output
                self._say_eta(b.id, run, result.total)

    def _say_eta(self, batch_id: str, run: _Run, rows_left: int) -> None:
        """Logs once how long the batch's rows will take, when a rate is known and it is long."""
        if run.budget is None or run.eta_said:
            return
        line = estimate_line(batch_id, run.budget, rows_left, self.meter.throughput["batch"])
        if line is not None:
            log.info(line)
            run.eta_said = True
        elif self.meter.throughput["batch"].tokens_per_second() is not None:
            run.eta_said = True  # measured, and short: nothing to say, now or later

    # -- running -------------------------------------------------------------------------

    async def _execute(self, b: BatchRow) -> None:
        run = self._runs[b.id]
        run.wake = asyncio.Event()
        if run.stop is not None:
            run.wake.set()
        journal_dir = self._jobs / b.id
        journal_dir.mkdir(parents=True, exist_ok=True)
        journal = Journal(journal_dir / "journal")
        done_before = journal.totals.completed + journal.totals.failed
        inflight: set[asyncio.Task[None]] = set()
        slots = self._slots
        share = run.share = slots.join(b.owner)
        checkpoint = asyncio.create_task(self._checkpoints(b.id, journal))
        try:
            async for n, raw in _aiter_lines(files_dir(self.config) / b.input_file_id):
                if run.stop is not None or run.failure is not None:
                    break
                if not raw.strip() or journal.is_done(n):
                    continue
                if not await slots.acquire(share):  # withdrawn: cancelled or expired
                    break
                if run.stop is not None or run.failure is not None:
                    slots.release(share)
                    break
                task = asyncio.create_task(self._row(run, b.endpoint, n, raw, journal, share))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
                # Let the row (and the API's requests) run before the next row is read: without
                # this, rows that need no I/O (echo) pile up as ready tasks by the hundred, and
                # every API request waits behind all of them.
                await asyncio.sleep(0)
            if inflight and run.stop is None and run.failure is None:
                # Wait for the last rows, unless told to stop (or a row could not be journaled) meanwhile.
                stopper = asyncio.create_task(run.wake.wait())
                everything = asyncio.gather(*inflight, return_exceptions=True)
                await asyncio.wait({stopper, everything}, return_when=asyncio.FIRST_COMPLETED)
                stopper.cancel()
            for task in list(inflight):  # rows cut off by cancellation, expiry or a failed journal write
                task.cancel()
            if inflight:
                await asyncio.gather(*inflight, return_exceptions=True)
            if run.failure is None:
                # Before the batch moves on (finalizing reads the journal), its records must
                # survive a power loss: the one fsync of the run, in a thread.
                await asyncio.to_thread(journal.sync)
        finally:
            slots.leave(share)
            run.share = None
            checkpoint.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checkpoint
            journal.close()
        if journal.totals.completed + journal.totals.failed > done_before:
            self._backoff.succeed(b.id)  # rows were recorded: a later failure starts the backoff again
        if run.failure is not None and run.stop is None:
            # Paused: the rows not journaled run again when the supervisor retries (after a backoff).
            with contextlib.suppress(Exception):
                self.store.set_progress(b.id, **journal.totals.columns())
            raise run.failure
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

    async def _row(self, run: _Run, endpoint: str, n: int, raw: bytes, journal: Journal, share: Share) -> None:
        try:
            custom_id: str | None = None
            try:
                obj = orjson.loads(raw)
                custom_id = obj["custom_id"]
                request = EngineRequest(endpoint, obj["body"], custom_id, len(raw))
                resp = await self.meter.handle(self.engine, "batch", request)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # an engine bug fails its row, never the batch
                log.exception("engine failed on line %d", n)
                resp = EngineResponse(500, error_body(f"engine error: {exc}", "server_error"))
            usage = resp.usage
            line = output_line(custom_id, resp)
            try:
                if usage is not None and resp.ok:
                    journal.append(
                        n, True, line, usage.input_tokens, usage.output_tokens, usage.cached_tokens,
                        usage.reasoning_tokens,
                    )  # fmt: skip
                else:
                    journal.append(n, resp.ok, line)
            except OSError as exc:  # not recorded (the journal cut it off again): the row runs again later
                if run.failure is None:
                    run.failure = exc
                    if run.wake is not None:
                        run.wake.set()
                return
            if self.disk_full_since is not None:
                self.note_disk_full(False)
        finally:
            self._slots.release(share)

    async def _checkpoints(self, batch_id: str, journal: Journal) -> None:
        """Writes the running counts to the store, so request_counts move while rows finish; says
        the batch's estimated time once the engine's rate is measured, if validation could not."""
        last = None
        while True:
            await asyncio.sleep(self.config.checkpoint_interval)
            run = self._runs.get(batch_id)
            if run is not None and run.budget is not None and not run.eta_said:
                self._say_eta(batch_id, run, run.budget.rows - journal.totals.completed - journal.totals.failed)
            cols = journal.totals.columns()
            if cols != last:
                self.history.record(batch_id, cols["completed"], cols["failed"])
                try:
                    self.store.set_progress(batch_id, **cols)
                except Exception as exc:
                    if not is_disk_full(exc):
                        raise
                    continue  # only the shown counts lag; the journal has them
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
        unrun = EXPIRED if outcome == "expired" else CANCELLED
        new_files: list[FileRow] = []
        try:
            total, counts = await asyncio.to_thread(
                write_outputs, files_dir(self.config) / b.input_file_id, journal_path, out_tmp, err_tmp, unrun
            )
            now = int(time.time())
            expires = now + b.output_expires_after if b.output_expires_after else None
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
                new_files.append(
                    FileRow(fid, b.owner, f"batch_{b.id}_{kind}.jsonl", "batch_output", size, now, expires)
                )
                ids[key] = fid
            if new_files:
                await asyncio.to_thread(fsync_dir, files_dir(self.config))  # their new names, too
            self.store.transition(
                b.id, outcome, _FINISHED_FROM[outcome], new_files=new_files, **ids, **counts.columns(), total=total
            )
        except BaseException:
            # A full disk, most likely: leave nothing half-written; the batch keeps its status and
            # the supervisor finishes it again after a backoff.
            for path in (out_tmp, err_tmp, *(files_dir(self.config) / f.id for f in new_files)):
                path.unlink(missing_ok=True)
            raise
        self.note_disk_full(False)
        shutil.rmtree(self._jobs / b.id, ignore_errors=True)


async def _aiter_lines(path: Path, batch: int = 512) -> AsyncIterator[tuple[int, bytes]]:
    """Lines of a file, read in the event loop but yielding control every `batch` lines."""
    count = 0
    for item in iter_lines(path):
        yield item
        count += 1
        if count % batch == 0:
            await asyncio.sleep(0)
