"""A long batch gets its estimated time in the server log: rows x their max_tokens / the engine's
measured output tokens/s (issue 16: 1,000 open-ended rows on a CPU model ran for hours unsaid)."""

from __future__ import annotations

import re
from typing import Any

from conftest import chat_line, run_batch


def test_a_long_batch_is_estimated_in_the_log_and_a_short_one_is_not(server_factory: Any) -> None:
    # One row at a time, 0.1 s each: a slow engine of a few tokens/s, measured on the rows.
    srv = server_factory("--engine", "echo", "--echo-latency", "0.1", "--max-concurrency", "1")
    client = srv.client()
    short = run_batch(client, [chat_line(i, f"short question {i}", max_tokens=8) for i in range(30)])
    long_rows = [chat_line(i, f"long question {i}", max_tokens=4000) for i in range(5)]
    long_rows += [chat_line(i, f"open question {i}") for i in range(5, 8)]  # no max_tokens
    long = run_batch(client, long_rows)
    assert short.status == long.status == "completed"
    log = srv.log()
    assert f"batch {short.id}: 30 rows" not in log  # 30 rows of at most 8 tokens: seconds
    estimate = r"8 rows, up to ([\d,]+) output tokens \((.*?)\); at the ([\d.,]+) tokens/s measured"
    said = re.search(rf"batch {long.id}: {estimate} on this engine: up to [\d.]+ (min|h)", log)
    assert said, log
    # 5 x 4,000 capped plus 3 rows at the measured mean (a few tokens each: echo repeats the question)
    assert 20_000 < int(said.group(1).replace(",", "")) < 20_100
    assert said.group(2).startswith("3 rows without max_tokens")
    assert 1 < float(said.group(3).replace(",", "")) < 500
