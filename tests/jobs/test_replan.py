"""Changing chunking limits between runs re-plans only the chunks not sent yet."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import chat_line, jsonl


def test_new_batch_size_replans_unsent_chunks(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = server_factory()
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(jsonl([chat_line(i) for i in range(500)]))
    env = {**os.environ, "LLMBATCH_HOME": str(tmp_path / "home"), "OPENAI_API_KEY": "k"}
    base = [sys.executable, "-m", "llmbatch", "run", str(inp), "--provider", "openai", "--base-url", server.base_url,
            "--poll-interval", "0.05"]  # fmt: skip

    dry = subprocess.run([*base, "--batch-size", "100", "--dry-run"], env=env, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count(": 100 rows") == 5  # five chunks planned, none sent

    same = subprocess.run([*base, "--batch-size", "100", "--dry-run"], env=env, capture_output=True, text=True)
    assert same.stdout.count(": 100 rows") == 5 and "re-planning" not in same.stderr  # same limits: same plan

    done = subprocess.run([*base, "--batch-size", "250"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "re-planning 5 chunks" in done.stderr
    batches = list(server.client().batches.list())
    assert sorted(b.request_counts.total for b in batches) == [250, 250]
    assert len((tmp_path / "in.results.jsonl").read_text().splitlines()) == 500
