"""--direct-below: the last few pending rows go through the direct API, not another batch."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import chat_line, jsonl
from llmbatch.jobs import line_id


def run_direct_below(tmp_path: Path, base_url: str, rows: int, *args: str) -> subprocess.CompletedProcess[str]:
    """`llmbatch run` of `rows` chat rows with `--direct-below 100` and `args`; it must exit 0."""
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(jsonl([chat_line(i) for i in range(rows)]))
    env = {**os.environ, "LLMBATCH_HOME": str(tmp_path / "home"), "OPENAI_API_KEY": "k"}
    cmd = [sys.executable, "-m", "llmbatch", "run", str(inp), "--provider", "openai", "--base-url", base_url,
           "--poll-interval", "0.05", "--direct-below", "100", *args]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


def test_retries_below_threshold_use_the_direct_api(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = server_factory("--echo-fail-rate", "0.2")
    done = run_direct_below(tmp_path, server.base_url, 200, "--max-attempts", "8")
    assert "direct API" in done.stderr
    out = [json.loads(line) for line in (tmp_path / "in.results.jsonl").read_text().splitlines()]
    assert [r["custom_id"] for r in out] == [f"row-{i}" for i in range(200)]
    assert all(r["response"]["status_code"] == 200 for r in out)
    assert len(list(server.client().batches.list())) == 1  # the failed rows did not make a second batch
    metrics = server.http().get("/metrics").text
    direct = sum(
        int(float(n))
        for n in re.findall(r'endpoint="/v1/chat/completions",source="direct",status="200"\} ([\d.]+)', metrics)
    )
    (job_dir,) = (tmp_path / "home" / "jobs").iterdir()
    # Rows answered directly carry no batch's line id: theirs is derived from the job and the row.
    answered_directly = sum(1 for i, r in enumerate(out) if r["id"] == line_id(job_dir.name, i))
    assert direct == answered_directly > 0


def test_a_job_larger_than_the_threshold_goes_in_batches_only(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """150 rows in chunks of 100 with --direct-below 100: both chunks are batches. The first chunk
    goes out before the second is planned, and the 50 rows left then are still part of the job's
    first round, not "the last few" for the direct API (which costs about twice as much)."""
    server = server_factory()
    done = run_direct_below(tmp_path, server.base_url, 150, "--batch-size", "100")
    assert "direct API" not in done.stderr
    assert sorted(b.request_counts.total for b in server.client().batches.list()) == [50, 100]
    out = [json.loads(line) for line in (tmp_path / "in.results.jsonl").read_text().splitlines()]
    (job_dir,) = (tmp_path / "home" / "jobs").iterdir()
    assert all(r["id"] != line_id(job_dir.name, i) for i, r in enumerate(out))  # every row answered in a batch
