"""Helpers the provider adapter tests share: the adapter against an HTTP fake, `llmbatch run`
as a subprocess against the same fake (its job store, one remote batch per chunk, the checks
after a run killed with SIGKILL: `conftest.kill_then_finish` kills it), live tiny jobs, and a
job store rolled back.

Together and Mistral's fakes (tests/fakes/together.py, tests/fakes/mistral.py) take the same row
markers (`FAIL400`, `FAIL429`) and keep the same state (tests/fakes/_openai_like.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
from fakes._serve import serve_app

from conftest import back_up_store, chat_line, jsonl
from llmbatch.jobs import JobRunner, JobSession, JobSettings, JobStore, ingest
from llmbatch.providers import Provider, RemoteBatch, RemoteStatus

KEY = "test-key"
CLI = [sys.executable, "-m", "llmbatch"]
CHAT = "/v1/chat/completions"
#: The chunk tag of the batches the adapter-level tests make.
TAG = "x-c00001"


class ServedFake(Protocol):
    app: Any
    url: str


F = TypeVar("F", bound=ServedFake)
P = TypeVar("P", bound=Provider)
T = TypeVar("T")


@contextmanager
def served(fake: F) -> Iterator[F]:
    """Serves `fake` over real HTTP until the block ends, with `fake.url` set to its root URL."""
    with serve_app(fake.app) as url:
        fake.url = url
        yield fake


# -- the adapter ---------------------------------------------------------------------------


def with_adapter(p: P, fn: Callable[[P], Awaitable[T]]) -> T:
    """Runs `fn(p)` to its end, closing the adapter `p` afterwards."""

    async def main() -> T:
        try:
            return await fn(p)
        finally:
            await p.aclose()

    return asyncio.run(main())


def chunk_file(tmp_path: Path, rows: list[dict[str, Any]], name: str = "chunk.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(jsonl(rows))
    return path


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


async def poll_to_end(p: Provider, batch_id: str) -> list[RemoteStatus]:
    seen: list[RemoteStatus] = []
    for _ in range(20):
        b = await p.get_batch(batch_id)
        if not seen or seen[-1] != b.status:
            seen.append(b.status)
        if b.status.terminal:
            return seen
    raise AssertionError(f"batch {batch_id} never ended: {seen}")


async def run_batch(p: Provider, tmp_path: Path, path: Path, endpoint: str = CHAT) -> list[RemoteStatus]:
    """Uploads, creates, polls to the end and downloads both result files to out/err.jsonl."""
    b = await p.create_batch(TAG, "job", await p.upload(TAG, path), endpoint)
    statuses = await poll_to_end(p, b.id)
    final = await p.get_batch(b.id)
    for file_id, name in ((final.output_file_id, "out.jsonl"), (final.error_file_id, "err.jsonl")):
        if file_id:
            await p.download(file_id, tmp_path / name)
    return statuses


@dataclass
class Lifecycle:
    """What `lifecycle` saw: the upload's id, the ended batch, the batch found by its tag after
    the create, each status as seen (the create's first), and the job's batches listed."""

    file_id: str
    batch: RemoteBatch
    found: RemoteBatch | None
    statuses: list[RemoteStatus]
    listed: list[RemoteBatch]


async def lifecycle(p: Provider, tag: str, job: str, chunk: Path, out: Path) -> Lifecycle:
    """One chunk through an object-store adapter (Bedrock's, Vertex's): upload; its lookups
    before and after the create (another tag finds nothing); polls until it ends; downloads its
    results to `out`; lists the job's batches; deletes the upload."""
    since = int(time.time())
    file_id = await p.upload(tag, chunk)
    assert await p.find_upload(tag, since) == file_id
    assert await p.find_upload(f"{job}-c00002", since) is None
    assert await p.find_batch(tag, since, file_id) is None
    b = await p.create_batch(tag, job, file_id, CHAT)
    found = await p.find_batch(tag, since, file_id)
    statuses = [b.status]
    for _ in range(10):
        b = await p.get_batch(b.id)
        statuses.append(b.status)
        if b.status.terminal:
            break
    assert b.output_file_id is not None
    await p.download(b.output_file_id, out)
    listed = await p.list_job_batches(job, since)
    await p.delete_file(file_id)
    return Lifecycle(file_id, b, found, statuses, listed)


def assert_echoed_but_row_5(out: list[dict[str, Any]], rows: list[dict[str, Any]], prompt_tokens: int) -> None:
    """Every row came back once; row-5 (sent as "refuse FAIL400") as its 400, the others as the
    fakes' "hello N" answers with `prompt_tokens` counted."""
    assert sorted(r["custom_id"] for r in out) == sorted(r["custom_id"] for r in rows)
    for rec in out:
        if rec["custom_id"] == "row-5":
            assert rec["response"]["status_code"] == 400 and "FAIL400" in rec["response"]["body"]["error"]["message"]
        else:
            n = rec["custom_id"].split("-")[1]
            assert rec["response"]["body"]["choices"][0]["message"]["content"] == f"hello {n}"
            assert rec["response"]["body"]["usage"]["prompt_tokens"] == prompt_tokens


def read_shuffled_output(path: Path) -> list[dict[str, Any]]:
    """The output file of a batch of 20 rows whose rows 3, 11 and 15 failed: the other rows' lines,
    shuffled (as the fakes do), each with the line as the provider sent it under "native"."""
    out = read_lines(path)
    ids = [r["custom_id"] for r in out]
    assert sorted(ids) == sorted(f"row-{i}" for i in range(20) if i not in (3, 11, 15))
    assert ids != sorted(ids, key=lambda c: int(c.split("-")[1])), "the fake shuffles results"
    for rec in out:
        assert set(rec) == {"id", "custom_id", "response", "error", "native"}
    return out


async def check_expiry(p: Provider, tmp_path: Path, model: str) -> None:
    """A batch of 10 rows that expires (the fake's `expire_next`) ends EXPIRED with the first 5 rows' results."""
    path = chunk_file(tmp_path, [chat_line(i, model=model) for i in range(10)])
    assert (await run_batch(p, tmp_path, path))[-1] is RemoteStatus.EXPIRED
    assert sorted(r["custom_id"] for r in read_lines(tmp_path / "out.jsonl")) == sorted(f"row-{i}" for i in range(5))


async def failed_batch(p: Provider, file_id: str) -> RemoteBatch:
    """A batch of `file_id`, a file that fails validation, polled to its end: FAILED, without result files."""
    b = await p.create_batch(TAG, "job", file_id, CHAT)
    assert (await poll_to_end(p, b.id))[-1] is RemoteStatus.FAILED
    failed = await p.get_batch(b.id)
    assert failed.output_file_id is None and failed.error_file_id is None
    return failed


async def check_cancel(p: Provider, tmp_path: Path, model: str) -> None:
    """A batch of 6 rows polled twice, then cancelled: CANCELLING, then CANCELLED (slow the fake down first)."""
    path = chunk_file(tmp_path, [chat_line(i, model=model) for i in range(6)])
    b = await p.create_batch(TAG, "job", await p.upload(TAG, path), CHAT)
    await p.get_batch(b.id)
    await p.get_batch(b.id)
    cancelling = await p.cancel(b.id)
    assert [cancelling.status, *await poll_to_end(p, b.id)] == [RemoteStatus.CANCELLING, RemoteStatus.CANCELLED]


def thirty_row_job(tmp_path: Path, provider: str, url: str, model: str) -> tuple[JobStore, Path, JobSettings]:
    """A job of 30 chat rows (tmp_path/in.jsonl) in chunks of 10, ingested but not planned."""
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(jsonl([chat_line(i, model=model) for i in range(30)]))
    settings = JobSettings(provider=provider, base_url=url, batch_size=10, poll_interval=0.05)
    session, _ = JobSession.open([inp], settings, tmp_path / "jobs", api_key=KEY)
    store, job_dir = session.store, session.dir
    ingest(store, [inp], settings)
    return store, job_dir, settings


async def leave_orphans(store: JobStore, job_dir: Path, settings: JobSettings, p: Provider) -> tuple[str, str]:
    """Plans the job and crashes twice over; returns the upload and the batch the job did not record."""
    runner = JobRunner(store, job_dir, settings, p, say=lambda m: None)
    runner.plan()
    c1, c2, _c3 = store.chunks(("planned",))
    # Chunk 1 was uploaded, then the process died before recording the file id.
    store.move_chunk(c1.id, "uploading", ("planned",), intent_at=c1.created_at)
    orphan_upload = await p.upload(c1.tag, runner.write_chunk_file(c1))
    # Chunk 2's batch was created, then the process died before recording the batch id.
    file_id = await p.upload(c2.tag, runner.write_chunk_file(c2))
    store.move_chunk(c2.id, "uploading", ("planned",), intent_at=c2.created_at)
    store.move_chunk(c2.id, "uploaded", ("uploading",), file_id=file_id)
    store.move_chunk(c2.id, "creating", ("uploaded",), intent_at=c2.created_at)
    orphan_batch = await p.create_batch(c2.tag, runner.job_id, file_id, c2.endpoint)
    return orphan_upload, orphan_batch.id


async def restart(store: JobStore, job_dir: Path, settings: JobSettings, p: Provider) -> None:
    """A fresh runner runs the job to its end with `p`, and closes `p`."""
    outcome = await JobRunner(store, job_dir, settings, p, say=lambda m: None).run()
    await p.aclose()
    assert outcome.code == 0, outcome.summary


# -- `llmbatch run --provider NAME` --------------------------------------------------------


def run_cli(provider: str, tmp_path: Path, url: str, inp: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """`llmbatch run INP --provider PROVIDER` against the fake at `url`, with the test key."""
    prefix = provider.upper() + "_"
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefix)}
    env.update({"LLMBATCH_HOME": str(tmp_path / "home"), f"{prefix}API_KEY": KEY, "NO_PROXY": "127.0.0.1,localhost"})
    cmd = [sys.executable, "-m", "llmbatch", "run", str(inp), "--provider", provider,
           "--base-url", url, "--poll-interval", "0.05", *extra]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def model_run_cmd(inp: Path, url: str, model: str, *extra: str) -> list[str]:
    """`llmbatch run INP --model PROVIDER/MODEL` (the provider named by the model) against `url`."""
    return [*CLI, "run", str(inp), "--model", model, "--base-url", url, "--poll-interval", "0.05", *extra]


