"""A full disk (ENOSPC) never tears or loses a result line: the journal rolls a failed append
back, a batch pauses with one clear log line and backoff and finishes once space returns, and an
upload gets 507 insufficient_storage.

Three levels: the journal with a writer that fails after N bytes (the OS call is the seam); a
real server in this process over HTTP with `os.write` failing ENOSPC on files of its data dir for
a while (and SQLite capped at its size with max_page_count); and a real server process whose data
dir is a small tmpfs (a user+mount namespace; skipped where the kernel does not allow one) that
is filled and then freed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fakes._serve import serve_app

from conftest import chat_line, free_port, jsonl, read_jsonl, upload, wait_batch
from llmbatch.server import ServerConfig, create_app
from llmbatch.server._journal import Journal, JournalWriteError
from llmbatch.server._state import ServerState


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


# -- (b) a server in this process, its data dir's writes failing ENOSPC for a while ----------


class FullDisk:
    """`os.write` for the whole process that fails ENOSPC on files under `root` while `full`."""

    def __init__(self, root: Path) -> None:
        self.root = str(root.resolve()) + os.sep
        self.full = False
        self.failures = 0
        self._real = os.write

    def __call__(self, fd: int, data: bytes) -> int:
        if self.full:
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                target = ""
            if target.startswith(self.root):
                self.failures += 1
                if self.failures % 2:  # half of them after a partial write, as a filling disk does
                    return self._real(fd, bytes(data[: len(data) // 2]))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._real(fd, data)


@dataclass
class InProc:
    """A real server in this process: its client, root URL and state (store, worker)."""

    client: openai.OpenAI
    root: str
    state: ServerState


@pytest.fixture
def inproc_server(tmp_path: Path) -> Iterator[Callable[..., InProc]]:
    """Starts a real server (create_app on uvicorn, 127.0.0.1) in this process; stops it after."""
    with contextlib.ExitStack() as stack:

        def start(**config: Any) -> InProc:
            app = create_app(ServerConfig(data_dir=tmp_path / "data", engine="echo", **config))
            root = stack.enter_context(serve_app(app, timeout=20))
            client = openai.OpenAI(base_url=f"{root}/v1", api_key="unused", max_retries=0)
            return InProc(client, root, app.server)

        yield start


def test_batch_pauses_while_journal_writes_fail_and_finishes_once_space_returns(
    tmp_path: Path, inproc_server: Callable[..., InProc], monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    rows = 400
    disk = FullDisk(tmp_path / "data")
    monkeypatch.setattr(os, "write", disk)
    caplog.set_level(logging.INFO, logger="llmbatch.server")
    client = inproc_server(engine_options={"echo_latency": 0.02, "max_concurrency": 4}).client
    f = upload(client, jsonl([chat_line(i) for i in range(rows)]))
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 20
    while client.batches.retrieve(batch.id).request_counts.completed < rows // 4:
        assert time.monotonic() < deadline
        time.sleep(0.01)

    disk.full = True
    cpu0, t0 = time.process_time(), time.monotonic()
    time.sleep(2.5)
    cpu = time.process_time() - cpu0
    paused = client.batches.retrieve(batch.id)
    assert paused.status == "in_progress", paused
    assert paused.request_counts.completed < rows
    failures = disk.failures
    disk.full = False

    final = wait_batch(client, batch.id, timeout=30)
    assert final.status == "completed", final
    out = read_jsonl(client, final.output_file_id)
    assert read_jsonl(client, final.error_file_id) == []  # nothing "batch_cancelled"
    assert sorted(int(r["custom_id"][4:]) for r in out) == list(range(rows))  # each row exactly once
    assert final.request_counts.completed == final.request_counts.total == rows

    assert failures >= 1
    records = [r for r in caplog.records if r.name == "llmbatch.server"]
    full_lines = [r.getMessage() for r in records if "disk full" in r.getMessage()]
    # Backoff 1 s, 2 s, ...: a pause line, at most one per retry, never a storm.
    assert 1 <= len(full_lines) <= 4, full_lines
    assert f"batch {batch.id}: disk full in {tmp_path / 'data'}" in full_lines[0]
    assert "pausing, retrying in 1 s" in full_lines[0]
    assert [r.getMessage() for r in records if r.exc_info] == []  # no tracebacks
    assert cpu < 1.0, f"{cpu:.2f} s of CPU in {time.monotonic() - t0:.1f} s while paused"


def test_cancel_while_paused_ends_at_once(
    tmp_path: Path, inproc_server: Callable[..., InProc], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch paused on a full disk is cancelled without waiting out its backoff: the rows
    recorded before the disk filled are in the output, the rest batch_cancelled, each once."""
    rows = 300
    disk = FullDisk(tmp_path / "data")
    monkeypatch.setattr(os, "write", disk)
    client = inproc_server(engine_options={"echo_latency": 0.02, "max_concurrency": 4}).client
    f = upload(client, jsonl([chat_line(i) for i in range(rows)]))
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 20
    while client.batches.retrieve(batch.id).request_counts.completed < rows // 5:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    disk.full = True
    while disk.failures == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.1)  # paused, its first retry a second away
    t0 = time.monotonic()
    client.batches.cancel(batch.id)
    disk.full = False
    final = wait_batch(client, batch.id, timeout=10)
    assert final.status == "cancelled" and time.monotonic() - t0 < 0.9, final
    out, errs = read_jsonl(client, final.output_file_id), read_jsonl(client, final.error_file_id)
    assert sorted(int(r["custom_id"][4:]) for r in out + errs) == list(range(rows))
    assert {r["error"]["code"] for r in errs} == {"batch_cancelled"} and len(out) >= rows // 5


