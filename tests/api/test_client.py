"""The batching client against a real `llmbatch serve` over HTTP: triggers, routing, errors, re-runs."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletion

from llmbatch import BudgetExceeded
from llmbatch.api import AsyncBatchClient, BatchClient, BatchConfig


def _client(server: Any, tmp_path: Path, job: str = "t", **kwargs: Any) -> AsyncBatchClient:
    return AsyncBatchClient(
        job, provider="openai", base_url=server.base_url, api_key="test", job_dir=tmp_path / "jobs", **kwargs
    )


def _ask(client: AsyncBatchClient, text: str, max_tokens: int = 20) -> Any:
    return client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": text}], max_tokens=max_tokens
    )


def _batches(server: Any) -> list[Any]:
    with server.client() as c:
        return list(c.batches.list(limit=100))


def _batch_sizes(server: Any) -> list[int]:
    return sorted(b.request_counts.total for b in _batches(server))


def test_size_trigger_groups_calls_and_routes_answers(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = server_factory()

    async def main() -> list[ChatCompletion]:
        async with _client(server, tmp_path, config=BatchConfig(size=10, send_delay=60, poll_interval=0.05)) as c:
            return await asyncio.gather(*(_ask(c, f"question {i}") for i in range(30)))

    answers = asyncio.run(main())
    assert all(isinstance(a, ChatCompletion) for a in answers)
    assert [a.choices[0].message.content for a in answers] == [f"question {i}" for i in range(30)]
    assert _batch_sizes(server) == [10, 10, 10]  # three full batches; the send delay never fired


def test_send_delay_sends_a_partial_batch(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = server_factory()

    async def main() -> tuple[list[Any], list[Any]]:
        config = BatchConfig(size=1000, send_delay=0.3, poll_interval=0.05)
        async with _client(server, tmp_path, config=config) as c:
            first = await asyncio.gather(*(_ask(c, f"a {i}") for i in range(25)))
            second = await asyncio.gather(*(_ask(c, f"b {i}") for i in range(5)))
            return first, second

    first, second = asyncio.run(main())
    assert [a.choices[0].message.content for a in first + second] == [f"a {i}" for i in range(25)] + [
        f"b {i}" for i in range(5)
    ]
    assert _batch_sizes(server) == [5, 25]


def test_byte_cap_closes_batches(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = server_factory()
    text = "x" * 300  # each request line is about 450 bytes

    async def main() -> list[Any]:
        config = BatchConfig(size=1000, send_delay=0.5, max_bytes=2000, poll_interval=0.05)
        async with _client(server, tmp_path, config=config) as c:
            return await asyncio.gather(*(_ask(c, f"{i} {text}", max_tokens=400) for i in range(12)))

    answers = asyncio.run(main())
    assert [a.choices[0].message.content for a in answers] == [f"{i} {text}" for i in range(12)]
    sizes = _batch_sizes(server)
    assert sum(sizes) == 12 and max(sizes) <= 4 and len(sizes) >= 3  # no batch over 2,000 bytes


def test_max_batches_bounds_batches_in_flight(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = server_factory("--echo-latency", "0.05", "--max-concurrency", "2")

    async def main() -> list[Any]:
        config = BatchConfig(size=5, send_delay=60, max_batches=1, poll_interval=0.05)
        async with _client(server, tmp_path, config=config) as c:
            task = asyncio.gather(*(_ask(c, f"q {i}") for i in range(20)))
            peak = 0
            while not task.done():
                active = [b for b in _batches(server) if b.status in ("validating", "in_progress", "finalizing")]
                peak = max(peak, len(active))
                await asyncio.sleep(0.05)
            assert peak == 1
            return await task

    answers = asyncio.run(main())
    assert len(answers) == 20 and _batch_sizes(server) == [5, 5, 5, 5]


def test_errors_reach_their_callers_and_retryable_ones_are_retried(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = server_factory("--echo-fail-rate", "0.3")

    async def main() -> list[Any]:
        config = BatchConfig(size=100, send_delay=0.2, poll_interval=0.05)
        async with _client(server, tmp_path, config=config, max_attempts=10) as c:
            calls = [_ask(c, f"ok {i}") for i in range(40)]
            bad = c.chat.completions.create(model="gpt-4o-mini", messages=[])  # the engine answers 400
            return await asyncio.gather(*calls, bad, return_exceptions=True)

    *good, bad = asyncio.run(main())
    assert [a.choices[0].message.content for a in good] == [f"ok {i}" for i in range(40)]  # 429s/500s retried
    assert isinstance(bad, openai.BadRequestError)
    assert bad.status_code == 400
    assert len(_batches(server)) >= 2  # the injected failures needed at least one more batch


def test_invalid_calls_raise_at_once(tmp_path: Path) -> None:
    async def main() -> None:
        async with AsyncBatchClient("bad", job_dir=tmp_path / "jobs") as c:
            with pytest.raises(openai.BadRequestError, match="stream|invalid"):
                await c.chat.completions.create(model="gpt-4o-mini", messages="not a list")  # type: ignore[arg-type]

    asyncio.run(main())


def test_budget_stops_calls_with_budget_exceeded(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = server_factory()

    async def main() -> list[Any]:
        config = BatchConfig(size=10, send_delay=0.2, poll_interval=0.05)
        async with _client(server, tmp_path, config=config, max_cost=0.0000001) as c:
            return await asyncio.gather(*(_ask(c, f"q {i}") for i in range(5)), return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, BudgetExceeded) for r in results)
    assert _batches(server) == []


def test_embeddings(tmp_path: Path) -> None:
    async def main() -> Any:
        async with AsyncBatchClient("emb", job_dir=tmp_path / "jobs", config=BatchConfig(send_delay=0.1)) as c:
            return await c.embeddings.create(model="text-embedding-3-small", input=["a", "b"])

    resp = asyncio.run(main())
    assert len(resp.data) == 2 and len(resp.data[0].embedding) > 0


def test_sync_facade_from_threads(tmp_path: Path) -> None:
    with BatchClient("sync", job_dir=tmp_path / "jobs", config=BatchConfig(size=8, send_delay=0.5)) as c:

        def ask(i: int) -> str:
            r = c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": f"s {i}"}])
            return r.choices[0].message.content  # type: ignore[no-any-return]

        with cf.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(ask, range(16)))
        futures = [
            c.chat.completions.submit(model="gpt-4o-mini", messages=[{"role": "user", "content": f"f {i}"}])
            for i in range(3)
        ]
        later = [f.result().choices[0].message.content for f in futures]
    assert answers == [f"s {i}" for i in range(16)]
    assert later == [f"f {i}" for i in range(3)]


# -- re-runs ------------------------------------------------------------------------------

_PROGRAM = textwrap.dedent(
    """
    import asyncio, json, sys
    from llmbatch.api import AsyncBatchClient, BatchConfig

    async def main():
        config = BatchConfig(size=10, send_delay=0.2, poll_interval=0.05)
        async with AsyncBatchClient("rerun", provider="openai", base_url=sys.argv[1], api_key="t",
                                    job_dir=sys.argv[2], config=config) as c:
            # Two identical questions: each is its own call (asked twice, answered twice).
            texts = [f"r {i}" for i in range(40)] + ["r 0"]
            answers = await asyncio.gather(*(
                c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": t}])
                for t in texts))
        print(json.dumps([a.choices[0].message.content for a in answers]))

    asyncio.run(main())
    """
)


@pytest.mark.slow
def test_a_rerun_after_a_kill_reuses_results_and_batches_in_flight(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = server_factory("--echo-latency", "0.15", "--max-concurrency", "1")  # about 1.5 s a batch
    script = tmp_path / "program.py"
    script.write_text(_PROGRAM)
    cmd = [sys.executable, str(script), server.base_url, str(tmp_path / "jobs")]
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost"}
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # kill it once some batches finished and others still run
        states = [b.status for b in _batches(server)]
        if "completed" in states and any(s in ("validating", "in_progress") for s in states):
            break
        time.sleep(0.02)
    else:
        pytest.fail(f"never saw finished and running batches together: {[b.status for b in _batches(server)]}")
    first.send_signal(signal.SIGKILL)
    first.wait()
    before = {b.id for b in _batches(server)}
    assert len(before) == 5  # 41 calls in batches of 10

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    answers = json.loads(second.stdout)
    assert answers == [f"r {i}" for i in range(40)] + ["r 0"]
    assert {b.id for b in _batches(server)} == before  # nothing sent again, no new batch

    third = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)  # everything from the store
    assert third.returncode == 0, third.stderr
    assert json.loads(third.stdout) == answers
    assert {b.id for b in _batches(server)} == before


def test_a_client_job_shows_in_the_cli(tmp_path: Path) -> None:
    async def main() -> None:
        async with AsyncBatchClient("seen", job_dir=tmp_path / "jobs", config=BatchConfig(send_delay=0.1)) as c:
            await asyncio.gather(*(_ask(c, f"c {i}") for i in range(3)))

    asyncio.run(main())
    cmd = [sys.executable, "-m", "llmbatch"]
    jobs = subprocess.run([*cmd, "jobs", "--job-dir", str(tmp_path / "jobs")], capture_output=True, text=True)
    assert jobs.returncode == 0 and "api-seen" in jobs.stdout, jobs.stderr
    status = subprocess.run(
        [*cmd, "status", "api-seen", "--json", "--job-dir", str(tmp_path / "jobs")], capture_output=True, text=True
    )
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["rows"]["succeeded"] == 3
    results = subprocess.run(
        [*cmd, "results", "api-seen", "--job-dir", str(tmp_path / "jobs")], capture_output=True, text=True
    )
    assert results.returncode == 0, results.stderr
    lines = (tmp_path / "jobs" / "api-seen" / "calls.results.jsonl").read_text().splitlines()
    assert [json.loads(x)["response"]["body"]["choices"][0]["message"]["content"] for x in lines] == [
        f"c {i}" for i in range(3)
    ]


def test_a_job_name_moves_to_another_provider_until_it_sends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A try that fails without a key records nothing; a named job that never sent anything is
    replaced by one on another provider; one that sent says how to remove it. Errors name the
    Python parameters, not the CLI's flags. A closed client's job is listed as finished."""
    from llmbatch import ConfigError
    from llmbatch.jobs import list_jobs

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    jobs = tmp_path / "jobs"
    unreachable = "http://127.0.0.1:9/v1"
    with pytest.raises(ConfigError) as raised:
        AsyncBatchClient("my-eval", provider="openai", base_url=unreachable, job_dir=jobs)
    assert "api_key=" in str(raised.value) and "--api-key" not in str(raised.value), raised.value
    assert not jobs.exists() or list_jobs(jobs) == []

    async def opened_and_closed() -> None:  # made with a key, closed without a call: nothing sent
        async with AsyncBatchClient("my-eval", provider="openai", base_url=unreachable, api_key="k", job_dir=jobs):
            pass

    asyncio.run(opened_and_closed())
    (listed,) = list_jobs(jobs)
    assert listed["settings"]["provider"] == "openai"

    async def ask_locally() -> Any:
        config = BatchConfig(send_delay=0, poll_interval=0.05)
        async with AsyncBatchClient("my-eval", provider="local", engine="echo", job_dir=jobs, config=config) as c:
            return await _ask(c, "hello")

    assert asyncio.run(ask_locally()).choices[0].message.content == "hello"
    (listed,) = list_jobs(jobs)
    assert (listed["settings"]["provider"], listed["status"]) == ("local", "finished")

    with pytest.raises(ConfigError) as raised:
        AsyncBatchClient("my-eval", provider="openai", base_url=unreachable, api_key="k", job_dir=jobs)
    assert "llmbatch jobs rm api-my-eval" in str(raised.value), raised.value
