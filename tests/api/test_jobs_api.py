"""`llmbatch.api.run_file` and `Job`: real runs on the local provider and on `llmbatch serve`
servers, and the CLI (a subprocess) resuming jobs the API started, and the other way round."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import ServerProc, chat_line, jsonl
from llmbatch import ConfigError, InputError
from llmbatch.api import Job, JobStatus, run_file

CLI = [sys.executable, "-m", "llmbatch"]
FAST = {"poll_interval": 0.05}


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Jobs under this test's own LLMBATCH_HOME, an OpenAI key for the `openai` provider."""
    for name in list(os.environ):
        if name.startswith("OPENAI_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("LLMBATCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    return tmp_path / "home"


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`llmbatch ARGS` to its end, with this test's environment."""
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def cli_started(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*CLI, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def write_input(tmp_path: Path, rows: list[dict[str, Any]], name: str = "input.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(jsonl(rows))
    return path


def content(rec: dict[str, Any]) -> str:
    return rec["response"]["body"]["choices"][0]["message"]["content"]


def assert_all_echoed(out: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    """One record per input row, in input order, each a 200 echoing its row's user text."""
    assert [r["custom_id"] for r in out] == [r["custom_id"] for r in rows]
    for rec, row in zip(out, rows):
        assert rec["error"] is None and rec["response"]["status_code"] == 200, rec
        assert content(rec) == row["body"]["messages"][-1]["content"], rec


def remote_batches(server: ServerProc) -> list[Any]:
    with server.client() as c:
        return list(c.batches.list(limit=100))


def sent_custom_ids(server: ServerProc) -> list[str]:
    """The custom_id of every line of every batch's input file (kept with --keep-uploads)."""
    ids: list[str] = []
    with server.client() as c:
        for b in c.batches.list(limit=100):
            ids += [json.loads(line)["custom_id"] for line in c.files.content(b.input_file_id).text.splitlines()]
    return ids


def wait_for(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := pred()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.03)
    return got


def batch_with_progress(server: ServerProc) -> Any:
    found = [b for b in remote_batches(server) if b.status == "in_progress" and b.request_counts.completed]
    return found[0] if found else None


def only_job(home: Path) -> str:
    (job_dir,) = (home / "jobs").iterdir()
    return job_dir.name


def slow_server(server_factory: Callable[..., ServerProc]) -> ServerProc:
    return server_factory("--echo-latency", "0.05", "--max-concurrency", "2")  # about 40 rows/s


# -- running and reading --------------------------------------------------------------------


def test_run_file_waits_and_returns_results_in_order(tmp_path: Path) -> None:
    rows = [chat_line(i, f"local {i}") for i in range(25)]
    inp = write_input(tmp_path, rows)

    job = run_file(inp, batch_size=10, **FAST)

    assert job.wait() == 0
    assert job.dir.parent == tmp_path / "home" / "jobs" and job.dir.name == job.id
    assert_all_echoed(list(job.results()), rows)
    assert list(job.errors()) == []
    status = job.status()
    assert isinstance(status, JobStatus)
    assert (status.state, status.succeeded, status.failed, status.invalid, status.pending) == ("finished", 25, 0, 0, 0)
    assert (status.total, status.done, status.running) == (25, 25, False)
    assert status.batches == {"collected": 3}
    assert status.input_tokens == 25 * 10 and status.output_tokens > 0
    assert status.cost == 0 and status.estimated_cost == 0  # the local provider bills nothing
    assert job.progress.startswith("finished; 25/25 rows done (0 failed); batches: 3 collected")
    assert repr(job) == f"<Job {job.id}: {job.progress}>"

    # The results come from the job's store, not from the file the run wrote.
    results_file = tmp_path / "input.results.jsonl"
    written = [json.loads(line) for line in results_file.read_text().splitlines()]
    assert written == list(job.results())
    results_file.unlink()
    assert_all_echoed(list(job.results()), rows)
    out, err = job.export(tmp_path / "again.jsonl")
    assert (out, err) == (tmp_path / "again.jsonl", None)
    assert [json.loads(line) for line in out.read_text().splitlines()] == written


def test_the_local_provider_polls_at_least_every_half_second(tmp_path: Path) -> None:
    """A poll of the local server is a call inside this process: the wait between polls stays at
    0.5 s at most instead of growing from --poll-interval (2 s by default) as for a remote API."""
    inp = write_input(tmp_path, [chat_line(0)])
    job = run_file(inp, engine="echo", engine_options={"echo_latency": 3.0})  # the default poll interval
    assert job.wait() == 0
    with sqlite3.connect(job.dir / "job.sqlite") as db:
        (collected,) = db.execute("SELECT at FROM events WHERE kind = 'collected'").fetchone()
    with sqlite3.connect(next((job.dir / "local-server").glob("*.sqlite"))) as db:
        (completed,) = db.execute("SELECT at FROM batch_events WHERE to_status = 'completed'").fetchone()
    assert 0 < collected - completed < 1.0, collected - completed  # before: ~2 s (waits of 2, 3, 4.5 s, ...)


def test_run_file_inside_a_running_event_loop(tmp_path: Path) -> None:
    """Jupyter runs cells in an event loop, where asyncio.run fails: the run goes to a worker thread."""
    rows = [chat_line(i) for i in range(5)]
    inp = write_input(tmp_path, rows)

    async def cell() -> Job:
        return run_file(inp, **FAST)

    job = asyncio.run(cell())
    assert job.wait() == 0
    assert_all_echoed(list(job.results()), rows)


def test_wait_false_returns_at_once_and_wait_waits(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = slow_server(server_factory)
    rows = [chat_line(i) for i in range(40)]
    inp = write_input(tmp_path, rows)

    t0 = time.monotonic()
    job = run_file(inp, provider="openai", base_url=server.base_url, wait=False, **FAST)
    assert time.monotonic() - t0 < 1.0
    assert job.status().running
    assert job.progress.startswith(("ingesting;", "running;"))
    with pytest.raises(TimeoutError):
        job.wait(timeout=0.05)
    with pytest.raises(ConfigError, match="already running"):
        job.resume()

    assert job.wait(timeout=30) == 0
    assert_all_echoed(list(job.results()), rows)
    status = job.status()
    assert (status.state, status.succeeded, status.pending) == ("finished", 40, 0)
    assert status.cost > 0 and status.estimated_cost > 0  # gpt-4o-mini at the bundled OpenAI batch prices


def test_results_wait_for_a_run_in_progress(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = slow_server(server_factory)
    rows = [chat_line(i) for i in range(30)]
    inp = write_input(tmp_path, rows)

    job = run_file(inp, provider="openai", base_url=server.base_url, wait=False, **FAST)
    wait_for(lambda: job.status().total == 30, 10, "the rows to be read")
    now = list(job.results(wait=False))  # as the rows stand: most not run yet
    assert [r["custom_id"] for r in now] == [r["custom_id"] for r in rows]
    assert any(r["response"] is None for r in now)
    assert all(r["error"]["code"] == "not_run" for r in now if r["response"] is None)
    assert_all_echoed(list(job.results()), rows)  # waits for the run to end
    assert job.status().state == "finished"


def test_status_counts_rows_a_running_batch_has_answered(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Rows finish inside a batch long before it ends and is collected: `status()`, `progress`
    and `llmbatch status` say how many, as the server last reported, while they are still pending."""
    server = slow_server(server_factory)
    rows = [chat_line(i) for i in range(120)]  # one batch of ~3 s
    job = run_file(write_input(tmp_path, rows), provider="openai", base_url=server.base_url, wait=False, **FAST)

    def answered_inside() -> JobStatus | None:
        s = job.status()
        return s if s.answered_remotely and s.pending == 120 else None

    status = wait_for(answered_inside, 30, "rows answered inside the running batch")
    assert 0 < status.answered_remotely < 120 and status.done == 0
    cli = subprocess.run(
        [sys.executable, "-m", "llmbatch", "status", job.id], capture_output=True, text=True, timeout=60
    )
    assert re.search(r"120 pending \((\d+) of them answered in batches still running", cli.stdout), cli.stdout
    assert job.wait(timeout=60) == 0
    status = job.status()
    assert (status.succeeded, status.pending, status.answered_remotely) == (120, 0, 0)
    assert "answered in batches still running" not in job.progress


# -- jobs started elsewhere ----------------------------------------------------------------


def test_attach_to_a_job_the_cli_runs(server_factory, tmp_path: Path, home: Path) -> None:  # type: ignore[no-untyped-def]
    server = slow_server(server_factory)
    rows = [chat_line(i) for i in range(60)]
    inp = write_input(tmp_path, rows)
    args = ["--provider", "openai", "--base-url", server.base_url, "--poll-interval", "0.05", "--batch-size", "20"]
    proc = cli_started("run", str(inp), *args, "--max-in-flight", "1")
    try:

        def attached_and_running() -> Job | None:
            if not (home / "jobs").is_dir() or not any((home / "jobs").iterdir()):
                return None
            try:
                job = Job.attach(only_job(home))
            except ConfigError:  # created, not initialised yet
                return None
            return job if job.status().state == "running" else None

        job = wait_for(attached_and_running, 30, "the CLI's job to run")
        # The CLI holds the job: neither run_file nor resume() may run it meanwhile.
        with pytest.raises(ConfigError, match="already running"):
            run_file(inp, provider="openai", base_url=server.base_url, batch_size=20, **FAST)
        with pytest.raises(ConfigError, match="already running"):
            job.resume()
        assert job.status().running

        assert job.wait(timeout=30) == 0
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert_all_echoed(list(job.results()), rows)
    status = job.status()
    assert (status.state, status.succeeded, status.batches) == ("finished", 60, {"collected": 3})

    # Resuming a finished job sends nothing.
    assert job.resume().wait() == 0
    assert len(remote_batches(server)) == 3


def test_a_job_the_cli_interrupted_resumed_here(server_factory, tmp_path: Path, home: Path) -> None:  # type: ignore[no-untyped-def]
    server = slow_server(server_factory)
    rows = [chat_line(i) for i in range(60)]
    inp = write_input(tmp_path, rows)
    proc = cli_started(
        "run", str(inp), "--provider", "openai", "--base-url", server.base_url, "--poll-interval", "0.05",
        "--keep-uploads",
    )  # fmt: skip
    try:
        wait_for(lambda: batch_with_progress(server), 30, "a batch in progress with completed rows")
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err

    job = Job.attach(only_job(home))
    assert job.status().state == "stopped"
    assert job.wait() == 130  # run by no one: at once

    assert job.resume(api_key="test").wait() == 0
    assert_all_echoed(list(job.results()), rows)
    assert job.status().state == "finished"
    # The batch the CLI left running was collected, not sent again.
    assert sorted(sent_custom_ids(server)) == sorted(r["custom_id"] for r in rows)


def test_cancel_here_then_the_cli_resumes(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = slow_server(server_factory)
    rows = [chat_line(i) for i in range(60)]
    inp = write_input(tmp_path, rows)

    job = run_file(inp, provider="openai", base_url=server.base_url, wait=False, keep_uploads=True, **FAST)
    wait_for(lambda: batch_with_progress(server), 30, "a batch in progress with completed rows")
    assert job.cancel() == 1
    assert job.wait() == 130
    status = job.status()
    assert status.state == "cancelled"
    assert 0 < status.succeeded < 60 and status.pending == 60 - status.succeeded

    resumed = cli("resume", job.id)
    assert resumed.returncode == 0, resumed.stderr
    assert job.wait() == 0
    assert_all_echoed(list(job.results()), rows)
    # Rows the cancelled batch finished were kept, not sent again.
    assert len(sent_custom_ids(server)) == 60 + 60 - status.succeeded


# -- the budget ----------------------------------------------------------------------------


def test_budget_stop_is_exit_code_3_and_the_cli_finishes_the_job(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = server_factory()
    # Replies are cut at max_tokens and input is free: each 100-row chunk costs exactly $0.01.
    long_text = " ".join(f"word{i}" for i in range(40))
    rows = [chat_line(i, f"{i} {long_text}", max_tokens=10) for i in range(300)]
    inp = write_input(tmp_path, rows)
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"gpt-4o-mini": {"input": 0, "output": 20, "batch_input": 0, "batch_output": 10}}))
    where = {"provider": "openai", "base_url": server.base_url, "batch_size": 100, "price_file": prices, **FAST}

    job = run_file(inp, max_cost=0.015, **where)  # type: ignore[arg-type]

    assert job.wait() == 3
    status = job.status()
    assert (status.state, status.succeeded, status.pending) == ("budget_stopped", 100, 200)
    assert status.batches == {"collected": 1, "planned": 2}
    assert status.cost == pytest.approx(0.01)
    assert status.estimated_cost == pytest.approx(0.03)
    out = list(job.results())
    assert [r["response"]["status_code"] for r in out[:100]] == [200] * 100
    assert {r["error"]["code"] for r in out[100:]} == {"not_run"}
    # Every record has an id, rows not run too, and the same one on every read (issue 15: null).
    ids = [r["id"] for r in out]
    assert all(i.startswith("batch_req_") for i in ids) and len(set(ids)) == 300
    assert [r["id"] for r in job.results()] == ids
    assert list(job.errors()) == []  # rows not run are not failures
    # Cancelling from another handle: nothing is in flight, and the job reads cancelled.
    assert Job.attach(job.id).cancel() == 0
    assert (job.status().state, job.wait()) == ("cancelled", 130)

    # The CLI finds the same job and finishes it with a larger budget.
    again = cli(
        "run", str(inp), "--provider", "openai", "--base-url", server.base_url, "--batch-size", "100",
        "--price-file", str(prices), "--poll-interval", "0.05", "--max-cost", "1",
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert f"resuming job {job.id}" in again.stderr
    assert job.wait() == 0
    assert job.status().succeeded == 300
    assert all(r["response"]["status_code"] == 200 for r in job.results())
    assert len(remote_batches(server)) == 3


# -- errors --------------------------------------------------------------------------------


def test_invalid_rows_raise_naming_file_and_line(tmp_path: Path) -> None:
    lines = [
        json.dumps(chat_line(0)),
        json.dumps(chat_line(1)),
        '{"custom_id": "row-x", "method": "POST", "url": ',  # line 3: malformed JSON
        json.dumps(chat_line(2)),
        json.dumps(chat_line(1, "again")),  # line 5: duplicate custom_id
        json.dumps(chat_line(3)),
    ]
    inp = tmp_path / "input.jsonl"
    inp.write_text("\n".join(lines) + "\n")

    with pytest.raises(InputError) as raised:
        run_file(inp, **FAST)
    message = str(raised.value)
    assert f"{inp}:3: " in message and "JSON" in message
    assert f"{inp}:5: duplicate_custom_id" in message and "input.jsonl:2" in message
    assert "skip_invalid=True" in message
    assert not (tmp_path / "input.results.jsonl").exists()

    assert not any((tmp_path / "home" / "jobs").iterdir())  # a refused new job is not kept

    job = run_file(inp, wait=False, **FAST)  # from a background run: the same, from wait()
    with pytest.raises(InputError, match="2 invalid rows"):
        job.wait()
    status = job.status()
    assert (status.state, status.invalid, status.pending, status.succeeded) == ("stopped", 0, 0, 0)
    assert status.error is not None and "input.jsonl:3" in status.error
    assert not job.dir.exists()

    job = run_file(inp, skip_invalid=True, **FAST)
    assert job.wait() == 1
    out = list(job.results())
    assert [content(out[n]) for n in (0, 1, 3, 5)] == ["hello 0", "hello 1", "hello 2", "hello 3"]
    errors = list(job.errors())
    assert [e["error"]["message"][: len("input.jsonl:3:")] for e in errors] == ["input.jsonl:3:", "input.jsonl:5:"]
    assert errors == [out[2], out[4]]
    assert job.status().error is None  # the job ended since


def test_bad_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inp = write_input(tmp_path, [chat_line(0)])
    with pytest.raises(ConfigError, match="unknown setting max_cots"):
        run_file(inp, max_cots=1)
    with pytest.raises(ConfigError, match="batch_size"):
        run_file(inp, batch_size=0)
    with pytest.raises(ConfigError, match="unknown provider"):
        run_file(inp, provider="nope")
    with pytest.raises(InputError, match="cannot read"):
        run_file(tmp_path / "missing.jsonl")
    with pytest.raises(TypeError):
        run_file([{"custom_id": "a"}])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="no job"):
        Job.attach("job_0000000000000000")
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        run_file(inp, provider="openai", base_url="http://127.0.0.1:9/v1", **FAST)
