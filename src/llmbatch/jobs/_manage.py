"""The jobs under a job root: listing them, removing some, pruning old ones.

What `llmbatch jobs`, `jobs rm` and `jobs prune` do. Everything here reads the jobs' stores
and never calls a provider: removing a job whose batches still run at its provider is refused
unless forced, since only `llmbatch cancel` (which does call it) can stop them.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._exceptions import ConfigError, DamagedJob, JobBusy
from ..providers import RemoteStatus
from ._lock import lock_held
from ._store import JobStore

__all__ = ["Removed", "list_jobs", "prune_jobs", "remove_job"]

_TERMINAL = {s.value for s in RemoteStatus if s.terminal}
#: Stored statuses of a job a process was running; with no process holding its lock, it stopped.
_RUNNING = ("ingesting", "running")


@dataclass
class Removed:
    """A job removed (or, in a dry run, that would be)."""

    id: str
    dir: Path
    #: Why `prune` chose it: "finished" or "never sent".
    reason: str = ""
    #: Batches left running at the provider (`remove_job(force=True)`): their ids.
    left_running: list[str] = field(default_factory=list)


def _describe(store: JobStore, job: dict[str, Any], job_dir: Path) -> dict[str, Any]:
    """A job's record with what `jobs`, `rm` and `prune` look at."""
    running = lock_held(job_dir)
    state = job["status"]
    if state in _RUNNING and not running:
        state = "stopped"  # interrupted, killed or stopped by an error: `llmbatch resume` goes on
    elif running and state not in _RUNNING:
        state = "running"
    remote = []
    if job["settings"].get("provider") != "local":  # the local provider's batches run in the client only
        for ch in store.chunks(("creating", "submitted")):
            if (ch.remote_status or "") not in _TERMINAL:
                remote.append(ch.batch_id or f"{ch.tag} (being created)")
    return {
        **job,
        "state": state,
        "running": running,
        "counts": store.counts(),
        "dir": str(job_dir),
        "last_active": max(store.last_activity(), float(job["created_at"])),
        "sent": store.sent_anything(),
        "remote_running": remote,
    }


def list_jobs(job_root: Path) -> list[dict[str, Any]]:
    """Every job under `job_root`, newest first, with row counts and `state`: its stored status,
    or `running` while a process runs it, or `stopped` when the process running it went away.
    A job whose store cannot be read is listed too, with `damaged` saying why (and no counts)."""
    jobs: list[dict[str, Any]] = []
    if not job_root.is_dir():
        return jobs
    for d in job_root.iterdir():
        db = d / "job.sqlite"
        if not db.exists():
            continue
        try:
            store = JobStore(db)
            try:
                job = store.job()
                if job is not None:
                    jobs.append(_describe(store, job, d))
            finally:
                store.close()
        except DamagedJob as exc:
            jobs.append({"id": d.name, "created_at": int(db.stat().st_mtime), "dir": str(d), "damaged": str(exc)})
    return sorted(jobs, key=lambda j: j["created_at"], reverse=True)


def remove_job(job: str, job_root: Path, *, force: bool = False) -> Removed:
    """Deletes a job's directory (its store, chunk and result files); its results and errors
    files, next to its inputs, stay. Refuses while a process runs the job, and while batches
    of it may still run at its provider unless `force` (they are then left running: removing
    the job cannot stop them, and their results are never collected)."""
    job_dir = job_root / job
    if job in ("", ".", "..") or Path(job).name != job or not (job_dir / "job.sqlite").is_file():
        raise ConfigError(f"no job {job!r} under {job_root}: `llmbatch jobs` lists them")
    try:
        if lock_held(job_dir):
            raise JobBusy(f"job {job} is running; stop it (or `llmbatch cancel {job}`) before removing it")
        store = JobStore(job_dir / "job.sqlite")
        try:
            stored = store.job()
            described = _describe(store, stored, job_dir) if stored is not None else None
        finally:
            store.close()
    except DamagedJob:
        described = None  # a damaged store or lock file goes with the rest
    left = described["remote_running"] if described else []
    if left and not force:
        provider = described["settings"].get("provider") if described else "its provider"
        raise ConfigError(
            f"job {job} has {len(left)} batch{'es' if len(left) > 1 else ''} still running at {provider} "
            f"({', '.join(left)}): `llmbatch cancel {job}` stops them and keeps what they finished; "
            "--force removes the job anyway and leaves them running there (billed, results never collected)"
        )
    shutil.rmtree(job_dir)
    return Removed(job, job_dir, left_running=left)


def prune_jobs(job_root: Path, older_than: float, *, dry_run: bool = False, now: float | None = None) -> list[Removed]:
    """Removes the jobs idle for more than `older_than` seconds that are finished (every row
    final) or never sent anything; returns them, oldest activity first. Jobs running, stopped
    part-way, budget-stopped, cancelled or damaged are kept: they may still be resumed or
    looked at (`jobs rm` removes any of them)."""
    cutoff = (time.time() if now is None else now) - older_than
    chosen: list[tuple[float, Removed]] = []
    for j in list_jobs(job_root):
        if "damaged" in j or j["running"] or j["last_active"] > cutoff:
            continue
        reason = "finished" if j["status"] == "finished" else "never sent" if not j["sent"] else ""
        if reason:
            chosen.append((j["last_active"], Removed(j["id"], Path(j["dir"]), reason)))
    chosen.sort(key=lambda c: c[0])
    removed = []
    for _at, r in chosen:
        if not dry_run:
            try:
                remove_job(r.id, job_root)
            except (JobBusy, ConfigError):
                continue  # started (or removed) by another process since it was listed
        removed.append(r)
    return removed
