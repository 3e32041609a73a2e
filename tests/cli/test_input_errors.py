"""Bad inputs to `llmbatch run` and `llmbatch estimate`: one clear line each, the same from both
commands, exit code 2, and no job left behind (real CLI subprocesses, their own LLMBATCH_HOME)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import chat_line, jsonl

CLI = [sys.executable, "-m", "llmbatch"]


def llmbatch(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env["LLMBATCH_HOME"] = str(tmp_path / "home")
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """stderr without the timestamped progress lines (`[12:00:00] ...`)."""
    return [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("[")]


def no_jobs(tmp_path: Path) -> bool:
    root = tmp_path / "home" / "jobs"
    return not root.exists() or not any(root.iterdir())


@pytest.mark.parametrize("content", ["", "\n\n  \n"], ids=["empty", "blank-lines"])
def test_an_empty_input_is_an_error_from_run_and_estimate(tmp_path: Path, content: str) -> None:
    inp = tmp_path / "empty.jsonl"
    inp.write_text(content)
    for command in ("run", "estimate"):
        proc = llmbatch(tmp_path, command, str(inp))
        assert proc.returncode == 2, (command, proc.stdout, proc.stderr)
        assert error_lines(proc) == [f"error: {inp}: no requests: the file is empty"], proc.stderr
        assert "succeeded" not in proc.stderr
    assert no_jobs(tmp_path)


def test_a_missing_input_is_the_same_one_line_from_run_and_estimate(tmp_path: Path) -> None:
    missing = tmp_path / "missing.jsonl"
    got = {}
    for command in ("run", "estimate"):
        proc = llmbatch(tmp_path, command, str(missing))
        assert proc.returncode == 2, (command, proc.stderr)
        got[command] = error_lines(proc)
        assert "Usage:" not in proc.stderr
    assert got["run"] == got["estimate"] == [f"error: {missing}: cannot read the input file: No such file or directory"]
    assert no_jobs(tmp_path)


def test_a_csv_file_is_said_to_be_not_jsonl_once(tmp_path: Path) -> None:
    csv = tmp_path / "reviews.csv"
    csv.write_text("id,text\n1,great\n2,bad\n3,fine\n")
    for command in ("run", "estimate"):
        proc = llmbatch(tmp_path, command, str(csv))
        assert proc.returncode == 2, (command, proc.stderr)
        (line,) = error_lines(proc)
        assert line.startswith(f"error: {csv}: not JSONL") and "CSV" in line, line
        assert "invalid_json_line" not in proc.stderr
    assert no_jobs(tmp_path)


def test_a_bad_line_names_its_column_not_line_1_and_one_row_is_singular(tmp_path: Path) -> None:
    good = json.dumps(chat_line(0))
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(jsonl([chat_line(1)]) + (good[:-1] + ' "x"}\n').encode() + jsonl([chat_line(2)]))
    proc = llmbatch(tmp_path, "estimate", str(inp))
    assert proc.returncode == 2, proc.stderr
    lines = error_lines(proc)
    (problem,) = [ln for ln in lines if ln.startswith(f"{inp}:2:")]
    assert f"column {len(good) + 1}" in problem and "line 1" not in problem, problem
    assert "1 invalid row (not counted above)" in lines, lines

    proc = llmbatch(tmp_path, "run", str(inp), "--engine", "echo")
    assert proc.returncode == 2, proc.stderr
    assert "error: 1 invalid row; nothing was sent" in proc.stderr, proc.stderr
    assert "3 rows read, 1 invalid" in proc.stderr, proc.stderr
