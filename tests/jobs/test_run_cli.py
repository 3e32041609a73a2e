"""`llmbatch run` and its job commands end to end: real CLI subprocesses against real servers.

Every test runs `python -m llmbatch ...` as a subprocess with its own LLMBATCH_HOME, against
`llmbatch serve` processes started by `server_factory` (or the in-process local provider),
and checks what came out: exit codes, the results and errors files, and what the server saw.
"""

from __future__ import annotations

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

from conftest import TERMINAL, ServerProc, chat_line, jsonl

CLI = [sys.executable, "-m", "llmbatch"]
POLL = ["--poll-interval", "0.05"]


# -- helpers ---------------------------------------------------------------------------------


def cli_env(tmp_path: Path, *, key: bool = True) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env["LLMBATCH_HOME"] = str(tmp_path / "home")
    env["NO_PROXY"] = "127.0.0.1,localhost"
    if key:
        env["OPENAI_API_KEY"] = "test"
    return env


def llmbatch(tmp_path: Path, *args: str, timeout: float = 120, key: bool = True) -> subprocess.CompletedProcess[str]:
    """Runs `llmbatch ARGS` to its end; returns the finished process (stdout, stderr as text)."""
    return subprocess.run(
        [*CLI, *args], env=cli_env(tmp_path, key=key), capture_output=True, text=True, timeout=timeout
    )