def job_db(tmp_path: Path) -> sqlite3.Connection:
    """The store of the one job under tmp_path/home (the CLI's LLMBATCH_HOME)."""
    (job_dir,) = (tmp_path / "home" / "jobs").iterdir()
    return sqlite3.connect(job_dir / "job.sqlite")


def job_query(tmp_path: Path, sql: str) -> list[Any]:
    """The rows `sql` selects from the job's store."""
    db = job_db(tmp_path)
    try:
        return list(db.execute(sql))
    finally:
        db.close()


def chunk_sizes(tmp_path: Path) -> list[int]:
    return [n for (n,) in job_query(tmp_path, "SELECT rows FROM chunks ORDER BY tag")]


def found_events(tmp_path: Path, like: str = "%: found %") -> list[str]:
    """The job's "found upload/batch" events (`like`: which): what reconciliation adopted."""
    return [m for (m,) in job_query(tmp_path, f"SELECT message FROM events WHERE message LIKE '{like}'")]


def assert_one_remote_per_chunk(tmp_path: Path, names: Iterable[str], name_of: Callable[[str], str] = str) -> None:
    """Each chunk of the job has exactly one remote job or batch, called `name_of(tag)`, and no
    other: `names` are the remote ones'."""
    counts = Counter(names)
    assert set(counts.values()) == {1}, counts
    assert sorted(counts) == sorted(name_of(tag) for (tag,) in job_query(tmp_path, "SELECT tag FROM chunks"))


