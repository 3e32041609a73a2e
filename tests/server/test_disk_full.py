"""A full disk (ENOSPC) never tears or loses a result line: the journal rolls a failed append
back, a batch pauses with one clear log line and backoff and finishes once space returns, and an
upload gets 507 insufficient_storage.

Three levels: the journal with a writer that fails after N bytes (the OS call is the seam); a
real server in this process over HTTP with `os.write` failing ENOSPC on files of its data dir for
a while; and a real server process whose data dir is a 2 MiB tmpfs (a user+mount namespace;
skipped where the kernel does not allow one) that is filled and then freed.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from llmbatch.server._journal import Journal, JournalWriteError


class FailingWriter:
    """`os.write` that writes at most `budget` more bytes, then fails (ENOSPC unless told)."""

    def __init__(self, budget: int | None = None, err: int = errno.ENOSPC) -> None:
        self.budget = budget
        self.err = err
        self.calls = 0

    def __call__(self, fd: int, data: bytes) -> int:
        self.calls += 1
        if self.budget is None:
            return os.write(fd, data)
        if self.budget <= 0:
            raise OSError(self.err, os.strerror(self.err))
        n = os.write(fd, bytes(data[: self.budget]))  # a short write, like a filling disk's
        self.budget -= n
        return n


def record(n: int) -> bytes:
    return json.dumps({"custom_id": f"row-{n}", "response": {"body": "x" * 40}}).encode()


def check_journal_file(path: Path, lines: list[int]) -> None:
    """Every record whole (newline-terminated, valid JSON payload), in `lines` order, none torn."""
    data = path.read_bytes()
    assert data.endswith(b"\n") or data == b""
    records = data.split(b"\n")[:-1]
    assert [int(r.split(b" ", 1)[0]) for r in records] == lines
    for r in records:
        json.loads(r.split(b" ", 6)[6])


@pytest.mark.parametrize("budget", [0, 1, 10, 60])
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT, errno.EIO])
def test_failed_append_is_rolled_back(tmp_path: Path, budget: int, err: int) -> None:
    path = tmp_path / "journal"
    writer = FailingWriter(err=err)
    j = Journal(path, writer=writer)
    j.append(0, True, record(0), 3, 4)
    writer.budget = budget  # the disk fills during the next record, after `budget` of its bytes
    with pytest.raises(JournalWriteError) as info:
        j.append(1, True, record(1), 5, 6)
    assert info.value.errno == err
    assert "line 1" in str(info.value) and str(path) in str(info.value)
    assert not j.is_done(1)  # the row will run again
    assert j.totals.completed == 1 and j.totals.input_tokens == 3
    check_journal_file(path, [0])  # the partial record is gone

    # Still full: fails the same way, nothing glued on.
    with pytest.raises(JournalWriteError):
        j.append(2, False, record(2))
    check_journal_file(path, [0])

    writer.budget = None  # space again
    j.append(2, False, record(2))
    j.append(1, True, record(1), 5, 6)
    j.close()
    check_journal_file(path, [0, 2, 1])

    again = Journal(path)  # recovery reads what the appends left
    assert [again.is_done(n) for n in range(4)] == [True, True, True, False]
    assert (again.totals.completed, again.totals.failed, again.totals.input_tokens) == (2, 1, 8)
    again.close()


def test_unrollbackable_append_refuses_until_cut(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the torn bytes cannot even be cut (ftruncate fails too), later appends are refused
    rather than glued after them; once the cut works again, appends go on."""
    path = tmp_path / "journal"
    writer = FailingWriter()
    j = Journal(path, writer=writer)
    j.append(0, True, record(0))
    writer.budget = 7
    real_truncate = os.ftruncate
    monkeypatch.setattr("llmbatch.server._journal.os.ftruncate", _raise_eio)
    with pytest.raises(JournalWriteError):
        j.append(1, True, record(1))
    writer.budget = None
    with pytest.raises(JournalWriteError, match="cannot cut"):
        j.append(2, True, record(2))
    monkeypatch.setattr("llmbatch.server._journal.os.ftruncate", real_truncate)
    j.append(2, True, record(2))
    j.close()
    check_journal_file(path, [0, 2])


def _raise_eio(fd: int, length: int) -> None:
    raise OSError(errno.EIO, "I/O error")
