"""Fault injection: SIGKILL `llmbatch run` at many random moments, restart it until it finishes.

Afterwards every row is in the output exactly once, in input order, and the server holds
exactly one batch per chunk the job planned: nothing was lost and nothing was paid twice.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from pathlib import Path

import pytest

from conftest import chat_line, jsonl, kill_then_finish


def _run_cmd(inp: Path, server, home: Path) -> tuple[list[str], dict[str, str]]:  # type: ignore[no-untyped-def]
    cmd = [
        sys.executable, "-m", "llmbatch", "run", str(inp), "--provider", "openai", "--base-url", server.base_url,
        "--batch-size", "100", "--max-in-flight", "3", "--poll-interval", "0.05",
    ]  # fmt: skip
    env = {**os.environ, "LLMBATCH_HOME": str(home), "OPENAI_API_KEY": "test"}
    return cmd, env


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing_and_pays_nothing_twice(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rows = 2000
    server = server_factory("--echo-latency", "0.03", "--max-concurrency", "8", "--echo-fail-rate", "0.02")
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(jsonl([chat_line(i) for i in range(rows)]))
    home = tmp_path / "home"
    cmd, env = _run_cmd(inp, server, home)
    kills = kill_then_finish(cmd, env, attempts=25, seed=1234, pause=(0.05, 0.8), timeout=180)

    out = [json.loads(line) for line in (tmp_path / "input.results.jsonl").read_text().splitlines()]
    assert [r["custom_id"] for r in out] == [f"row-{i}" for i in range(rows)]
    assert all(r["response"]["status_code"] == 200 for r in out)
    assert all(r["response"]["body"]["choices"][0]["message"]["content"] == f"hello {i}" for i, r in enumerate(out))

    # Exactly one remote batch per planned chunk, and no other batches.
    (job_dir,) = (home / "jobs").iterdir()
    db = sqlite3.connect(job_dir / "job.sqlite")
    planned = {tag for (tag,) in db.execute("SELECT tag FROM chunks")}
    recorded = {bid for (bid,) in db.execute("SELECT batch_id FROM chunks")}
    remote = list(server.client().batches.list(limit=100))
    tags = [b.metadata["llmbatch_chunk"] for b in remote]
    assert len(tags) == len(set(tags)), "a chunk got two remote batches"
    assert set(tags) == planned
    assert {b.id for b in remote} == recorded
    found = [m for (m,) in db.execute("SELECT message FROM events WHERE message LIKE '%found%'")]
    print(f"{kills} kills; reconciliations: {found}")