def test_sqlite_full_is_507_and_the_store_recovers(inproc_server: Callable[..., InProc]) -> None:
    """SQLite's SQLITE_FULL (here: the database capped at its current size) makes creating a
    batch or a file 507 insufficient_storage, leaves no stray file, and the store works again
    once there is room."""
    srv = inproc_server()
    f = upload(srv.client, jsonl([chat_line(i) for i in range(3)]))
    store = srv.state.store
    assert store is not None
    files = srv.state.config.data_dir / "files"
    with store._lock:
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count={pages}")
    http = httpx.Client(base_url=srv.root, timeout=30)
    # Batches whose lines name another endpoint: they fail validation and write no output file,
    # so the files folder changes only by what the uploads below do.
    body = {"input_file_id": f.id, "endpoint": "/v1/completions", "completion_window": "24h"}
    refused = []
    for _ in range(30):  # until the next page is needed (a few rows fit in the last page)
        r = http.post("/v1/batches", json=body)
        if r.status_code != 200:
            refused.append(r)
            break
    assert refused and refused[0].status_code == 507, refused and refused[0].text
    err = refused[0].json()["error"]
    assert err["code"] == "insufficient_storage" and err["type"] == "server_error", err
    name = "a" * 1000 + ".jsonl"  # fills the files table's last page in a few rows
    for _ in range(50):
        before = sorted(p.name for p in files.iterdir())
        r = http.post("/v1/files", files={"file": (name, jsonl([chat_line(0)]))}, data={"purpose": "batch"})
        if r.status_code != 200:
            break
    assert r.status_code == 507 and r.json()["error"]["code"] == "insufficient_storage", r.text
    assert sorted(p.name for p in files.iterdir()) == before  # the stored bytes went again

    with store._lock:
        store._db.execute("PRAGMA max_page_count=1073741823")
    assert http.post("/v1/batches", json=body).status_code == 200  # not stuck in a failed transaction
    assert upload(srv.client, jsonl([chat_line(0)])).bytes > 0


# -- (c) a real server process whose data dir is a small tmpfs ---------------------------------


