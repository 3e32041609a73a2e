"""The job lock: one process runs a job at a time; a second would break at-most-once submission.

`filelock` takes an OS lock on `JOB_DIR/lock` (fcntl on POSIX, msvcrt on Windows) that the
OS drops when its process dies, so a job killed with SIGKILL is never left locked.
"""

from __future__ import annotations

from pathlib import Path

import filelock

from .._exceptions import DamagedJob, JobBusy

__all__ = ["JobLock", "lock_held"]

#: How long taking the lock keeps trying: long enough to outlast a `lock_held` probe.
_LOCK_PATIENCE = 0.25


class JobLock:
    """The lock of one job directory. A `with` block takes and releases it.

    The Python API takes it in the calling thread (so that "already running" is raised there)
    and releases it in the thread that ran the job, hence not thread-local.
    """

    def __init__(self, job_dir: Path) -> None:
        self.job_dir = job_dir
        self._lock = filelock.FileLock(job_dir / "lock", thread_local=False)

    def acquire(self) -> None:
        """Takes the lock, or raises JobBusy when another process (or Job) holds it."""
        if self._lock.is_locked:
            raise JobBusy(f"job {self.job_dir.name} is already running in this process")
        try:
            self._lock.acquire(timeout=_LOCK_PATIENCE, poll_interval=0.02)
        except filelock.Timeout:  # (a TimeoutError, so an OSError: caught first)
            name = self.job_dir.name
            raise JobBusy(
                f"job {name} is already running (in another process, or another client or run in this one); "
                f"`llmbatch wait {name}` waits for it"
            ) from None
        except OSError as exc:
            raise _unusable(self.job_dir, exc) from None

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release()

    def __enter__(self) -> JobLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_held(job_dir: Path) -> bool:
    """Whether some process (this one included) is running the job now.

    It can only be told by taking the lock for an instant; `JobLock.acquire` waits out such
    an instant, so a probe never makes a starting run fail.
    """
    if not job_dir.is_dir():
        return False  # a removed job (filelock would make its directory again for the probe)
    probe = filelock.FileLock(job_dir / "lock", thread_local=False)
    try:
        probe.acquire(timeout=0)
    except filelock.Timeout:
        return True
    except OSError as exc:
        raise _unusable(job_dir, exc) from None
    probe.release()
    return False


def _unusable(job_dir: Path, exc: OSError) -> DamagedJob:
    path = job_dir / "lock"
    what = "is a directory" if path.is_dir() else f"cannot be opened ({exc.strerror or exc})"
    return DamagedJob(
        f"job {job_dir.name}: its lock file {path} {what}; with no llmbatch process running the job, "
        f"remove it (`rm -r {path}`) and run again"
    )
