"""A full disk: telling it from other failures, and the backoff while waiting for space.

A full data dir shows up as OSError ENOSPC (or EDQUOT, over a quota) from a file write, as
`JournalWriteError` (an OSError with the same errno) from a batch's journal, and as SQLite's
SQLITE_FULL ("database or disk is full") from the metadata store. None of them is the caller's
fault or a bug: the server answers 507 insufficient_storage and batches wait for space.
"""

from __future__ import annotations

import errno
import shutil
import sqlite3
from pathlib import Path

__all__ = ["is_disk_full", "free_bytes", "Backoff"]

_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_disk_full(exc: BaseException | None) -> bool:
    """True when `exc`, or an exception it was raised from, says the disk (or quota) is full."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            return True
        if isinstance(exc, sqlite3.OperationalError) and (
            getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc)
        ):
            return True
        exc, seen = exc.__cause__, seen + 1
    return False


def free_bytes(path: Path) -> int:
    """Bytes free for us on `path`'s file system; -1 when it cannot be asked."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return -1


class Backoff:
    """Exponential delays per key: `first`, doubled on each failure in a row, at most `most`."""

    def __init__(self, first: float = 1.0, most: float = 60.0) -> None:
        self.first = first
        self.most = most
        self._delays: dict[str, float] = {}

    def fail(self, key: str) -> float:
        """Records one more failure of `key`; returns the seconds to wait before trying again."""
        last = self._delays.get(key)
        delay = self.first if last is None else min(last * 2, self.most)
        self._delays[key] = delay
        return delay

    def succeed(self, key: str) -> bool:
        """Forgets `key`'s failures; True if it had any."""
        return self._delays.pop(key, None) is not None
