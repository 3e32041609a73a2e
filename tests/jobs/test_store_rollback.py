"""Exactly-once does not depend on the job store being intact: `llmbatch run` killed mid-way,
its store's WAL cut to nothing (every transaction since the last checkpoint lost), and run
again against the same real `llmbatch serve` ends with one batch per chunk tag and every row
sent and answered once."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import chat_line, jsonl, read_jsonl


@pytest.mark.slow
def test_a_run_after_its_wal_was_cut_adopts_the_batches_instead_of_sending_them_again(
    server_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    server = server_factory("--echo-latency", "0.05", "--max-concurrency", "2")
    rows = [chat_line(i) for i in range(60)]
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(jsonl(rows))
    env = {**os.environ, "LLMBATCH_HOME": str(tmp_path / "home"), "OPENAI_API_KEY": "k"}
    cmd = [
        sys.executable,
        "-m",
        "llmbatch",
        "run",
        str(inp),
        "--provider",
        "openai",
        "--base-url",
        server.base_url,
        "--batch-size",
        "10",
        "--max-in-flight",
        "1",
        "--poll-interval",
        "0.05",
        "--keep-uploads",
    ]  # fmt: skip (uploads kept: the test reads what was sent)
    client = server.client()

    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(client.batches.list(limit=100).data) < 3:
        assert first.poll() is None, "the first run ended before it could be killed: make it longer"
        assert time.monotonic() < deadline, "no third batch within 60 s"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait(10)

    (job_dir,) = (tmp_path / "home" / "jobs").iterdir()
    wal = job_dir / "job.sqlite-wal"
    assert wal.exists() and wal.stat().st_size > 0, "the store's recent transactions were in its WAL"
    wal.write_bytes(b"")  # a disk or copy going wrong: every transaction since the last checkpoint lost
    (job_dir / "job.sqlite-shm").unlink(missing_ok=True)

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr

    batches = client.batches.list(limit=100).data
    per_tag = collections.Counter(b.metadata["llmbatch_chunk"] for b in batches)
    assert per_tag and set(per_tag.values()) == {1}, per_tag
    sent = [r["custom_id"] for b in batches for r in read_jsonl(client, b.input_file_id)]
    assert sorted(sent) == sorted(r["custom_id"] for r in rows), collections.Counter(sent).most_common(3)
    out = [json.loads(line) for line in inp.with_name("in.results.jsonl").read_text().splitlines()]
    assert [o["custom_id"] for o in out] == [r["custom_id"] for r in rows]
    assert all(o["response"]["status_code"] == 200 for o in out)
