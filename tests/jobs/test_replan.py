"""Changing chunking limits between runs re-plans only the chunks not sent yet."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from conftest import chat_line, jsonl
from llmbatch.providers._openai import tagged_filename


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


def test_smaller_limits_replan_a_chunk_uploaded_but_never_created(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A run killed between uploading a chunk and creating its batch leaves the chunk `uploaded`:
    run again with a smaller --batch-size, it is re-planned (no batch can carry its tag, as none
    was asked for) and its upload deleted. A chunk whose create was sent (the answer lost, and no
    batch found for it) keeps its plan: it might have been accepted."""
    server = server_factory()
    rows = [chat_line(i) for i in range(500)]
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(jsonl(rows))
    env = {**os.environ, "LLMBATCH_HOME": str(tmp_path / "home"), "OPENAI_API_KEY": "k"}
    base = [sys.executable, "-m", "llmbatch", "run", str(inp), "--provider", "openai", "--base-url", server.base_url,
            "--poll-interval", "0.05"]  # fmt: skip
    dry = subprocess.run([*base, "--batch-size", "100", "--dry-run"], env=env, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr

    # What the killed runs left: chunk 1 uploaded; chunk 2 uploaded and its create sent.
    client = server.client()
    (job_dir,) = (tmp_path / "home" / "jobs").iterdir()
    db = sqlite3.connect(job_dir / "job.sqlite")
    tags = [t for (t,) in db.execute("SELECT tag FROM chunks ORDER BY id")]
    first, second = (
        client.files.create(file=(tagged_filename(tag), jsonl(rows[i * 100 : i * 100 + 100])), purpose="batch")
        for i, tag in enumerate(tags[:2])
    )
    with db:
        db.execute("UPDATE chunks SET state='uploaded', file_id=? WHERE tag=?", (first.id, tags[0]))
        db.execute(
            "UPDATE chunks SET state='creating', file_id=?, intent_at=? WHERE tag=?",
            (second.id, int(time.time()), tags[1]),
        )
        db.execute(
            "INSERT INTO events (at, kind, chunk_id, message) SELECT ?, 'creating', id, '' FROM chunks WHERE tag=?",
            (time.time(), tags[1]),
        )
    db.close()

    done = subprocess.run([*base, "--batch-size", "50"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    batches = list(client.batches.list())
    assert sorted(b.request_counts.total for b in batches) == [50] * 8 + [100]
    assert sum(b.input_file_id == second.id for b in batches) == 1  # chunk 2 as planned
    assert len((tmp_path / "in.results.jsonl").read_text().splitlines()) == 500
    assert tagged_filename(tags[0]) not in {f.filename for f in client.files.list()}, "chunk 1's upload was kept"


def test_an_upload_refused_as_too_large_is_split(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A server that takes smaller files than the provider's limits say (an llmbatch server with
    --max-file-size: 413 file_too_large) refuses a chunk's upload. Nothing was stored, so the
    chunk is split until its pieces fit, and every row runs once."""
    server = server_factory("--max-file-size", "4000")
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(jsonl([chat_line(i) for i in range(100)]))  # ~14 KB
    env = {**os.environ, "LLMBATCH_HOME": str(tmp_path / "home"), "OPENAI_API_KEY": "k"}
    cmd = [sys.executable, "-m", "llmbatch", "run", str(inp), "--provider", "openai", "--base-url", server.base_url,
           "--poll-interval", "0.05"]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "refused as too large" in done.stderr and "accepts at most 4000" in done.stderr
    batches = list(server.client().batches.list())
    assert len(batches) > 3 and sum(b.request_counts.total for b in batches) == 100
    out = [json.loads(line)["custom_id"] for line in (tmp_path / "in.results.jsonl").read_text().splitlines()]
    assert out == [f"row-{i}" for i in range(100)]