def check_killed_job(tmp_path: Path, n: int) -> list[str]:
    """After `kill_then_finish` on a job of `n` chat rows the echoing fake answers `hello I`: every
    row is there once, in order, and at least one kill landed between a batch's creation and its
    record (the job found the batch afterwards). Returns the "found batch" events."""
    out = read_lines(tmp_path / "input.results.jsonl")
    assert [r["custom_id"] for r in out] == [f"row-{i}" for i in range(n)]
    assert all(r["response"]["body"]["choices"][0]["message"]["content"] == f"hello {i}" for i, r in enumerate(out))
    found = found_events(tmp_path, "%found batch%")
    assert found, "no kill landed between a batch's creation and its record: the test tested nothing"
    return found


def run_marked_job(provider: str, tmp_path: Path, url: str, fail400: str, **params: Any) -> None:
    """`llmbatch run --batch-size 10` on 25 chat rows (`params` in each body) that the fake fails:
    rows 4 and 17 (`FAIL400`) with a 400 and the message `fail400` every time, rows 6, 12 and 21
    (`FAIL429`) with a 429 the first time. Checks that every row has its result, in input order,
    and that the job exits 1 with the two 400s, and only them, in the errors file."""
    texts = [f"text {i}" for i in range(25)]
    texts[4], texts[17] = "FAIL400 four", "FAIL400 seventeen"
    texts[6], texts[12], texts[21] = "FAIL429 six", "FAIL429 twelve", "FAIL429 twenty-one"
    rows = [chat_line(i, t, **params) for i, t in enumerate(texts)]
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(jsonl(rows))

    proc = run_cli(provider, tmp_path, url, inp, "--batch-size", "10")
    assert proc.returncode == 1, proc.stderr

    out = read_lines(tmp_path / "input.results.jsonl")
    assert [r["custom_id"] for r in out] == [r["custom_id"] for r in rows]
    for n, rec in enumerate(out):
        if n in (4, 17):
            assert rec["response"]["status_code"] == 400
        else:
            assert rec["response"]["status_code"] == 200, rec
            assert rec["response"]["body"]["choices"][0]["message"]["content"] == texts[n]
    errors = read_lines(tmp_path / "input.errors.jsonl")
    assert [e["custom_id"] for e in errors] == ["row-4", "row-17"]
    assert all(e["response"]["body"]["error"]["message"] == fail400 for e in errors)


