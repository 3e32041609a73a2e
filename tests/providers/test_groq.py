"""The groq provider against a fake Groq Batch API over real HTTP (tests/fakes/groq.py).

Adapter-level tests drive `GroqBatchProvider` (and the `openai` SDK under it) directly; the
end-to-end tests run `llmbatch run --provider groq` as a subprocess against the same fake.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from fakes._serve import serve_app
from fakes.groq import FakeBatch, FakeGroq

from conftest import chat_line, jsonl
from llmbatch._exceptions import ConfigError, ProviderError
from llmbatch.providers import Provider, RemoteStatus, create_provider, provider_class

T = TypeVar("T")
KEY = "gsk-test"
MODEL = "llama-3.1-8b-instant"
Start = Callable[..., tuple[FakeGroq, str]]


@pytest.fixture
def start() -> Iterator[Start]:
    """Starts fake Groq APIs (options as FakeGroq's); yields (fake, base URL); all stop at the end."""
    with ExitStack() as stack:

        def make(**opts: Any) -> tuple[FakeGroq, str]:
            fake = FakeGroq(key=KEY, **opts)
            return fake, stack.enter_context(serve_app(fake.app)) + "/openai/v1"

        yield make


def with_adapter(base_url: str, fn: Callable[[Provider], Awaitable[T]]) -> T:
    """Runs `fn` with a groq adapter on `base_url`, closing it afterwards; a hang fails the test."""

    async def main() -> T:
        provider = create_provider("groq", api_key=KEY, base_url=base_url)
        try:
            return await asyncio.wait_for(fn(provider), 20)
        finally:
            await provider.aclose()

    return asyncio.run(main())


def chunk_file(tmp_path: Path, texts: list[str], name: str = "chunk.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(jsonl([chat_line(f"r{i}", t, model=MODEL) for i, t in enumerate(texts)]))
    return path


async def settle(provider: Provider, batch_id: str) -> list[RemoteStatus]:
    """Polls until the batch ends; returns every status seen, in order."""
    seen: list[RemoteStatus] = []
    for _ in range(50):
        batch = await provider.get_batch(batch_id)
        if not seen or seen[-1] != batch.status:
            seen.append(batch.status)
        if batch.status.terminal:
            return seen
    raise AssertionError(f"batch {batch_id} never ended: {seen}")


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


# -- configuration and row checks ----------------------------------------------------------


def test_key_and_base_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GROQ_API_KEY", raising=False)
    monkeypatch.delenv("GROQ_BASE_URL", raising=False)
    with pytest.raises(ConfigError, match="GROQ_API_KEY"):
        create_provider("groq")
    monkeypatch.setenv("GROQ_API_KEY", "k")
    groq = create_provider("groq")
    assert groq.base_url == "https://api.groq.com/openai/v1"  # type: ignore[attr-defined]
    assert groq.limits.max_bytes == 100 * 1024 * 1024
    monkeypatch.setenv("GROQ_BASE_URL", "http://127.0.0.1:9/openai/v1")
    assert create_provider("groq").base_url == "http://127.0.0.1:9/openai/v1"  # type: ignore[attr-defined]


def test_check_request_refuses_what_groq_answers_400() -> None:
    cls = provider_class("groq")
    msgs = [{"role": "user", "content": "hi"}]
    assert cls.check_request("/v1/chat/completions", {"model": MODEL, "messages": msgs}) == []
    assert cls.check_request("/v1/chat/completions", {"model": MODEL, "messages": msgs, "n": 1}) == []
    for endpoint in ("/v1/embeddings", "/v1/responses", "/v1/completions"):
        (reason,) = cls.check_request(endpoint, {"model": MODEL, "input": "hi"})
        assert "groq" in reason and endpoint in reason
    for extra, word in [({"logprobs": True}, "logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
                        ({"logit_bias": {"1": 5}}, "logit_bias"), ({"n": 2}, "n=2")]:  # fmt: skip
        (reason,) = cls.check_request("/v1/chat/completions", {"model": MODEL, "messages": msgs, **extra})
        assert word in reason
    named = [{"role": "user", "content": "hi", "name": "ann"}]
    (reason,) = cls.check_request("/v1/chat/completions", {"model": MODEL, "messages": named})
    assert "messages[].name" in reason


# -- the batch lifecycle ----------------------------------------------------------------------


def test_lifecycle_with_a_seven_day_window(start: Start, tmp_path: Path) -> None:
    fake, base = start()
    path = chunk_file(tmp_path, ["hello 0", "hello 1", "FAIL400 here", "FAIL429 once"])

    async def run(p: Provider) -> tuple[Any, list[RemoteStatus], Any]:
        created = await p.create_batch("g-c1", "g", await p.upload("g-c1", path), "/v1/chat/completions", "7d")
        seen = await settle(p, created.id)
        final = await p.get_batch(created.id)
        await p.download(final.output_file_id, tmp_path / "out.jsonl")
        await p.download(final.error_file_id, tmp_path / "err.jsonl")
        return created, seen, final

    created, seen, final = with_adapter(base, run)
    assert created.status is RemoteStatus.VALIDATING
    assert seen == [RemoteStatus.IN_PROGRESS, RemoteStatus.FINALIZING, RemoteStatus.COMPLETED]
    assert (final.total, final.completed, final.failed) == (4, 2, 2)
    assert final.metadata["llmbatch_chunk"] == "g-c1"

    raw = httpx.get(f"{base}/batches/{created.id}", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert raw["completion_window"] == "7d" and "model" not in raw and "usage" not in raw

    out = lines(tmp_path / "out.jsonl")
    assert sorted(r["custom_id"] for r in out) == ["r0", "r1"]
    assert all(r["id"].startswith("batch_req_") and r["response"]["status_code"] == 200 for r in out)
    assert {r["response"]["body"]["choices"][0]["message"]["content"] for r in out} == {"hello 0", "hello 1"}
    err = {r["custom_id"]: r["response"]["status_code"] for r in lines(tmp_path / "err.jsonl")}
    assert err == {"r2": 400, "r3": 429}
    assert all(c["authorization"] == f"Bearer {KEY}" for c in fake.calls)


def test_a_window_groq_does_not_take_is_refused_for_good(start: Start, tmp_path: Path) -> None:
    _fake, base = start()
    path = chunk_file(tmp_path, ["one"])

    async def run(p: Provider) -> None:
        await p.create_batch("w-c1", "w", await p.upload("w-c1", path), "/v1/chat/completions", "30d")

    with pytest.raises(ProviderError) as refused:
        with_adapter(base, run)
    assert refused.value.status == 400 and not refused.value.retryable


def test_expired_batch_and_cancel(start: Start, tmp_path: Path) -> None:
    fake, base = start()
    fake.expire_next, fake.expire_fraction = 1, 0.25
    path = chunk_file(tmp_path, [f"t{i}" for i in range(4)])

    async def run(p: Provider) -> tuple[Any, Any, list[RemoteStatus]]:
        expiring = await p.create_batch("e-c1", "e", await p.upload("e-c1", path), "/v1/chat/completions")
        await settle(p, expiring.id)
        final = await p.get_batch(expiring.id)
        await p.download(final.error_file_id, tmp_path / "err.jsonl")
        cancelled = await p.create_batch("e-c2", "e", await p.upload("e-c2", path), "/v1/chat/completions")
        return final, await p.cancel(cancelled.id), await settle(p, cancelled.id)

    expired, cancelling, seen = with_adapter(base, run)
    assert expired.status is RemoteStatus.EXPIRED and (expired.completed, expired.failed) == (1, 3)
    not_run = lines(tmp_path / "err.jsonl")
    assert sorted(r["custom_id"] for r in not_run) == ["r1", "r2", "r3"]
    assert {r["error"]["code"] for r in not_run} == {"batch_expired"}
    assert cancelling.status is RemoteStatus.CANCELLING and seen == [RemoteStatus.CANCELLED]


# -- lookups after a crash --------------------------------------------------------------------


def _history(fake: FakeGroq, job: str, n: int, created_at: int) -> None:
    for i in range(n):
        b = FakeBatch(f"batch_{job}{i}", f"file_{job}{i}", "/v1/chat/completions", "24h",
                      {"llmbatch_chunk": f"{job}-c{i:05d}"}, created_at)  # fmt: skip
        fake.batches[b.id] = b


@pytest.mark.parametrize("order", ["desc", "asc"])
def test_lookups_end_although_groq_lists_do_not_page(start: Start, tmp_path: Path, order: str) -> None:
    """Groq's lists have no `has_more` and (in this fake) ignore `after`: the SDK would ask for the
    same page forever. Lookups still end, find what is there, and answer None for what is not."""
    fake, base = start(list_order=order)
    now = int(time.time())
    _history(fake, "other", 30, now)
    _history(fake, "old", 3, now - 7200)
    path = chunk_file(tmp_path, ["one"])

    async def run(p: Provider) -> tuple[str, Any, Any, Any, Any, Any]:
        file_id = await p.upload("k-c1", path)
        made = await p.create_batch("k-c1", "k", file_id, "/v1/chat/completions")
        since = now - 300
        return (
            file_id,
            made,
            await p.find_batch("k-c1", since),
            await p.find_batch("k-c2", since),
            await p.find_batch("old-c00001", since),
            (await p.find_upload("k-c1", since), await p.find_upload("k-c2", since)),
        )

    file_id, made, found, missing, too_old, uploads = with_adapter(base, run)
    assert found is not None and found.id == made.id
    assert missing is None and too_old is None
    assert uploads == (file_id, None)
    assert any("after" in c["query"] for c in fake.calls if c["path"].endswith("/batches"))


def test_a_lost_create_answer_is_not_retried_blindly(start: Start, tmp_path: Path) -> None:
    fake, base = start(keep_metadata=False)
    fake.lose_create_responses = 1
    path = chunk_file(tmp_path, ["one"])

    async def run(p: Provider) -> tuple[ProviderError, Any]:
        file_id = await p.upload("l-c1", path)
        with pytest.raises(ProviderError) as lost:
            await p.create_batch("l-c1", "l", file_id, "/v1/chat/completions")
        return lost.value, await p.find_batch("l-c1", int(time.time()) - 300, file_id)

    err, found = with_adapter(base, run)
    assert err.retryable and len(fake.batches) == 1
    assert found is not None and found.id == next(iter(fake.batches))  # by its upload: no metadata here


# -- llmbatch run end to end ---------------------------------------------------------------


def cli(tmp_path: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "GROQ_"))}
    env.update(LLMBATCH_HOME=str(tmp_path / "home"), GROQ_API_KEY=KEY, NO_PROXY="127.0.0.1,localhost")
    return subprocess.run(
        [sys.executable, "-m", "llmbatch", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_cli_end_to_end(start: Start, tmp_path: Path) -> None:
    fake, base = start()
    fake.expire_next = 1  # one batch runs out of time with half its rows done: those left go again
    fake.lose_create_responses = 1
    texts = {2: "please FAIL400", 5: "FAIL429 once", 13: "FAIL429 as well", 21: "FAIL400 again"}
    rows = [chat_line(i, texts.get(i, f"text {i}"), model=MODEL) for i in range(25)]
    (tmp_path / "input.jsonl").write_bytes(jsonl(rows))

    proc = cli(tmp_path, "run", str(tmp_path / "input.jsonl"), "--provider", "groq", "--base-url", base,
               "--completion-window", "7d", "--batch-size", "10", "--poll-interval", "0.05")  # fmt: skip
    assert proc.returncode == 1, proc.stderr

    out = lines(tmp_path / "input.results.jsonl")
    assert [r["custom_id"] for r in out] == [r["custom_id"] for r in rows]
    for rec, row in zip(out, rows):
        text = row["body"]["messages"][-1]["content"]
        if "FAIL400" in text:
            assert rec["response"]["status_code"] == 400, rec
        else:
            assert rec["response"]["status_code"] == 200, rec
            assert rec["response"]["body"]["choices"][0]["message"]["content"] == text
    errors = lines(tmp_path / "input.errors.jsonl")
    assert sorted(e["custom_id"] for e in errors) == ["row-2", "row-21"]

    batches = list(fake.batches.values())
    assert {b.completion_window for b in batches} == {"7d"}
    assert [b.status for b in batches].count("expired") == 1
    tags = fake.tags()
    assert len(tags) == len(set(tags)) >= 4, tags  # 3 chunks and retries; no chunk got two batches
    sent = fake.sent_custom_ids()
    assert sorted(set(sent)) == sorted(r["custom_id"] for r in rows)
    assert sent.count("row-2") == 1 and sent.count("row-21") == 1  # 400 is final: never sent again


def test_cli_refuses_rows_groq_cannot_run(start: Start, tmp_path: Path) -> None:
    fake, base = start()
    rows = [chat_line(0, model=MODEL), chat_line(1, model=MODEL, logprobs=True), chat_line(2, model=MODEL, n=3)]
    (tmp_path / "input.jsonl").write_bytes(jsonl(rows))
    proc = cli(tmp_path, "run", str(tmp_path / "input.jsonl"), "--provider", "groq", "--base-url", base)
    assert proc.returncode == 2, proc.stderr
    assert "logprobs" in proc.stderr and "n=3" in proc.stderr
    assert fake.calls == []  # nothing was sent


# -- the real Groq API ------------------------------------------------------------------------


@pytest.mark.live
def test_live_tiny_job(tmp_path: Path) -> None:
    """Two rows on Groq's real Batch API (GROQ_API_KEY must be set); waits up to an hour."""
    if not os.environ.get("GROQ_API_KEY"):
        pytest.skip("set GROQ_API_KEY")
    rows = [chat_line(i, f"Reply with the number {i} and nothing else.", model=MODEL, max_tokens=5) for i in range(2)]
    (tmp_path / "input.jsonl").write_bytes(jsonl(rows))
    env = {**os.environ, "LLMBATCH_HOME": str(tmp_path / "home")}
    proc = subprocess.run(
        [sys.executable, "-m", "llmbatch", "run", str(tmp_path / "input.jsonl"), "--provider", "groq",
         "--poll-interval", "10"],
        env=env, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = lines(tmp_path / "input.results.jsonl")
    assert [r["response"]["status_code"] for r in out] == [200, 200]