def _tmpfs_namespace_or_skip(mnt: Path) -> None:
    """Skips the test unless an unprivileged user+mount namespace can mount a tmpfs here."""
    try:
        probe = subprocess.run(
            ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=1m none "$0"', str(mnt)],
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot run unshare: {exc}")
    if probe.returncode != 0:
        pytest.skip(f"no tmpfs in a user+mount namespace here: {probe.stderr.decode(errors='replace').strip()}")


@contextlib.contextmanager
def tmpfs_server(mnt: Path, log_path: Path, size: str, *args: str) -> Iterator[tuple[str, Path]]:
    """`llmbatch serve` in its own mount namespace with its data dir on a `size` tmpfs at `mnt`;
    yields its root URL and the path that reaches the tmpfs from outside (/proc/PID/root/...)."""
    port = free_port()
    script = 'mount -t tmpfs -o size="$1" none "$0" && shift && exec "$@"'
    cmd = [
        "unshare", "-rm", "sh", "-c", script, str(mnt), size,
        sys.executable, "-m", "llmbatch", "serve", "--port", str(port), "--data-dir", str(mnt / "data"), *args,
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.02)
        # unshare and sh exec the server, so its pid is proc.pid: its root shows its mounts.
        yield f"http://127.0.0.1:{port}", Path(f"/proc/{proc.pid}/root") / mnt.relative_to("/")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def fill(path: Path) -> int:
    """Writes `path` until the file system is full; returns the bytes written."""
    written = 0
    with open(path, "wb", buffering=0) as f:
        for size in (1 << 16, 1 << 12, 1 << 9, 1):
            chunk = b"\0" * size
            try:
                while True:
                    written += f.write(chunk) or 0
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return written


@dataclass
class TmpfsBatch:
    """A batch running on a server whose data dir is a small tmpfs (see `tmpfs_batch`)."""

    root: str
    disk: Path  # the tmpfs, reached from outside
    client: openai.OpenAI
    batch_id: str
    rows: int
    log_path: Path

    def wait_done(self, at_least: int, deadline: float) -> None:
        while self.client.batches.retrieve(self.batch_id).request_counts.completed < at_least:
            assert time.monotonic() < deadline, self.log_path.read_text()
            time.sleep(0.01)

    def assert_completes_each_row_once(self) -> None:
        final = wait_batch(self.client, self.batch_id, timeout=30)
        assert final.status == "completed", (final, self.log_path.read_text())
        lines = self.client.files.content(final.output_file_id).text.splitlines()
        assert sorted(int(json.loads(line)["custom_id"][4:]) for line in lines) == list(range(self.rows))
        assert final.error_file_id is None


@contextlib.contextmanager
def tmpfs_batch(tmp_path: Path, size: str, rows: int, text: str) -> Iterator[TmpfsBatch]:
    """A `size` tmpfs server (skipped where one cannot be mounted) running a batch of `rows`
    chat rows of `text`, 10 ms each, 4 at a time."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    _tmpfs_namespace_or_skip(mnt)
    log_path = tmp_path / "server.log"
    with tmpfs_server(mnt, log_path, size, "--echo-latency", "0.01", "--max-concurrency", "4") as (root, disk):
        client = openai.OpenAI(base_url=f"{root}/v1", api_key="unused", max_retries=0)
        f = upload(client, jsonl([chat_line(i, text=text) for i in range(rows)]))
        batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        yield TmpfsBatch(root, disk, client, batch.id, rows, log_path)


@pytest.mark.slow
def test_full_tmpfs_upload_507_batch_waits_then_completes(tmp_path: Path) -> None:
    rows = 300
    with tmpfs_batch(tmp_path, "3m", rows, "x" * 200) as run:
        root, disk, client, batch_id, log_path = run.root, run.disk, run.client, run.batch_id, run.log_path
        run.wait_done(rows // 5, time.monotonic() + 20)

        assert fill(disk / "filler") > 0
        # An upload on the full disk: 507 in OpenAI's envelope, its partial file gone.
        http = httpx.Client(base_url=root, timeout=30)
        r = http.post("/v1/files", files={"file": ("big.jsonl", b"x" * 300_000)}, data={"purpose": "batch"})
        assert r.status_code == 507, r.text
        err = r.json()["error"]
        assert err["code"] == "insufficient_storage" and "insufficient storage" in err["message"].lower(), err
        assert list((disk / "data" / "tmp").iterdir()) == []
        health = http.get("/health").json()
        assert health["disk"]["full"] is True, health

        time.sleep(2.0)  # the batch waits (one retry, at 1 s)
        waiting = client.batches.retrieve(batch_id)
        assert waiting.status in ("in_progress", "finalizing"), waiting
        assert waiting.request_counts.completed < rows or waiting.status == "finalizing"

        (disk / "filler").unlink()
        run.assert_completes_each_row_once()
        assert upload(client, jsonl([chat_line(0)])).bytes > 0  # uploads work again
        assert http.get("/health").json()["disk"]["full"] is False

    log = log_path.read_text()
    assert "disk full in" in log, log
    assert log.count("Traceback") == 0, log
    assert log.count("disk full in") <= 10, log
    assert_backoff_kept(log)


@pytest.mark.slow
def test_full_tmpfs_while_finishing_stays_finalizing_then_completes(tmp_path: Path) -> None:
    """Room for the journal's last records but not for the output file: the batch stays
    finalizing (its half-written output removed) and completes once there is space."""
    rows = 200
    with tmpfs_batch(tmp_path, "8m", rows, "y" * 2000) as run:
        disk, client, batch_id, log_path = run.disk, run.client, run.batch_id, run.log_path
        deadline = time.monotonic() + 20
        run.wait_done(rows // 4, deadline)
        filler = disk / "filler"
        fill(filler)
        while "pausing" not in log_path.read_text():  # paused: the journal holds what it holds
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.01)
        journal = (disk / "data" / "batches" / batch_id / "journal").read_bytes()
        done = journal.count(b"\n")
        full_size = len(journal) * rows // done
        # Free the rest of the journal and 40% of its size again: the output (about the journal's
        # size) cannot fit beside it.
        os.truncate(filler, filler.stat().st_size - (full_size - len(journal)) - full_size * 2 // 5)

        seen_finalizing_full = False
        while not seen_finalizing_full:
            assert time.monotonic() < deadline + 20, log_path.read_text()
            log = log_path.read_text()
            tail = log[log.find("in_progress -> finalizing") :]
            seen_finalizing_full = "in_progress -> finalizing" in log and "pausing" in tail
            time.sleep(0.02)
        assert client.batches.retrieve(batch_id).status == "finalizing"
        assert list((disk / "data" / "tmp").iterdir()) == []  # the half-written outputs are gone

        filler.unlink()
        run.assert_completes_each_row_once()
    log = log_path.read_text()
    assert log.count("Traceback") == 0, log
    assert_backoff_kept(log)


def assert_backoff_kept(log: str) -> None:
    """Each retry of a paused batch comes no sooner than the delay its pause line named."""
    paused_until = None
    for line in log.splitlines():
        at = line[:23]
        if "pausing, retrying in" in line:
            when = datetime.strptime(at, "%Y-%m-%d %H:%M:%S,%f").timestamp()
            paused_until = when + float(line.rsplit("retrying in ", 1)[1].split()[0])
        elif "trying again" in line:
            assert paused_until is not None, line
            assert datetime.strptime(at, "%Y-%m-%d %H:%M:%S,%f").timestamp() >= paused_until - 0.05, log
