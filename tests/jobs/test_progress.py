"""The progress of a running job, as a user sees it: the live line on a terminal (through a
pseudo-terminal), the plain log lines elsewhere, Ctrl+C on the local provider, the budget line.

The local provider's echo engine is slowed (`--echo-latency`): its 64 rows in flight finish
together, a wave a second, so a batch of 192 rows runs ~3 s with its counts at 64 and 128 in
between; the figures asserted are any strictly between 0 and N, never a timing.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time
from pathlib import Path

from test_run_cli import CLI, POLL, cli_env, llmbatch, read_lines, write_input

from conftest import chat_line, jsonl

ROWS = 192
SLOW = ["--provider", "local", "--engine", "echo", "--echo-latency", "1.0", *POLL]
FIGURE = re.compile(rf"(\d+)/{ROWS} rows done")


def figures(text: str) -> list[int]:
    return [int(n) for n in FIGURE.findall(text)]


def test_live_line_moves_as_rows_finish_on_a_terminal(tmp_path: Path) -> None:
    inp = write_input(tmp_path, [chat_line(i) for i in range(ROWS)])
    primary, secondary = pty.openpty()
    # A wide terminal: the line is not wrapped (rich would fold it at 80 columns).
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 250, 0, 0))
    env = {**cli_env(tmp_path), "TERM": "xterm-256color", "COLUMNS": "250"}
    proc = subprocess.Popen(
        [*CLI, "run", str(inp), *SLOW], env=env, stdin=secondary, stdout=secondary, stderr=secondary, close_fds=True
    )
    os.close(secondary)
    out = b""
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([primary], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(primary, 65536)
                except OSError:  # EIO: the process closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(primary)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    seen = figures(text)
    assert any(0 < n < ROWS for n in seen), f"the live line never moved between 0 and {ROWS}: {sorted(set(seen))}"
    assert re.search(r"ETA \d+m\d\ds", text), "no ETA from the observed rate"
    assert "local: the echo engine answers every row" in text
    assert "_progress.py" not in text  # rich's log would name its own source line beside messages
    assert len(read_lines(tmp_path / "input.results.jsonl")) == ROWS


def test_plain_lines_move_as_rows_finish_off_a_terminal(tmp_path: Path) -> None:
    inp = write_input(tmp_path, [chat_line(i) for i in range(ROWS)])
    proc = llmbatch(tmp_path, "run", str(inp), *SLOW)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if FIGURE.search(line)]
    seen = figures("\n".join(lines))
    assert any(0 < n < ROWS for n in seen), proc.stderr
    assert seen == sorted(seen), proc.stderr  # rows finish; the figure never goes back
    assert any(re.search(r"ETA \d+m\d\ds", line) for line in lines if "in_progress" in line), proc.stderr
    # Not a line a poll: one per tenth of the rows at most, besides the batch's own changes.
    assert len(lines) <= 15, proc.stderr
    assert "local: the echo engine answers every row" in proc.stderr


def test_ctrl_c_on_the_local_provider_says_what_is_true_there(tmp_path: Path) -> None:
    rows = [chat_line(i) for i in range(ROWS)]
    inp = write_input(tmp_path, rows)
    proc = subprocess.Popen(
        [*CLI, "run", str(inp), *SLOW], env=cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    err = ""
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            err += line
            if not line or "in_progress" in line:
                break
        assert "in_progress" in err, err
        proc.send_signal(signal.SIGINT)
        _out, rest = proc.communicate(timeout=30)
        err += rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "remote batches keep running" not in err
    assert "the local server stopped with this run" in err
    job = re.search(r"new job (job_\w+)", err)
    assert job is not None, err
    resumed = llmbatch(tmp_path, "resume", job[1], timeout=90)
    assert resumed.returncode == 0, resumed.stderr
    assert [r["custom_id"] for r in read_lines(tmp_path / "input.results.jsonl")] == [r["custom_id"] for r in rows]


def test_budget_line_is_said_once_a_chunk(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = server_factory()
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(jsonl([chat_line(i, max_tokens=10) for i in range(4)]))
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"gpt-4o-mini": {"input": 1, "output": 1, "batch_input": 1, "batch_output": 1}}))
    proc = llmbatch(
        tmp_path, "run", str(inp), "--provider", "openai", "--base-url", server.base_url, *POLL,
        "--price-file", str(prices), "--max-cost", "0",
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    said = [line for line in proc.stderr.splitlines() if "holding it back" in line]
    assert len(said) == 1, proc.stderr


def test_estimate_on_the_local_provider_is_free_as_in_run(tmp_path: Path) -> None:
    inp = write_input(tmp_path, [chat_line(i, model="SmolLM2-135M-Instruct", max_tokens=10) for i in range(3)])
    for args in ([], ["--provider", "local"]):
        proc = llmbatch(tmp_path, "estimate", str(inp), *args)
        assert proc.returncode == 0, proc.stderr
        assert "Cost: none (the local provider bills nothing)." in proc.stdout, proc.stdout
        assert "UNPRICED" not in proc.stdout and "--price-file" not in proc.stdout, proc.stdout
    # Rows for a priced provider's model are still priced as that provider's when it is named.
    gpt = write_input(tmp_path, [chat_line(0, max_tokens=10)], name="gpt.jsonl")
    proc = llmbatch(tmp_path, "estimate", str(gpt), "--provider", "openai")
    assert proc.returncode == 0 and "Cost: batch $" in proc.stdout, proc.stdout