def check_marked_batches(lines: dict[str, list[dict[str, Any]]], batches: list[dict[str, Any]], expired: str) -> None:
    """After `run_marked_job` with the first batch to end expiring (status `expired`): the job's three
    chunks went first, and the batches after them held the rows that expired and the three 429s."""
    assert sorted(len(lines[b["id"]]) for b in batches[:3]) == [5, 10, 10]
    (lapsed,) = [b for b in batches if b["status"] == expired]
    half = len(lines[lapsed["id"]]) // 2
    not_done = sorted(line["custom_id"] for line in lines[lapsed["id"]][half:])
    retried = sorted(line["custom_id"] for b in batches[3:] for line in lines[b["id"]])
    assert retried == sorted(not_done + ["row-12", "row-21", "row-6"])


def run_refused_job(provider: str, tmp_path: Path, url: str, model: str, **lacking: Any) -> str:
    """`llmbatch run` on four rows: row 2 with the `lacking` parameters, row 4 with a `user`. Checks that
    ingest refuses rows 2 and 4, and only them, with exit status 2; returns stderr."""
    rows = [chat_line(0, model=model), chat_line(1, model=model, **lacking),
            chat_line(2, model=model), chat_line(3, model=model, user="someone")]  # fmt: skip
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(jsonl(rows))

    proc = run_cli(provider, tmp_path, url, inp)
    assert proc.returncode == 2, proc.stderr
    assert "input.jsonl:2" in proc.stderr
    assert "input.jsonl:4" in proc.stderr and "`user`" in proc.stderr
    assert "input.jsonl:1" not in proc.stderr and "input.jsonl:3" not in proc.stderr
    return proc.stderr


