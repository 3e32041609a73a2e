"""What the jobs dashboard shows of a job, read from its store without ever writing it.

Each read opens the store read-only (`JobStore(read_only=True)`), takes every figure inside one
short read transaction (`JobStore.reading`), and closes it before anything is rendered: a job
that `llmbatch run` is writing is never blocked, and the figures agree with each other. The
figures are the store's own (`counts`, `totals`, `batches_by_state`, `estimated_cost`: what
`llmbatch status` prints); only their layout is computed here.
"""

from __future__ import annotations

import shlex
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._exceptions import LLMBatchError
from ..jobs import Chunk, JobStore, default_job_root, lock_held

__all__ = ["FAILURES_PAGE", "JobView", "commands_for", "job_dirs", "read_job"]

#: Failed rows on one page of a job's page.
FAILURES_PAGE = 50
#: Events listed on a job's page (the newest).
RECENT_EVENTS = 15


@dataclass
class JobView:
    """One job as the pages show it. `problem` is set (and the figures empty) when its store
    cannot be read: damaged, still being created, or of another llmbatch's schema."""

    id: str
    dir: Path
    created_at: float
    problem: str | None = None
    status: str = ""
    running: bool = False
    provider: str = ""
    base_url: str | None = None
    models: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    usage: dict[str, float] = field(default_factory=dict)
    cap: float | None = None
    estimate: float = 0.0
    batches: dict[str, int] = field(default_factory=dict)
    #: (when, succeeded, failed, cost) steps from the event log (`JobStore.finished_by_chunk`).
    steps: list[tuple[float, int, int, float]] = field(default_factory=list)
    run_started_at: float | None = None
    last_event_at: float | None = None
    # The job page's parts (read only for it).
    chunks: list[Chunk] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    more_failures: bool = False
    events: list[tuple[float, str, int | None, str]] = field(default_factory=list)
    commands: dict[str, str] = field(default_factory=dict)

    @property
    def state(self) -> str:
        """What the job is doing now: `running` while a process holds its lock; a job recorded as
        running (or reading its inputs) that no process holds was interrupted; else as stored."""
        if self.problem is not None:
            return "unreadable"
        if self.running:
            return "running"
        return "interrupted" if self.status in ("running", "ingesting") else self.status

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def succeeded(self) -> int:
        return self.counts.get("succeeded", 0)

    @property
    def failed(self) -> int:
        """Final failures, invalid rows included (as the progress line counts them)."""
        return self.counts.get("failed", 0) + self.counts.get("invalid", 0)

    @property
    def pending(self) -> int:
        return self.counts.get("pending", 0) + self.counts.get("queued", 0)

    @property
    def spent(self) -> float:
        return self.usage.get("cost", 0.0)

    @property
    def at_provider(self) -> int:
        """Rows the provider reports answered in batches not collected yet."""
        return sum(c.remote_completed + c.remote_failed for c in self.chunks if c.state == "submitted")

    @property
    def rows_per_second(self) -> float | None:
        """Rows finished per second since the current run started (None: not running, or none yet)."""
        if not self.running or self.run_started_at is None:
            return None
        before = sum(ok + bad for at, ok, bad, _ in self.steps if at <= self.run_started_at)
        since = self.succeeded + self.failed - before
        elapsed = time.time() - self.run_started_at
        return since / elapsed if since > 0 and elapsed > 0 else None

    @property
    def eta(self) -> float | None:
        """Seconds to go at `rows_per_second`; None when it cannot be told."""
        rate = self.rows_per_second
        return self.pending / rate if rate else None


def job_dirs(root: Path) -> list[Path]:
    """The job directories under `root` (those with a store), in no particular order."""
    if not root.is_dir():
        return []
    return [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and (d / "job.sqlite").is_file()]


def commands_for(job: str, root: Path) -> dict[str, str]:
    """The commands that act on the job, exactly as to type them (`--job-dir` where the root is
    not the default one)."""
    where = "" if root.resolve() == default_job_root().resolve() else f" --job-dir {shlex.quote(str(root))}"
    return {
        "resume": f"llmbatch resume {job}{where}",
        "status": f"llmbatch status {job}{where}",
        "cancel": f"llmbatch cancel {job}{where}",
        "export": f"llmbatch results {job}{where}",
    }


def read_job(job_dir: Path, *, detail: bool = False, failures_after: int = -1) -> JobView:
    """The job in `job_dir`: its summary, and with `detail` its batches, a page of its failed rows
    (those past row `failures_after`), its recent events and commands."""
    db = job_dir / "job.sqlite"
    view = JobView(id=job_dir.name, dir=job_dir, created_at=_mtime(db))
    try:
        running = (job_dir / "lock").exists() and lock_held(job_dir)
        store = JobStore(db, read_only=True)
    except (LLMBatchError, sqlite3.Error) as exc:
        view.problem = str(exc)
        return view
    try:
        with store.reading():
            job = store.job()
            if job is None:
                view.problem = "being created (no job record yet)"
                return view
            settings = job["settings"]
            view.created_at, view.status, view.running = job["created_at"], job["status"], running
            view.provider, view.base_url = settings.get("provider", ""), settings.get("base_url")
            view.cap = settings.get("max_cost")
            view.inputs = [Path(i["path"]).name for i in job["inputs"]]
            view.models = store.models()
            view.counts, view.usage = store.counts(), store.totals()
            view.estimate = store.estimated_cost()
            view.batches = store.batches_by_state()
            view.steps = store.finished_by_chunk()
            view.run_started_at = store.last_event_at("job", "job status running")
            view.last_event_at = store.last_event_at()
            view.chunks = store.chunks() if detail else store.chunks(("submitted",))
            if detail:
                failures = store.failures(failures_after, FAILURES_PAGE + 1)
                view.more_failures = len(failures) > FAILURES_PAGE
                names = [Path(i["path"]).name for i in job["inputs"]]
                view.failures = [
                    {"idx": idx, "where": f"{names[f]}:{line}" if 0 <= f < len(names) else f"call {line}",
                     "custom_id": cid, "state": state, "error": error or ""}
                    for idx, f, line, cid, state, error in failures[:FAILURES_PAGE]
                ]  # fmt: skip
                view.events = store.events(RECENT_EVENTS)[::-1]
                view.commands = commands_for(job_dir.name, job_dir.parent)
    except (LLMBatchError, sqlite3.Error) as exc:
        # A lock held past the busy timeout, a store damaged or replaced while read: said on the page.
        view.problem = f"could not be read just now: {exc}"
    finally:
        store.close()
    return view


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
