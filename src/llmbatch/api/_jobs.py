"""Jobs from Python: `run_file` runs batch JSONL files as a durable job; `Job` is its handle.

    job = run_file("requests.jsonl", provider="openai", wait=False)
    job                                 # <Job job_...: running; 1,200/5,000 rows done ...>
    code = job.wait()                   # 0: all ok, 1: some rows failed, 3: the budget stopped it
    for record in job.results(): ...    # one OpenAI batch output record per input row, in order

These are the jobs of `llmbatch run`: the same inputs run the same way are the same job, kept
in the same place ($LLMBATCH_HOME/jobs), so the CLI and this API resume each other's jobs, and
`Job.attach(job_id)` opens one started anywhere. One process runs a job at a time (the job's
lock); any process may read it. A run here goes in the calling thread, or in a worker thread
when the caller asked not to wait or runs an event loop itself (Jupyter). What a run says goes
to the `llmbatch.jobs` logger (`logging.basicConfig(level="INFO")` shows it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import orjson
from pydantic import ValidationError

from .._exceptions import ConfigError, JobBusy, LLMBatchError
from ..jobs import (
    EXIT_BUDGET,
    EXIT_FAILED_ROWS,
    EXIT_INTERRUPTED,
    EXIT_OK,
    JobLock,
    JobSession,
    JobSettings,
    default_job_root,
    lock_held,
    output_lines,
    settings_for,
)
from ._errors import python_names
from ._job_run import JobRun, blocking, loop_running

__all__ = ["Job", "JobStatus", "run_file"]

log = logging.getLogger("llmbatch.jobs")

T = TypeVar("T")

#: Stored statuses a job ends in; any other, with no process running the job, reads "stopped".
_ENDED = ("finished", "budget_stopped", "cancelled")
#: Seconds between looks at a job that another process runs.
_POLL = 0.2


@dataclass(frozen=True)
class JobStatus:
    """Where a job stands, read from its store (`Job.status()`)."""

    id: str
    """The job's id (`job_` and 16 hex digits)."""
    state: str
    """`ingesting` (reading and checking its rows) or `running`, while a process runs it; else
    `finished` (every row is final), `budget_stopped` (`max_cost` held the rest back),
    `cancelled`, or `stopped` (interrupted, killed or stopped by an error: `resume()` goes on).
    A new job whose first run failed before sending anything (invalid rows, a missing key) is
    not kept: it reads `stopped` with no rows, and `error` says why."""
    succeeded: int
    """Rows answered successfully."""
    failed: int
    """Rows that failed for good (the provider refused them, or they ran out of attempts)."""
    invalid: int
    """Rows that failed validation and were never sent."""
    pending: int
    """Rows not final yet: waiting for a batch, or in one."""
    batches: dict[str, int]
    """Remote batches by state: a submitted batch under its provider status (`in_progress`,
    `finalizing`, ...), the others under the job's own (`planned`, `collected`, ...)."""
    input_tokens: int
    """Input tokens of the rows answered so far."""
    output_tokens: int
    """Output tokens of the rows answered so far."""
    cost: float
    """USD spent on the rows answered so far (0 on the local provider)."""
    estimated_cost: float
    """USD estimated, before sending, for every batch planned so far."""
    error: str | None = None
    """The error that stopped this process's last run of the job, if one did."""
    answered_remotely: int = 0
    """Rows of `pending` that batches still running have answered already, as their providers
    last reported (their results are collected when each batch ends)."""

    @property
    def total(self) -> int:
        """Every row of the job's inputs."""
        return self.succeeded + self.failed + self.invalid + self.pending

    @property
    def done(self) -> int:
        """Rows that are final: succeeded, failed or invalid."""
        return self.succeeded + self.failed + self.invalid

    @property
    def running(self) -> bool:
        """Whether a process (this one or another) is running the job now."""
        return self.state in ("ingesting", "running")


