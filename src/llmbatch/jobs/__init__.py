"""Durable batch jobs: `llmbatch run` and friends.

A job is identified by its inputs (path, size, modification time) and where it runs
(provider, base URL, engine), so running the same command again finds the same job and
resumes it. Its state lives in `JOB_ROOT/<job id>/job.sqlite`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import orjson

from .._exceptions import ConfigError, InputError
from .._paths import llmbatch_home
from ..providers import Provider, create_provider
from ._ingest import IngestReport, ingest
from ._runner import (
    EXIT_BUDGET,
    EXIT_FAILED_ROWS,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    JobRunner,
    RunOutcome,
    export,
)
from ._settings import JobSettings
from ._store import JobStore

__all__ = [
    "EXIT_BUDGET",
    "EXIT_FAILED_ROWS",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "IngestReport",
    "JobRunner",
    "JobSettings",
    "JobStore",
    "RunOutcome",
    "default_job_root",
    "export",
    "ingest",
    "find_job",
    "job_id_for",
    "list_jobs",
    "make_provider",
    "open_job",
]

_IDENTITY_SETTINGS = ("provider", "base_url", "engine", "model")


def default_job_root() -> Path:
    return llmbatch_home() / "jobs"


def _describe_inputs(inputs: list[Path]) -> list[dict[str, Any]]:
    described = []
    for p in inputs:
        try:
            st = p.stat()
        except OSError as exc:
            raise InputError(f"{p}: cannot read the input file: {exc.strerror or exc}") from exc
        if not p.is_file():
            raise InputError(f"{p}: not a file")
        described.append({"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return described


def job_id_for(inputs: list[dict[str, Any]], settings: JobSettings) -> str:
    """The job's id: the same inputs run the same way give the same id."""
    identity: list[Any] = [getattr(settings, k) for k in _IDENTITY_SETTINGS]
    if settings.engine_options:  # only when given, so jobs from before engine options keep their ids
        identity.append(settings.engine_options)
    key = orjson.dumps([inputs, identity], option=orjson.OPT_SORT_KEYS)
    return "job_" + hashlib.sha256(key).hexdigest()[:16]


def open_job(inputs: list[Path], settings: JobSettings, job_root: Path) -> tuple[JobStore, Path, bool]:
    """Opens the job for these inputs, creating it when new. Returns (store, job dir, created).

    An existing job keeps its stored settings; the caller records new ones (flags such as
    --max-cost may change between runs) once it holds the job's lock.
    """
    described = _describe_inputs(inputs)
    job_id = job_id_for(described, settings)
    job_dir = job_root / job_id
    job_dir.mkdir(parents=True, exist_ok=True)
    store = JobStore(job_dir / "job.sqlite")
    job = store.job()
    if job is None:
        store.create_job(job_id, described, settings.model_dump(mode="json"))
        return store, job_dir, True
    return store, job_dir, False


def find_job(job: str, job_root: Path) -> tuple[JobStore, Path]:
    """Opens an existing job by id (or its directory)."""
    job_dir = Path(job) if Path(job).is_dir() else job_root / job
    db = job_dir / "job.sqlite"
    if not db.exists():
        raise ConfigError(f"no job {job!r} under {job_root}: `llmbatch jobs` lists them")
    return JobStore(db), job_dir


def list_jobs(job_root: Path) -> list[dict[str, Any]]:
    """Every job under `job_root`, newest first, with row counts."""
    jobs = []
    if not job_root.is_dir():
        return jobs
    for d in job_root.iterdir():
        if not (d / "job.sqlite").exists():
            continue
        store = JobStore(d / "job.sqlite")
        try:
            job = store.job()
            if job is not None:
                jobs.append({**job, "counts": store.counts(), "dir": str(d)})
        finally:
            store.close()
    return sorted(jobs, key=lambda j: j["created_at"], reverse=True)


def make_provider(settings: JobSettings, job_dir: Path, api_key: str | None = None) -> Provider:
    """The provider a job runs on. Keys come from the argument, then the provider's environment variable."""
    options = {"api_version": settings.api_version} if settings.api_version else {}
    return create_provider(
        settings.provider, api_key=api_key, base_url=settings.base_url, job_dir=job_dir, engine=settings.engine,
        engine_config=settings.engine_options, **options,
    )  # fmt: skip