def run_openai(
    tmp_path: Path, inp: Path, server: ServerProc, *extra: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    # --keep-uploads: the tests read what the server was sent from the uploaded inputs.
    return llmbatch(
        tmp_path, "run", str(inp), "--provider", "openai", "--base-url", server.base_url, *POLL, "--keep-uploads",
        *extra, timeout=timeout,
    )  # fmt: skip


def write_input(tmp_path: Path, rows: list[dict[str, Any]], name: str = "input.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(jsonl(rows))
    return path


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def remote_batches(server: ServerProc) -> list[Any]:
    """Every batch on the server (the SDK's list, auto-paginated)."""
    with server.client() as c:
        return list(c.batches.list(limit=7))  # a small page size so that pagination is exercised


def sent_custom_ids(server: ServerProc) -> list[str]:
    """The custom_id of every line of every batch's input file: what the server was sent."""
    ids: list[str] = []
    with server.client() as c:
        for b in c.batches.list(limit=100):
            text = c.files.content(b.input_file_id).text
            ids += [json.loads(line)["custom_id"] for line in text.splitlines() if line.strip()]
    return ids


def content(rec: dict[str, Any]) -> str:
    return rec["response"]["body"]["choices"][0]["message"]["content"]


def assert_all_echoed(out: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    """One output line per input row, in input order, each a 200 echoing its row's user text."""
    assert [r["custom_id"] for r in out] == [r["custom_id"] for r in rows]
    for rec, row in zip(out, rows):
        assert rec["error"] is None, rec
        assert rec["response"]["status_code"] == 200, rec
        assert content(rec) == row["body"]["messages"][-1]["content"], rec


def job_dir_of(tmp_path: Path) -> Path:
    (job_dir,) = (tmp_path / "home" / "jobs").iterdir()
    return job_dir


def assert_one_batch_at_a_time(tmp_path: Path) -> None:
    """Each chunk of the job was submitted only after the one before it was collected (from the
    job's event log, which has sub-second times; the API's times are whole seconds)."""
    db = sqlite3.connect(job_dir_of(tmp_path) / "job.sqlite")
    try:
        times: dict[int, dict[str, float]] = {}
        for chunk_id, kind, at in db.execute(
            "SELECT chunk_id, kind, at FROM events WHERE kind IN ('submitted', 'collected') ORDER BY seq"
        ):
            times.setdefault(chunk_id, {})[kind] = at
    finally:
        db.close()
    spans = sorted((t["submitted"], t["collected"]) for t in times.values())
    assert len(spans) >= 2
    for (_s1, collected), (submitted, _c2) in zip(spans, spans[1:]):
        assert submitted >= collected, spans


def wait_for(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.03)


# -- 1: a big job in several chunks -----------------------------------------------------------


def test_ten_thousand_rows_in_four_chunks(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = server_factory("--max-concurrency", "256")
    rows = [chat_line(i, f"text {i}") for i in range(10_000)]
    inp = write_input(tmp_path, rows)

    proc = run_openai(tmp_path, inp, server, "--batch-size", "3000")
    assert proc.returncode == 0, proc.stderr

    out = read_lines(tmp_path / "input.results.jsonl")
    assert len(out) == 10_000
    assert_all_echoed(out, rows)
    assert not (tmp_path / "input.errors.jsonl").exists()

    batches = remote_batches(server)
    assert len(batches) == 4
    tags = [(b.metadata or {}).get("llmbatch_chunk") for b in batches]
    assert all(tags) and len(set(tags)) == 4, tags
    assert sorted(b.request_counts.total for b in batches) == [1000, 3000, 3000, 3000]
    assert all(b.status == "completed" for b in batches)
    # The first chunk went out before the others were planned: the provider starts work sooner.
    db = sqlite3.connect(job_dir_of(tmp_path) / "job.sqlite")
    try:
        kinds = [k for (k,) in db.execute("SELECT kind FROM events WHERE kind IN ('plan', 'submitted') ORDER BY seq")]
    finally:
        db.close()
    assert kinds[:3] == ["plan", "submitted", "plan"], kinds
    assert kinds.count("plan") == 4


# -- 2: retryable failures are retried until they succeed -------------------------------------


def test_expired_rows_are_retried_in_new_batches(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = server_factory(
        "--completion-window", "24h", "--completion-window", "2s", "--echo-latency", "0.05", "--max-concurrency", "2"
    )
    rows = [chat_line(i) for i in range(120)]
    inp = write_input(tmp_path, rows)

    proc = run_openai(tmp_path, inp, server, "--completion-window", "2s", "--max-attempts", "5", timeout=60)
    assert proc.returncode == 0, proc.stderr

    assert_all_echoed(read_lines(tmp_path / "input.results.jsonl"), rows)
    batches = remote_batches(server)
    statuses = [b.status for b in batches]
    assert "expired" in statuses, statuses
    assert len(batches) >= 2
    expired = [b for b in batches if b.status == "expired"]
    # Only the rows the expired batches did not run went again (the server counts those as
    # failed; nothing else fails on this server).
    cut_off = sum(b.request_counts.total - b.request_counts.completed for b in expired)
    assert cut_off > 0
    assert len(sent_custom_ids(server)) == 120 + cut_off


# -- 5: Ctrl+C, cancel, resume ----------------------------------------------------------------


@pytest.mark.parametrize("attempts", [[], ["--max-attempts", "1"]], ids=["default-attempts", "one-attempt"])
def test_interrupt_cancel_and_resume(server_factory, tmp_path: Path, attempts: list[str]) -> None:  # type: ignore[no-untyped-def]
    """A user's cancel does not use up the cut-off rows' attempts: resume runs them."""
    # 100 rows, 2 at a time, 0.3 s each: the batch runs ~15 s, long enough for Ctrl+C, `jobs` and
    # `cancel` (each a new process: seconds on a loaded machine) to reach it while it runs.
    server = server_factory("--echo-latency", "0.3", "--max-concurrency", "2")
    rows = [chat_line(i) for i in range(100)]
    inp = write_input(tmp_path, rows)
    cmd = [
        *CLI,
        "run",
        str(inp),
        "--provider",
        "openai",
        "--base-url",
        server.base_url,
        *POLL,
        "--keep-uploads",
        *attempts,
    ]
    first = subprocess.Popen(cmd, env=cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:

        def running_with_progress() -> Any:
            found = [b for b in remote_batches(server) if b.status == "in_progress" and b.request_counts.completed]
            return found[0] if found else None

        batch = wait_for(running_with_progress, 30, "a batch in progress with completed rows")

        first.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        _out, err = first.communicate(timeout=10)
        took = time.monotonic() - t0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 130, err
    assert took < 2.5, f"Ctrl+C took {took:.1f}s"
    assert "resume" in err

    jobs = llmbatch(tmp_path, "jobs")
    assert jobs.returncode == 0, jobs.stderr
    job_id = jobs.stdout.split()[0]
    assert job_id == job_dir_of(tmp_path).name

    cancelled = llmbatch(tmp_path, "cancel", job_id, timeout=60)
    assert cancelled.returncode == 0, cancelled.stderr
    remote = server.client().batches.retrieve(batch.id)
    assert remote.status == "cancelled"
    assert 0 < remote.request_counts.completed < 100

    resumed = llmbatch(tmp_path, "resume", job_id, timeout=60)
    assert resumed.returncode == 0, resumed.stderr
    out = read_lines(tmp_path / "input.results.jsonl")
    assert_all_echoed(out, rows)
    # Rows the cancelled batch finished were kept, not sent again.
    sent = sent_custom_ids(server)
    assert sorted(set(sent)) == sorted(r["custom_id"] for r in rows)
    assert len(sent) == 100 + (100 - remote.request_counts.completed)
    assert all(b.status in TERMINAL for b in remote_batches(server))


def test_a_second_process_leaves_a_running_job_alone(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # ~13 rows/s: about 12 s, so the two other runs below start and stop while it runs even on a
    # loaded machine (the suite runs in parallel).
    server = server_factory("--echo-latency", "0.15", "--max-concurrency", "2")
    rows = [chat_line(i) for i in range(160)]
    inp = write_input(tmp_path, rows)
    cmd = [*CLI, "run", str(inp), "--provider", "openai", "--base-url", server.base_url, *POLL, "--keep-uploads"]
    first = subprocess.Popen(
        [*cmd, "--batch-size", "40", "--max-in-flight", "1"], env=cli_env(tmp_path),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: remote_batches(server), 30, "the first batch")
        # Neither a dry run (which plans chunks) nor a real run may touch the job meanwhile.
        for extra in (["--dry-run"], []):
            second = llmbatch(tmp_path, *cmd[3:], "--batch-size", "7", *extra)
            assert second.returncode == 2, (extra, second.stdout, second.stderr)
            assert "already running" in second.stderr
            assert "Estimate" not in second.stderr and second.stdout == ""
        assert first.poll() is None, "the first run ended too soon for this test: make it longer"
        _out, err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, err
    assert_all_echoed(read_lines(tmp_path / "input.results.jsonl"), rows)
    assert sorted(b.request_counts.total for b in remote_batches(server)) == [40, 40, 40, 40]
    assert sorted(sent_custom_ids(server)) == sorted(r["custom_id"] for r in rows)


# -- 6: the budget stops the job; a larger budget finishes it ---------------------------------


def test_budget_stop_then_resume_with_larger_budget(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = server_factory()
    # Replies are cut at max_tokens (the text is longer), and input is free: the estimate of
    # each chunk is exact, 100 rows x 10 tokens x $10 per 1M = $0.01.
    long_text = " ".join(f"word{i}" for i in range(40))
    rows = [chat_line(i, f"{i} {long_text}", max_tokens=10) for i in range(500)]
    inp = write_input(tmp_path, rows)
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"gpt-4o-mini": {"input": 0, "output": 20, "batch_input": 0, "batch_output": 10}}))
    args = ["--batch-size", "100", "--price-file", str(prices)]

    proc = run_openai(tmp_path, inp, server, *args, "--max-cost", "0.015")
    assert proc.returncode == 3, proc.stderr
    assert "budget" in proc.stderr

    out = read_lines(tmp_path / "input.results.jsonl")
    assert [r["custom_id"] for r in out] == [r["custom_id"] for r in rows]
    for i, rec in enumerate(out):
        if i < 100:
            assert rec["response"]["status_code"] == 200, rec
        else:
            assert rec["response"] is None and rec["error"]["code"] == "not_run", rec
    assert len(remote_batches(server)) == 1
    assert sorted(sent_custom_ids(server)) == sorted(r["custom_id"] for r in rows[:100])

    status = json.loads(llmbatch(tmp_path, "status", job_dir_of(tmp_path).name, "--json").stdout)
    assert status["status"] == "budget_stopped"
    assert status["usage"]["cost"] == pytest.approx(0.01)

    again = run_openai(tmp_path, inp, server, *args, "--max-cost", "1")
    assert again.returncode == 0, again.stderr
    assert "resuming job" in again.stderr
    out = read_lines(tmp_path / "input.results.jsonl")
    assert [r["custom_id"] for r in out] == [r["custom_id"] for r in rows]
    assert all(r["response"]["status_code"] == 200 for r in out)
    assert all(content(r) for r in out)
    assert len(remote_batches(server)) == 5
    sent = sent_custom_ids(server)
    assert sorted(sent) == sorted(r["custom_id"] for r in rows)  # nothing sent twice


def test_rows_with_long_prompts_are_priced_at_the_long_prompt_rates(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A model dearer above 200k prompt tokens: the estimate, the chunk's estimated cost and
    the spend recorded from the results each price the long row at those rates, the short
    row at the base ones (never the whole chunk's sum at either)."""
    server = server_factory()
    long_text = " hello" * 200_050
    rows = [chat_line(0, "hi there", max_tokens=4), chat_line(1, long_text, max_tokens=4)]
    inp = write_input(tmp_path, rows)
    rates = {"input": 1.0, "output": 2.0, "batch_input": 1.0, "batch_output": 2.0}
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"gpt-4o-mini": {**rates, "above_200k": {k: v * 10 for k, v in rates.items()}}}))

    proc = run_openai(tmp_path, inp, server, "--price-file", str(prices))
    assert proc.returncode == 0, proc.stderr
    assert "1 with prompts over 200,000 tokens" in proc.stderr
    out = read_lines(tmp_path / "input.results.jsonl")
    usage = [r["response"]["body"]["usage"] for r in out]
    assert usage[1]["prompt_tokens"] > 200_000 >= usage[0]["prompt_tokens"]
    spent = [(u["prompt_tokens"] * 1.0 + u["completion_tokens"] * 2.0) / 1e6 for u in usage]
    spent[1] *= 10
    status = json.loads(llmbatch(tmp_path, "status", job_dir_of(tmp_path).name, "--json").stdout)
    assert status["usage"]["cost"] == pytest.approx(sum(spent))
    db = sqlite3.connect(job_dir_of(tmp_path) / "job.sqlite")
    try:
        ((est_cost,),) = db.execute("SELECT est_cost FROM chunks").fetchall()
        est = db.execute("SELECT est_input, est_output FROM rows ORDER BY idx").fetchall()
    finally:
        db.close()
    assert est_cost == pytest.approx((est[0][0] + 2 * est[0][1]) / 1e6 + 10 * (est[1][0] + 2 * est[1][1]) / 1e6)


def test_enqueued_token_limit_spreads_chunks_and_passes_rows_larger_than_it(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = server_factory()
    rows = [chat_line(i) for i in range(12)]  # 10 input tokens each (chat counting rule)
    rows.append(chat_line(12, " ".join(["word"] * 60)))  # about 70 tokens: more than the limit alone
    inp = write_input(tmp_path, rows)

    proc = run_openai(tmp_path, inp, server, "--max-enqueued-tokens", "40", timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert_all_echoed(read_lines(tmp_path / "input.results.jsonl"), rows)
    assert sorted(b.request_counts.total for b in remote_batches(server)) == [1, 4, 4, 4]
    assert_one_batch_at_a_time(tmp_path)  # 4 rows (40 tokens) fill the limit
    assert sorted(sent_custom_ids(server)) == sorted(r["custom_id"] for r in rows)


# -- 7: invalid rows --------------------------------------------------------------------------


def test_invalid_rows_stop_the_job_unless_skipped(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = server_factory()
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

    proc = run_openai(tmp_path, inp, server)
    assert proc.returncode == 2, proc.stderr
    assert "input.jsonl:3" in proc.stderr
    assert "input.jsonl:5" in proc.stderr
    assert "--skip-invalid" in proc.stderr
    assert remote_batches(server) == []
    assert not (tmp_path / "input.results.jsonl").exists()

    proc = run_openai(tmp_path, inp, server, "--skip-invalid")
    assert proc.returncode == 1, proc.stderr
    out = read_lines(tmp_path / "input.results.jsonl")
    assert len(out) == 6
    for n in (0, 1, 3, 5):  # the valid rows
        assert out[n]["response"]["status_code"] == 200, out[n]
    assert [content(out[n]) for n in (0, 1, 3, 5)] == ["hello 0", "hello 1", "hello 2", "hello 3"]
    assert out[2]["response"] is None and out[4]["response"] is None
    errors = read_lines(tmp_path / "input.errors.jsonl")
    assert len(errors) == 2
    assert errors[0]["error"]["message"].startswith("input.jsonl:3:"), errors[0]
    assert "JSON" in errors[0]["error"]["message"]
    assert errors[1]["custom_id"] == "row-1"
    assert errors[1]["error"]["message"].startswith("input.jsonl:5:"), errors[1]
    assert "input.jsonl:2" in errors[1]["error"]["message"]  # where the custom_id was first used
    assert sorted(sent_custom_ids(server)) == ["row-0", "row-1", "row-2", "row-3"]


# -- 8: dry run, status, jobs, results, re-running a finished job ------------------------------


def test_dry_run_status_jobs_results_and_rerun(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = server_factory()
    rows = [chat_line(i) for i in range(50)]
    inp = write_input(tmp_path, rows)
    out_path = tmp_path / "out" / "results.jsonl"
    out_path.parent.mkdir()

    dry = run_openai(tmp_path, inp, server, "--batch-size", "20", "-o", str(out_path), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    planned = [line for line in dry.stdout.splitlines() if re.search(r"-c\d{5}: \d+ rows", line)]
    assert [re.search(r": (\d+) rows", p).group(1) for p in planned] == ["20", "20", "10"]  # type: ignore[union-attr]
    assert remote_batches(server) == []
    assert not out_path.exists()

    run = run_openai(tmp_path, inp, server, "--batch-size", "20", "-o", str(out_path))
    assert run.returncode == 0, run.stderr
    assert_all_echoed(read_lines(out_path), rows)
    assert len(remote_batches(server)) == 3
    job_id = job_dir_of(tmp_path).name

    status = llmbatch(tmp_path, "status", job_id, "--json")
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["id"] == job_id and data["status"] == "finished"
    assert data["rows"] == {"pending": 0, "queued": 0, "succeeded": 50, "failed": 0, "invalid": 0}
    assert data["batches"] == {"collected": 3}
    assert data["usage"]["input_tokens"] > 0

    jobs = llmbatch(tmp_path, "jobs")
    assert jobs.returncode == 0
    assert job_id in jobs.stdout and "50/50 succeeded" in jobs.stdout

    before = out_path.read_bytes()
    out_path.unlink()
    res = llmbatch(tmp_path, "results", job_id)
    assert res.returncode == 0, res.stderr
    assert out_path.read_bytes() == before

    waited = llmbatch(tmp_path, "wait", job_id)
    assert waited.returncode == 0, waited.stderr

    t0 = time.monotonic()
    rerun = run_openai(tmp_path, inp, server, "--batch-size", "20", "-o", str(out_path))
    took = time.monotonic() - t0
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming job" in rerun.stderr
    assert took < 10
    assert len(remote_batches(server)) == 3
    assert out_path.read_bytes() == before


def test_refused_submission_stops_the_run_and_resumes_after_the_fix(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A batch creation the provider refuses for good (HTTP 400) ends the run with exit 2 and the
    provider's message, instead of retrying forever; fixed flags resume the same job, reusing
    the upload and creating exactly one batch."""
    server = server_factory()  # accepts only the 24h window
    rows = [chat_line(i) for i in range(20)]
    inp = write_input(tmp_path, rows)

    proc = run_openai(tmp_path, inp, server, "--completion-window", "2s", timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert "completion_window" in proc.stderr and "400" in proc.stderr
    assert remote_batches(server) == []

    proc = run_openai(tmp_path, inp, server, "--completion-window", "24h", timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "resuming job" in proc.stderr
    assert_all_echoed(read_lines(tmp_path / "input.results.jsonl"), rows)
    (batch,) = remote_batches(server)
    assert batch.completion_window == "24h"
    with server.client() as c:
        uploads = list(c.files.list(purpose="batch"))
    assert [f.id for f in uploads] == [batch.input_file_id]  # the first run's upload, reused
    assert sorted(sent_custom_ids(server)) == sorted(r["custom_id"] for r in rows)


# -- 9: the local provider --------------------------------------------------------------------


def test_local_provider(tmp_path: Path) -> None:
    rows = [chat_line(i, f"local {i}") for i in range(500)]
    inp = write_input(tmp_path, rows)
    proc = llmbatch(tmp_path, "run", str(inp), "--provider", "local", *POLL, "--batch-size", "200")
    assert proc.returncode == 0, proc.stderr
    assert_all_echoed(read_lines(tmp_path / "input.results.jsonl"), rows)
    data = json.loads(llmbatch(tmp_path, "status", job_dir_of(tmp_path).name, "--json").stdout)
    assert data["rows"]["succeeded"] == 500
    assert data["batches"] == {"collected": 3}


# -- 10: configuration errors -----------------------------------------------------------------


def test_openai_provider_without_a_key(tmp_path: Path) -> None:
    inp = write_input(tmp_path, [chat_line(0)])
    proc = llmbatch(
        tmp_path, "run", str(inp), "--provider", "openai", "--base-url", "http://127.0.0.1:9/v1", *POLL, key=False
    )
    assert proc.returncode == 2, proc.stderr
    assert "OPENAI_API_KEY" in proc.stderr
    assert not (tmp_path / "input.results.jsonl").exists()