def run_file(
    inputs: str | os.PathLike[str] | list[str | os.PathLike[str]],
    *,
    provider: str | None = None,
    model: str | None = None,
    wait: bool = True,
    job_dir: str | os.PathLike[str] | None = None,
    api_key: str | None = None,
    **settings: Any,
) -> Job:
    """Runs OpenAI-format batch JSONL files as one durable job, like `llmbatch run`; returns its handle.

    The same files run the same way (provider, base URL, engine, model) are the same job: a
    job interrupted, budget-stopped or cancelled, here or by the CLI, is resumed, not started
    again, and rows already answered are never sent twice. Results also go to the output file
    (`INPUTS.results.jsonl` next to the first input unless `output=` says otherwise), as with
    the CLI.

    inputs: a JSONL file of batch rows (`custom_id`, `method`, `url`, `body`), or a list of them.
    provider: where the batches run (a name from `llmbatch.providers.PROVIDER_NAMES`); default:
        a `provider/` prefix on `model` or on the first row's model, else `local` (an
        in-process llmbatch server).
    model: send every row with this model (an Azure deployment name, or one model for a file).
    wait: True runs the job to its end before returning (in a worker thread when this thread
        runs an event loop, as in Jupyter); False starts it in a background thread and returns
        at once (`wait()` waits for it). The run is stopped when the process exits; the job
        stays resumable.
    job_dir: where jobs live (the CLI's `--job-dir`; default `$LLMBATCH_HOME/jobs`).
    api_key: the provider's key (default: its environment variable, e.g. `OPENAI_API_KEY`);
        never stored with the job.
    settings: any other `llmbatch.jobs.JobSettings` field, as `llmbatch run`'s flags set them:
        `base_url`, `batch_size`, `max_in_flight`, `max_cost`, `max_attempts`, `skip_invalid`,
        `direct_below`, `price_file`, `output`, `poll_interval`, ... They are stored with the
        job; running it again with new ones (a larger `max_cost`) uses those.

    Raises InputError for an input that cannot be read or has invalid rows (each named by
    file and line, as the CLI prints them; `skip_invalid=True` runs the valid ones),
    ConfigError for bad settings, a missing key, or a job another process is running, and
    ProviderError when the provider refuses the job for good. With `wait=False` only the
    first of these come from here: the others come from `wait()`.
    """
    paths = _input_paths(inputs)
    job_settings = _settings(paths, provider, model, settings)
    root = Path(job_dir) if job_dir is not None else default_job_root()
    try:
        session, created = JobSession.open(paths, job_settings, root, api_key=api_key)
    except LLMBatchError as exc:
        raise python_names(exc) from None
    session.close()
    log.info("%s job %s (%s)", "new" if created else "resuming", session.id, session.dir)
    job = Job(session.dir, api_key=api_key)
    job._start(job_settings, api_key, wait=wait, new=created)
    return job


