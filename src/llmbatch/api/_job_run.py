"""A run of a job in this process, in the calling thread or a worker thread, for `Job` and
`run_file`: it can be stopped (or stopped and cancelled) from any thread."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ..jobs import EXIT_INTERRUPTED, JobLock, JobRunner, JobSession, JobSettings, provider_started
from ._errors import python_names

__all__ = ["JobRun", "blocking", "loop_running"]

log = logging.getLogger("llmbatch.jobs")

T = TypeVar("T")


class JobRun:
    """One run of a job in this process, in the calling thread or a worker thread.

    It holds the job's lock from before it starts (the caller takes it) until it ends, and
    never raises: an error that stops it is left in `error` (or `interrupt`) for the caller;
    how the job stands afterwards is in its store.
    """

    def __init__(
        self,
        job_dir: Path,
        job_id: str,
        lock: JobLock,
        api_key: str | None,
        settings: JobSettings | None,
        *,
        new: bool = False,
    ) -> None:
        self.job_dir = job_dir
        #: Whether `run_file` created the job for this run: if it fails before sending anything,
        #: the job is not kept (`forgotten`), as with `llmbatch run`.
        self.new = new
        self.forgotten = False
        self.job_id = job_id
        self.lock = lock
        self.api_key = api_key
        self.settings = settings
        self.done = threading.Event()
        self.error: Exception | None = None
        self.interrupt: KeyboardInterrupt | None = None
        #: Remote batches cancelled by `stop(cancel=True)`; None until such a cancel ran.
        self.cancelled: int | None = None
        self._guard = threading.Lock()
        self._stopping = False
        self._cancelling = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[Any] | None = None
        #: What is true of the job's batches once the run stops (the provider's `after_interrupt`).
        self._after = "remote batches keep running"

    def __call__(self) -> None:
        session = JobSession(self.job_dir, api_key=self.api_key, say=self._say)
        try:
            self._run(session)
        except KeyboardInterrupt as exc:
            self._say(f"interrupted: {self._after}; resume() or `llmbatch resume` goes on")
            self.interrupt = exc
        except Exception as exc:
            log.debug("job %s: the run stopped", self.job_id, exc_info=True)
            self.error = python_names(exc)
        finally:
            self.lock.release()
            session.new = self.new
            if (self.error is not None or self.interrupt is not None) and session.forget_if_unused():
                self.forgotten = True
                self._say("not kept: nothing was sent")
            session.close()
            self.done.set()

    def stop(self, *, cancel: bool = False) -> None:
        """Stops the run (from any thread); with `cancel`, cancels the job's remote batches too."""
        with self._guard:
            self._stopping = True
            self._cancelling |= cancel
            if self._task is not None and self._loop is not None:
                self._loop.call_soon_threadsafe(self._task.cancel)

    def _run(self, session: JobSession) -> int:
        """Runs the job to its end; returns `llmbatch run`'s exit code."""
        prepared = session.prepare(self.settings, skip_hint="pass skip_invalid=True")
        self._after = prepared.provider.after_interrupt
        for line in prepared.estimate.summary_lines():
            self._say(line)
        return asyncio.run(self._main(session, session.runner(prepared)))

    async def _main(self, session: JobSession, runner: JobRunner) -> int:
        async with provider_started(runner.ctx.provider):
            task = asyncio.ensure_future(runner.run())
            with self._guard:
                self._loop, self._task = asyncio.get_running_loop(), task
                if self._stopping:
                    task.cancel()
            try:
                outcome = await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if not self._stopping or (current is not None and current.cancelling()):
                    raise  # Ctrl+C: asyncio.run cancelled this coroutine, not stop()
                if self._cancelling:
                    self.cancelled = await runner.cancel()
                    out, _err = session.export()
                    self._say(f"cancelled {self.cancelled} remote batches; results so far in {out}")
                else:
                    self._say(f"stopped: {self._after}; resume() or `llmbatch resume` goes on")
                return EXIT_INTERRUPTED
            finally:
                with self._guard:
                    self._task = None
            self._say(outcome.summary.replace("\n", "; "))
            return outcome.code

    def _say(self, message: str) -> None:
        log.info("job %s: %s", self.job_id, message)


def loop_running() -> bool:
    """Whether this thread runs an event loop (Jupyter does), where `asyncio.run` cannot run."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def blocking(fn: Callable[[], T]) -> T:
    """`fn()`, in a worker thread when this thread runs an event loop (it calls `asyncio.run`)."""
    if not loop_running():
        return fn()
    with cf.ThreadPoolExecutor(1, thread_name_prefix="llmbatch") as pool:
        return pool.submit(fn).result()
