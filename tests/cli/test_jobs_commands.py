"""`llmbatch jobs`, `jobs rm` and `jobs prune`, and that failed first runs leave no job behind:
real CLI subprocesses, their own LLMBATCH_HOME, a real `llmbatch serve` for remote batches."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner, Result

from conftest import chat_line, jsonl
from llmbatch.cli import cli

CLI = [sys.executable, "-m", "llmbatch"]
POLL = ["--poll-interval", "0.05"]


def env_for(tmp_path: Path, *, key: bool = True) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env["LLMBATCH_HOME"] = str(tmp_path / "home")
    if key:
        env["OPENAI_API_KEY"] = "test"
    return env


def llmbatch(tmp_path: Path, *args: str, key: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env_for(tmp_path, key=key), capture_output=True, text=True, timeout=120)


def jobs_command(tmp_path: Path, *args: str) -> Result:
    """`llmbatch jobs ARGS` in this process (these commands read stores and call no provider):
    a subprocess each would cost seconds on a loaded machine."""
    return CliRunner().invoke(cli, ["jobs", *args], env={"LLMBATCH_HOME": str(tmp_path / "home")})


def listed(tmp_path: Path) -> dict[str, str]:
    """Job id -> its line in `llmbatch jobs`."""
    result = jobs_command(tmp_path)
    assert result.exit_code == 0, result.output
    return {ln.split()[0]: ln for ln in result.stdout.splitlines()}


def submitted(tmp_path: Path) -> list[str]:
    """The batch ids the (only) job's store records as submitted."""
    for db in (tmp_path / "home" / "jobs").glob("*/job.sqlite"):
        con = sqlite3.connect(db, timeout=5)
        try:
            return [b for (b,) in con.execute("SELECT batch_id FROM chunks WHERE state='submitted'")]
        except sqlite3.OperationalError:
            return []  # the schema not made yet
        finally:
            con.close()
    return []


def test_failed_first_runs_leave_no_job(tmp_path: Path) -> None:
    """A missing key, an engine missing its options, invalid rows: exit 2, and `jobs` stays empty,
    so the next run of the same file is a new job, not a resumed one."""
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(jsonl([chat_line(0)]))
    unreachable = "http://127.0.0.1:9/v1"
    no_key = llmbatch(tmp_path, "run", str(inp), "--provider", "openai", "--base-url", unreachable, key=False)
    assert no_key.returncode == 2 and "OPENAI_API_KEY" in no_key.stderr, no_key.stderr
    no_upstream = llmbatch(tmp_path, "run", str(inp), "--engine", "openai")
    assert no_upstream.returncode == 2 and "--upstream-url" in no_upstream.stderr, no_upstream.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(jsonl([chat_line(0)]) + b'{"custom_id": 3}\n')
    invalid = llmbatch(tmp_path, "run", str(bad))
    assert invalid.returncode == 2 and "1 invalid row" in invalid.stderr, invalid.stderr
    assert listed(tmp_path) == {}

    ok = llmbatch(tmp_path, "run", str(inp), *POLL)
    assert ok.returncode == 0, ok.stderr
    assert "new job" in ok.stderr and "resuming" not in ok.stderr


def test_rm_refuses_batches_still_running_remotely_and_prune_keeps_them(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # One remote batch of 20 rows at 0.5 s each, one at a time: ~10 s, still running when the
    # client is killed, so the job's store holds it as in progress.
    server = server_factory("--echo-latency", "0.5", "--max-concurrency", "1")
    slow = tmp_path / "slow.jsonl"
    slow.write_bytes(jsonl([chat_line(i) for i in range(20)]))
    cmd = [*CLI, "run", str(slow), "--provider", "openai", "--base-url", server.base_url, *POLL]
    client = subprocess.Popen(cmd, env=env_for(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not submitted(tmp_path):  # recorded in the job's store, not only created at the server
            assert time.monotonic() < deadline, "no batch was submitted"
            time.sleep(0.05)
    finally:
        client.send_signal(signal.SIGKILL)
        client.wait(10)
    (batch,) = list(server.client().batches.list())

    done = tmp_path / "done.jsonl"
    done.write_bytes(jsonl([chat_line(i) for i in range(3)]))
    assert llmbatch(tmp_path, "run", str(done), *POLL).returncode == 0
    unsent = tmp_path / "unsent.jsonl"
    unsent.write_bytes(jsonl([chat_line(i) for i in range(3)]))
    assert llmbatch(tmp_path, "run", str(unsent), "--dry-run").returncode == 0  # read and planned, never sent

    jobs = listed(tmp_path)
    assert len(jobs) == 3
    (killed,) = [j for j, line in jobs.items() if "slow.jsonl" in line]
    (finished,) = [j for j, line in jobs.items() if "done.jsonl" in line]
    (planned,) = [j for j, line in jobs.items() if "unsent.jsonl" in line]
    assert jobs[killed].split()[3] == "stopped", jobs[killed]  # no process runs it any more
    assert jobs[finished].split()[3] == "finished", jobs[finished]

    fresh = jobs_command(tmp_path, "prune")  # default: idle for 7 days
    assert fresh.exit_code == 0 and "removed 0 jobs" in fresh.stderr, fresh.output
    pruned = jobs_command(tmp_path, "prune", "--older-than", "0s")
    assert pruned.exit_code == 0, pruned.output
    assert f"removed job {finished} (finished" in pruned.stderr
    assert f"removed job {planned} (never sent" in pruned.stderr
    assert "removed 2 jobs" in pruned.stderr
    assert list(listed(tmp_path)) == [killed]
    assert done.with_suffix(".results.jsonl").exists()  # the results next to the input stay

    refused = jobs_command(tmp_path, "rm", killed)
    assert refused.exit_code == 2, refused.output
    assert batch.id in refused.stderr and f"llmbatch cancel {killed}" in refused.stderr and "--force" in refused.stderr
    assert list(listed(tmp_path)) == [killed]

    forced = jobs_command(tmp_path, "rm", "--force", killed, "job_0000000000000000")
    assert forced.exit_code == 2, forced.output  # the second id is no job: said, after removing the first
    assert f"removed job {killed}" in forced.stderr and f"left running at the provider: {batch.id}" in forced.stderr
    assert "no job 'job_0000000000000000'" in forced.stderr
    assert listed(tmp_path) == {}
    assert server.client().batches.retrieve(batch.id).status != "cancelled"  # left running, as said


def test_run_forwards_through_the_openai_engine_with_its_upstream_options(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`run --engine openai` takes --upstream-url and --upstream-api-key (a real upstream: an
    echo `llmbatch serve` that wants that key); the key is not stored with the job."""
    key = "upstream-key-not-to-be-stored"
    upstream = server_factory(keys=[key])
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(jsonl([chat_line(i) for i in range(3)]))
    proc = subprocess.run(
        [*CLI, "run", str(inp), "--engine", "openai", "--upstream-url", upstream.base_url, *POLL],
        env={**env_for(tmp_path), "LLMBATCH_UPSTREAM_API_KEY": key}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    answers = [line for line in inp.with_suffix(".results.jsonl").read_text().splitlines() if line]
    assert len(answers) == 3 and all('"status_code": 200' in a or '"status_code":200' in a for a in answers)
    (job_dir,) = (tmp_path / "home" / "jobs").iterdir()
    stored = b"".join(p.read_bytes() for p in job_dir.glob("job.sqlite*"))
    assert key.encode() not in stored