class Job:
    """The handle of one durable job: its state, its results, and runs of it in this process.

    Get one from `run_file` (which runs the job) or `Job.attach` (which opens a job started
    anywhere, read-only until `resume()` or `cancel()`). Every read goes to the job's store,
    so a handle sees what any process running the job has done.
    """

    def __init__(self, path: str | os.PathLike[str], *, api_key: str | None = None) -> None:
        """Opens the job in `path`, its own directory (holding `job.sqlite`); `Job.attach` finds it by id."""
        self._dir = Path(path)
        self._api_key = api_key
        self._run: JobRun | None = None
        with self._session() as session:
            job, _settings = session.stored()
        self._id: str = job["id"]

    @classmethod
    def attach(cls, job_id: str, job_dir: str | os.PathLike[str] | None = None, *, api_key: str | None = None) -> Job:
        """Opens a job started elsewhere (by `llmbatch run`, or another process) by its id.

        job_id: the id `llmbatch jobs` lists (or the job's own directory).
        job_dir: where jobs live (the CLI's `--job-dir`; default `$LLMBATCH_HOME/jobs`).
        api_key: the provider's key, for `resume()` and `cancel()` (default: its environment variable).

        Attaching changes nothing: `status()`, `wait()` and `results()` read the job while
        whichever process runs it goes on; `resume()` runs it here. Raises ConfigError when
        there is no such job.
        """
        session = JobSession.find(job_id, Path(job_dir) if job_dir is not None else default_job_root())
        session.close()
        return cls(session.dir, api_key=api_key)

    @property
    def id(self) -> str:
        """The job's id, as `llmbatch jobs` lists it and `llmbatch resume ID` takes it."""
        return self._id

    @property
    def dir(self) -> Path:
        """The job's own directory (its store `job.sqlite`, chunk files and downloaded results)."""
        return self._dir

    # -- reading -------------------------------------------------------------------------

    def status(self) -> JobStatus:
        """Rows by state, remote batches by state, tokens and cost, now."""
        run = self._run
        if run is not None and run.forgotten:
            # Refused before it sent anything (invalid rows, a missing key): not kept, no rows.
            return JobStatus(self._id, "stopped", 0, 0, 0, 0, {}, 0, 0, 0.0, 0.0, str(run.error or run.interrupt))
        with self._session() as session:
            job, _settings = session.stored()
            store = session.store
            counts = store.counts()
            totals = store.totals()
            batches = store.batches_by_state()
            estimated = store.estimated_cost()
            answered_remotely, _failed = store.answered_in_running_batches()
        run = self._run
        running = (run is not None and not run.done.is_set()) or lock_held(self._dir)
        stored = job["status"]
        if running:
            state = "ingesting" if stored == "ingesting" else "running"
        else:
            state = stored if stored in _ENDED else "stopped"
        return JobStatus(
            id=self._id,
            state=state,
            succeeded=counts["succeeded"],
            failed=counts["failed"],
            invalid=counts["invalid"],
            pending=counts["pending"] + counts["queued"],
            batches=batches,
            input_tokens=int(totals["input_tokens"]),
            output_tokens=int(totals["output_tokens"]),
            cost=float(totals["cost"]),
            estimated_cost=estimated,
            error=str(error) if (error := self._run_error(stored)) is not None else None,
            answered_remotely=answered_remotely,
        )

    @property
    def progress(self) -> str:
        """One line on where the job stands: state, rows done, batches in flight, spend."""
        s = self.status()
        batches = ", ".join(f"{n} {state}" for state, n in sorted(s.batches.items())) or "none"
        return (
            f"{s.state}; {s.done:,}/{s.total:,} rows done ({s.failed + s.invalid:,} failed"
            + (f"; {s.answered_remotely:,} more answered in batches still running" if s.answered_remotely else "")
            + "); "
            f"batches: {batches}; spent ${s.cost:.4f} of est. ${s.estimated_cost:.4f}"
        )

    def __repr__(self) -> str:
        try:
            return f"<Job {self._id}: {self.progress}>"
        except (LLMBatchError, OSError, sqlite3.Error) as exc:  # its directory went away, or its store is unreadable
            return f"<Job {self._id} ({self._dir}): unreadable: {exc}>"

    def wait(self, timeout: float | None = None) -> int:
        """Waits for the run of the job in progress (here or in another process) to end.

        Returns `llmbatch run`'s exit code: 0 every row succeeded, 1 some rows failed (see
        `errors()`), 3 the budget (`max_cost`) stopped the job before every row ran, 130 the
        job stopped before its end (interrupted, cancelled, or run by no one: `resume()` goes
        on). Returns at once when no process runs the job. Raises the error that stopped this
        process's last run of the job, if one did (and the job has not ended since), and
        TimeoutError when `timeout` seconds pass first.
        """
        if not self._wait_done(timeout):
            raise TimeoutError(f"job {self._id} is still running after {timeout} s")
        run = self._run
        if run is not None and run.forgotten:
            if run.error is not None:
                raise run.error
            return EXIT_INTERRUPTED
        with self._session() as session:
            job, _settings = session.stored()
            counts = session.store.counts()
        error = self._run_error(job["status"])
        if error is not None:
            raise error
        if job["status"] == "finished":
            return EXIT_FAILED_ROWS if counts["failed"] + counts["invalid"] else EXIT_OK
        if job["status"] == "budget_stopped":
            return EXIT_BUDGET
        return EXIT_INTERRUPTED

    def results(self, *, wait: bool = True) -> Iterator[dict[str, Any]]:
        """The output records, one per input row, in input order, read from the job's store.

        Each is an OpenAI batch output record (`id`, `custom_id`, `response`, `error`; `id` the
        provider's line id, else one derived from the job and the row, the same on every read): the
        provider's answer for rows that ran, an `error` record for rows that failed, and one
        with code `not_run` for rows the job never ran (it was stopped, or the budget held
        them back). They are the lines `llmbatch run` writes to its results file.

        wait: first wait for a run in progress (here or elsewhere) to end, without raising its
        error (`wait()` does); False reads the rows as they are now (while the job is still
        `ingesting`, the rows not read yet are missing).
        """
        if wait:
            self._wait_done(None)
        return self._records(None)

    def errors(self, *, wait: bool = True) -> Iterator[dict[str, Any]]:
        """The final failures, in input order: the records of failed and invalid rows (an
        invalid row's message names its file and line). They are the lines of the errors file.

        wait: as for `results()`.
        """
        if wait:
            self._wait_done(None)
        return self._records(("failed", "invalid"))

    def export(self, path: str | os.PathLike[str] | None = None) -> tuple[Path, Path | None]:
        """Writes the results file again from the store, as `llmbatch results` does, and returns
        (results file, errors file or None when no row failed).

        path: where the results go (default: the job's output file, `INPUTS.results.jsonl`);
        the errors file goes next to it (`NAME.errors.jsonl`). Exports the rows as they are
        now, without waiting for a run in progress.
        """
        with self._session() as session:
            out, err = session.export(Path(path) if path is not None else None)
        return out, err if err.exists() else None

    # -- running -------------------------------------------------------------------------

    def resume(self, *, wait: bool = True, api_key: str | None = None) -> Job:
        """Runs the job here, with its stored settings, from where it stands; returns this handle.

        As `llmbatch resume ID`: rows already final are kept, remote batches in flight are
        collected, and the rest is sent. wait: as for `run_file`. api_key: the provider's key
        (default: the one given to `attach`, else the provider's environment variable). Raises
        ConfigError when a process (this one included) runs the job already. To change
        settings (a larger `max_cost`), call `run_file` again with the same inputs instead.
        """
        self._start(None, api_key or self._api_key, wait=wait)
        return self

    def cancel(self, *, api_key: str | None = None) -> int:
        """Cancels the job's remote batches, as `llmbatch cancel` does; returns how many.

        A run of the job in this process is stopped first. Rows the batches finished before the
        cancel are kept (and exported); the others stay pending, and `resume()` (or `llmbatch
        resume`) runs them without counting the cut-off attempt. Raises ConfigError when
        another process runs the job (stop it there, or cancel there).
        """
        run = self._run
        if run is not None and not run.done.is_set():
            run.stop(cancel=True)
            run.done.wait()
            if run.cancelled is not None:
                return run.cancelled
        key = api_key or self._api_key
        with JobLock(self._dir):
            return blocking(lambda: self._cancel_batches(key))

    def _cancel_batches(self, api_key: str | None) -> int:
        with self._session(api_key) as session:
            n = asyncio.run(session.cancel())
            out, _err = session.export()
        self._say(f"cancelled {n} remote batches; results so far in {out}")
        return n

    def _start(self, settings: JobSettings | None, api_key: str | None, *, wait: bool, new: bool = False) -> None:
        """Runs the job (recording `settings` first, when given) under its lock; `new`: the
        job was created for this run (it is not kept if the run fails before sending anything)."""
        if self._run is not None and not self._run.done.is_set():
            raise JobBusy(f"job {self._id} is already running in this process; wait() waits for it")
        lock = JobLock(self._dir)
        lock.acquire()  # here, so that "already running" is raised to the caller whether or not it waits
        run = self._run = JobRun(self._dir, self._id, lock, api_key, settings, new=new)
        if wait and not loop_running():
            run()
        else:
            thread = threading.Thread(target=run, name=f"llmbatch-{self._id}", daemon=True)
            try:
                thread.start()
            except BaseException:
                lock.release()
                raise
            if not wait:
                return
            try:
                run.done.wait()
            except KeyboardInterrupt:  # Jupyter's "interrupt the kernel": stop the run, as Ctrl+C would
                run.stop()
                run.done.wait()
                raise
        if run.interrupt is not None:
            raise run.interrupt
        if run.error is not None:
            raise run.error

    # -- helpers -------------------------------------------------------------------------

    def _session(self, api_key: str | None = None) -> JobSession:
        """A session of its own on the job (a run's store connection belongs to its thread)."""
        return JobSession(self._dir, api_key=api_key, say=self._say)

    def _wait_done(self, timeout: float | None) -> bool:
        """Waits until no process runs the job; False when `timeout` passed first."""
        run = self._run
        if run is not None and not run.done.wait(timeout):
            return False
        deadline = None if timeout is None else time.monotonic() + timeout
        while lock_held(self._dir):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            time.sleep(_POLL if left is None else min(_POLL, left))
        return True

    def _run_error(self, stored_status: str) -> Exception | None:
        """The error that stopped this process's last run, unless the job ended since (elsewhere)."""
        run = self._run
        if run is None or run.error is None or stored_status in _ENDED:
            return None
        return run.error

    def _records(self, states: Collection[str] | None) -> Iterator[dict[str, Any]]:
        with self._session() as session:
            settings = session.stored()[1]
            by = settings.answered_by if settings.fallbacks else None  # which provider answered, as files say
            for state, line in output_lines(session.store, session.inputs(), answered_by=by):
                if states is None or state in states:
                    yield orjson.loads(line)

    def _say(self, message: str) -> None:
        log.info("job %s: %s", self._id, message)


def _input_paths(inputs: Any) -> list[Path]:
    items = list(inputs) if isinstance(inputs, list | tuple) else [inputs]
    if not items:
        raise ConfigError("run_file needs at least one input file")
    for item in items:
        if not isinstance(item, str | os.PathLike):
            raise TypeError(f"run_file takes paths of JSONL files, not {type(item).__name__}")
    return [Path(item) for item in items]


def _settings(paths: list[Path], provider: str | None, model: str | None, settings: dict[str, Any]) -> JobSettings:
    """The job's settings, as `llmbatch run` makes them from its flags; unknown names are refused."""
    unknown = sorted(set(settings) - set(JobSettings.model_fields))
    if unknown:
        raise ConfigError(
            f"unknown setting {', '.join(unknown)}: run_file takes these: {', '.join(JobSettings.model_fields)}"
        )
    try:
        return settings_for(paths, provider=provider, model=model, **settings)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid settings: {problems}") from None