def run_live_job(provider: str, tmp_path: Path, model: str, **params: Any) -> None:
    """Two rows on the provider's real Batch API, both answered (skipped without its key)."""
    if not os.environ.get(f"{provider.upper()}_API_KEY"):
        pytest.skip(f"{provider.upper()}_API_KEY is not set")
    rows = [chat_line(i, f"Reply with the word {w}.", model=model, **params) for i, w in enumerate(["apple", "pear"])]
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(jsonl(rows))
    env = {**os.environ, "LLMBATCH_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "llmbatch", "run", str(inp), "--provider", provider, "--poll-interval", "20"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=6 * 3600)
    assert proc.returncode == 0, proc.stderr
    out = read_lines(tmp_path / "input.results.jsonl")
    assert [r["response"]["status_code"] for r in out] == [200, 200]


def run_live_tiny_job(
    provider: str, tmp_path: Path, model: str, n: int, poll_interval: int, env: dict[str, str], timeout: float
) -> list[dict[str, Any]]:
    """`n` rows on the provider's real batch API (`env`: its credentials), each asking for the word
    `okI`, run once (--max-attempts 1): every row answered, in order, with its word. Returns the
    results."""
    rows = [chat_line(i, f"Reply with the single word: ok{i}", model=model, max_tokens=10) for i in range(n)]
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(jsonl(rows))
    env = {**env, "LLMBATCH_HOME": str(tmp_path / "home")}
    cmd = [*CLI, "run", str(inp), "--provider", provider, "--poll-interval", str(poll_interval), "--max-attempts", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    out = read_lines(tmp_path / "input.results.jsonl")
    assert [r["custom_id"] for r in out] == [r["custom_id"] for r in rows]
    assert all(f"ok{i}" in r["response"]["body"]["choices"][0]["message"]["content"] for i, r in enumerate(out))
    return out


# -- a job store rolled back to an older copy (issue 13) -------------------------------------


def check_store_rollback(
    tmp_path: Path,
    settings: JobSettings,
    model: str,
    adapter: Callable[[], Provider],
    batches_made: Callable[[], int],
    stop_at: int,
) -> list[str]:
    """A job of 40 chat rows in chunks of 10 (two in flight) runs until the fake has made
    `stop_at` batches and is stopped there; its store is put back to a copy made before anything
    was planned, and the job is run again to its end with a fresh `adapter()`. Checks that every
    row has one result, in input order, and returns the run's messages; the caller checks the
    fake (one batch per tag, each row run once)."""
    inp = tmp_path / "in.jsonl"
    rows = [chat_line(i, model=model) for i in range(40)]
    inp.write_bytes(jsonl(rows))
    messages: list[str] = []
    session, _ = JobSession.open([inp], settings, tmp_path / "jobs", api_key=KEY, say=messages.append)
    prepared = session.prepare(settings)
    backup = tmp_path / "backup.sqlite"
    back_up_store(session.store.path, backup)

    def runner(p: Provider) -> JobRunner:
        return JobRunner(session.store, session.dir, prepared.settings, p, prices=prepared.prices, say=messages.append)

    async def interrupted() -> None:
        p = adapter()
        task = asyncio.create_task(runner(p).run())
        deadline = time.monotonic() + 30
        try:
            while batches_made() < stop_at:
                assert not task.done(), f"the run ended before {stop_at} batches: {task.result()}"
                assert time.monotonic() < deadline, f"no {stop_at} batches within 30 s"
                await asyncio.sleep(0.005)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await p.aclose()

    asyncio.run(interrupted())
    assert batches_made() == stop_at, "stopped late: make the fake slower"
    path = session.store.path
    session.close()
    for extra in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        extra.unlink(missing_ok=True)
    shutil.copyfile(backup, path)
    session = JobSession(path.parent, api_key=KEY, say=messages.append)
    try:
        prepared = session.prepare(settings)

        async def again() -> Any:
            p = adapter()
            try:
                return await runner(p).run()
            finally:
                await p.aclose()

        outcome = asyncio.run(again())
        assert outcome.code == 0, (outcome.summary, messages)
    finally:
        session.close()
    out = read_lines(tmp_path / "in.results.jsonl")
    assert [r["custom_id"] for r in out] == [r["custom_id"] for r in rows]
    assert all(r["response"]["status_code"] == 200 for r in out), [r for r in out if r["response"] is None][:1]
    return messages
