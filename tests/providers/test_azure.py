"""The azure provider against a fake Azure OpenAI resource over real HTTP (tests/fakes/azure.py).

Adapter-level tests drive `AzureBatchProvider` (and the `openai` SDK under it) directly; the
end-to-end tests run `llmbatch run --provider azure` as a subprocess against the same fake,
on the v1 API and on the dated one.
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
from fakes.azure import FakeAzure
from fakes.groq import FakeBatch

from conftest import chat_line, jsonl
from llmbatch._exceptions import ConfigError, ProviderError
from llmbatch.providers import Provider, RemoteStatus, create_provider
from llmbatch.providers._openai import AZURE_FILE_TTL_SECONDS

T = TypeVar("T")
KEY = "azure-test-key"
DEPLOYMENT = "my-deployment"
DATED = "2025-04-01-preview"
Start = Callable[..., tuple[FakeAzure, str]]


@pytest.fixture
def start() -> Iterator[Start]:
    """Starts fake Azure resources (options as FakeAzure's); all stop at the end of the test."""
    with ExitStack() as stack:

        def make(**opts: Any) -> tuple[FakeAzure, str]:
            fake = FakeAzure(key=KEY, deployments={DEPLOYMENT}, **opts)
            return fake, stack.enter_context(serve_app(fake.app))

        yield make


def with_adapter(root: str, fn: Callable[[Provider], Awaitable[T]], **opts: Any) -> T:
    """Runs `fn` with an azure adapter on `root`, closing it afterwards."""

    async def main() -> T:
        provider = create_provider("azure", api_key=KEY, base_url=root, **opts)
        try:
            return await fn(provider)
        finally:
            await provider.aclose()

    return asyncio.run(main())


def chunk_file(tmp_path: Path, texts: list[str], name: str = "chunk.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(jsonl([chat_line(f"r{i}", t, model=DEPLOYMENT) for i, t in enumerate(texts)]))
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


# -- configuration -------------------------------------------------------------------------


def test_key_and_endpoint_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("AZURE_OPENAI_API_KEY", "AZURE_OPENAI_ENDPOINT", "OPENAI_API_VERSION"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match="AZURE_OPENAI_API_KEY"):
        create_provider("azure", base_url="https://res.openai.azure.com")
    with pytest.raises(ConfigError, match="AZURE_OPENAI_ENDPOINT"):
        create_provider("azure", api_key="k")

    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "k")
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", "https://res.openai.azure.com/")
    v1 = create_provider("azure")
    assert v1.base_url == "https://res.openai.azure.com/openai/v1/"  # type: ignore[attr-defined]
    assert v1.limits.max_requests == 100_000 and v1.limits.max_bytes == 200 * 1024 * 1024

    monkeypatch.setenv("OPENAI_API_VERSION", DATED)
    dated = create_provider("azure", base_url="https://res.openai.azure.com/openai/v1")
    assert dated.api_version == DATED  # type: ignore[attr-defined]
    assert dated.base_url == "https://res.openai.azure.com"  # type: ignore[attr-defined]


def test_check_request_knows_azures_batch_endpoints() -> None:
    cls = type(create_provider("azure", api_key="k", base_url="https://res.openai.azure.com"))
    body = {"model": DEPLOYMENT, "messages": [{"role": "user", "content": "hi"}]}
    for endpoint in ("/v1/chat/completions", "/v1/responses", "/v1/embeddings"):
        assert cls.check_request(endpoint, body) == []
    for endpoint in ("/v1/completions", "/v1/moderations"):
        (reason,) = cls.check_request(endpoint, body)
        assert "azure" in reason and endpoint in reason


# -- the v1 API ------------------------------------------------------------------------------


def test_v1_lifecycle_survives_azures_wire_quirks(start: Start, tmp_path: Path) -> None:
    fake, root = start()
    path = chunk_file(tmp_path, [f"hello {i}" for i in range(6)])

    async def run(p: Provider) -> tuple[Any, list[RemoteStatus], Any]:
        file_id = await p.upload("job1-c00001", path)
        created = await p.create_batch("job1-c00001", "job1", file_id, "/v1/chat/completions")
        assert created.status is RemoteStatus.VALIDATING
        seen = await settle(p, created.id)
        final = await p.get_batch(created.id)
        assert final.output_file_id  # no error file: Azure says "" and the adapter None
        await p.download(final.output_file_id, tmp_path / "out.jsonl")
        return created, seen, final

    created, seen, final = with_adapter(root, run)
    assert seen == [RemoteStatus.IN_PROGRESS, RemoteStatus.FINALIZING, RemoteStatus.COMPLETED]
    assert final.error_file_id is None and (final.total, final.completed, final.failed) == (6, 6, 0)
    assert final.metadata == {"llmbatch_chunk": "job1-c00001", "llmbatch_job": "job1"}

    # The wire really had Azure's quirks: no endpoint, "" for the missing error file.
    raw = httpx.get(f"{root}/openai/v1/batches/{created.id}", headers={"api-key": KEY}).json()
    assert raw["endpoint"] is None and raw["error_file_id"] == ""

    out = lines(tmp_path / "out.jsonl")
    assert sorted(r["custom_id"] for r in out) == [f"r{i}" for i in range(6)]
    for rec in out:
        assert "id" not in rec  # Azure's lines carry no id; the runner matches by custom_id
        assert len(rec["response"]["request_id"]) == 36  # a UUID
        body = rec["response"]["body"]
        assert body["choices"][0]["message"]["content"] == f"hello {rec['custom_id'][1:]}"
        assert "content_filter_results" in body["choices"][0] and body["prompt_filter_results"]

    # Uploads ask for expiry (lifting Azure's 500-file cap), with the chunk's tag in the name.
    (upload,) = [f for f in fake.files.values() if f.purpose == "batch"]
    assert upload.filename == "llmbatch-job1-c00001.jsonl"
    assert upload.expires_after == {"anchor": "created_at", "seconds": AZURE_FILE_TTL_SECONDS}
    assert json.loads(upload.data.splitlines()[0])["url"] == "/v1/chat/completions"
    assert fake.batches[created.id].output_expires_after == upload.expires_after
    assert all(c["path"].startswith("/openai/v1/") for c in fake.calls)


def test_per_request_errors_land_in_the_error_file(start: Start, tmp_path: Path) -> None:
    _fake, root = start()

    async def run(p: Provider, path: Path) -> Any:
        batch = await p.create_batch("t-c1", "t", await p.upload("t-c1", path), "/v1/chat/completions")
        await settle(p, batch.id)
        final = await p.get_batch(batch.id)
        await p.download(final.error_file_id, tmp_path / "err.jsonl")
        return final

    final = with_adapter(root, lambda p: run(p, chunk_file(tmp_path, ["ok", "please FAIL400", "FAIL429 once"])))
    assert (final.completed, final.failed) == (1, 2)
    by_id = {r["custom_id"]: r for r in lines(tmp_path / "err.jsonl")}
    assert by_id["r1"]["response"]["status_code"] == 400 and by_id["r1"]["error"] is None
    assert by_id["r1"]["response"]["body"]["error"]["message"]
    assert by_id["r2"]["response"]["status_code"] == 429

    # A model that is not one of the resource's deployments: every request answers 404.
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_bytes(jsonl([chat_line(i, model="gpt-4o") for i in range(2)]))
    final = with_adapter(root, lambda p: run(p, wrong))
    assert final.output_file_id is None and final.failed == 2
    errors = lines(tmp_path / "err.jsonl")
    assert {e["response"]["status_code"] for e in errors} == {404}
    assert {e["response"]["body"]["error"]["code"] for e in errors} == {"DeploymentNotFound"}


# -- the dated API ---------------------------------------------------------------------------


def test_dated_api_uses_api_key_api_version_and_unprefixed_urls(start: Start, tmp_path: Path) -> None:
    fake, root = start()
    path = chunk_file(tmp_path, ["one", "two"])
    before = path.read_bytes()

    async def run(p: Provider) -> tuple[list[RemoteStatus], tuple[int, Any]]:
        batch = await p.create_batch("d-c1", "d", await p.upload("d-c1", path), "/v1/chat/completions")
        seen = await settle(p, batch.id)
        hi = {"model": DEPLOYMENT, "messages": [{"role": "user", "content": "hi"}]}
        return seen, await p.direct("/v1/chat/completions", hi)

    seen, (status, body) = with_adapter(root, run, api_version=DATED)
    assert seen[-1] is RemoteStatus.COMPLETED
    assert status == 200 and body["choices"][0]["message"]["content"] == "hi"

    # Every call: the dated paths, ?api-version=, the key in `api-key`, no bearer token.
    assert {c["query"].get("api-version") for c in fake.calls} == {DATED}
    assert all(c["api-key"] == KEY and c["authorization"] is None for c in fake.calls)
    assert any(c["path"] == f"/openai/deployments/{DEPLOYMENT}/chat/completions" for c in fake.calls)
    assert not any(c["path"].startswith("/openai/v1/") for c in fake.calls)

    (batch,) = fake.batches.values()
    assert batch.endpoint == "/chat/completions"
    upload = fake.files[batch.input_file_id]
    assert [json.loads(x)["url"] for x in upload.data.splitlines()] == ["/chat/completions"] * 2
    assert upload.expires_after is not None  # 2025-04-01-preview takes expires_after
    assert batch.output_expires_after == {"anchor": "created_at", "seconds": AZURE_FILE_TTL_SECONDS}
    # The chunk file itself is untouched, and the rewritten copy is gone.
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["chunk.jsonl"]


def test_old_dated_versions_ask_for_no_expiry(start: Start, tmp_path: Path) -> None:
    fake, root = start()
    path = chunk_file(tmp_path, ["one"])

    async def run(p: Provider) -> Any:
        return await p.create_batch("o-c1", "o", await p.upload("o-c1", path), "/v1/chat/completions")

    made = with_adapter(root, run, api_version="2024-10-21")
    (upload,) = fake.files.values()
    assert upload.expires_after is None and fake.batches[made.id].output_expires_after is None


# -- quota, lost answers, reconciliation -----------------------------------------------------


def test_token_limit_exceeded_on_create_is_retryable(start: Start, tmp_path: Path) -> None:
    fake, root = start()
    fake.reject_creates = 1
    path = chunk_file(tmp_path, ["one"])

    async def run(p: Provider) -> tuple[ProviderError, Any]:
        file_id = await p.upload("q-c1", path)
        with pytest.raises(ProviderError) as refused:
            await p.create_batch("q-c1", "q", file_id, "/v1/chat/completions")
        return refused.value, await p.create_batch("q-c1", "q", file_id, "/v1/chat/completions")

    err, batch = with_adapter(root, run)
    assert err.retryable and err.status == 429
    assert "token_limit_exceeded" in str(err) and "quota" in str(err)
    assert list(fake.batches) == [batch.id]


def test_a_batch_failed_for_the_token_quota_reports_why(start: Start, tmp_path: Path) -> None:
    """Regions without fail-fast create the batch and fail it in validation instead."""
    fake, root = start()
    fake.token_limit_batches = 1
    path = chunk_file(tmp_path, ["one"])

    async def run(p: Provider) -> Any:
        batch = await p.create_batch("v-c1", "v", await p.upload("v-c1", path), "/v1/chat/completions")
        await settle(p, batch.id)
        return await p.get_batch(batch.id)

    final = with_adapter(root, run)
    assert final.status is RemoteStatus.FAILED and final.output_file_id is None and final.error_file_id is None
    assert [e["code"] for e in final.errors] == ["token_limit_exceeded"]


def test_a_lost_create_answer_is_not_retried_blindly(start: Start, tmp_path: Path) -> None:
    """The batch was made but its answer lost: the adapter does not let the SDK send the create
    again (that would make a second batch); the runner's lookup by tag finds the first."""
    fake, root = start()
    fake.lose_create_responses = 1
    path = chunk_file(tmp_path, ["one"])

    async def run(p: Provider) -> tuple[ProviderError, Any]:
        file_id = await p.upload("l-c1", path)
        with pytest.raises(ProviderError) as lost:
            await p.create_batch("l-c1", "l", file_id, "/v1/chat/completions")
        return lost.value, await p.find_batch("l-c1", int(time.time()) - 300, file_id)

    err, found = with_adapter(root, run)
    assert err.retryable
    assert len(fake.batches) == 1 and found is not None and found.id == next(iter(fake.batches))


def _history(fake: FakeAzure, job: str, n: int, created_at: int) -> None:
    """Other jobs' batches, straight into the fake's state."""
    for i in range(n):
        b = FakeBatch(f"batch_{job}{i}", f"file-{job}{i}", "/v1/chat/completions", "24h",
                      {"llmbatch_chunk": f"{job}-c{i:05d}"}, created_at)  # fmt: skip
        fake.batches[b.id] = b


@pytest.mark.parametrize("order", ["desc", "asc"])
def test_find_batch_by_tag_through_pages_in_any_order(start: Start, tmp_path: Path, order: str) -> None:
    fake, root = start(list_order=order)
    now = int(time.time())
    _history(fake, "other", 150, now)  # more than a page of 100, all inside the window
    path = chunk_file(tmp_path, ["one"])

    async def run(p: Provider) -> tuple[str, Any, Any, Any, Any, Any, Any]:
        file_id = await p.upload("f-c1", path)
        made = await p.create_batch("f-c1", "f", file_id, "/v1/chat/completions")
        _history(fake, "old", 3, now - 7200)  # older than `since`: listed last newest first, first oldest first
        return (
            file_id,
            made,
            await p.find_batch("f-c1", now - 300),
            await p.find_batch("f-c2", now - 300),
            await p.find_batch("old-c00001", now - 300),
            await p.find_batch("other-c00001", now - 300),
            await p.find_upload("f-c1", now - 300),
        )

    file_id, made, found, missing, too_old, other, upload = with_adapter(root, run)
    assert found is not None and found.id == made.id and found.metadata["llmbatch_chunk"] == "f-c1"
    assert missing is None and too_old is None
    assert other is not None and other.id == "batch_other1"
    assert upload == file_id
    listed = [c for c in fake.calls if c["method"] == "GET" and c["path"] == "/openai/v1/batches"]
    assert any(c["query"].get("after") for c in listed)  # a lookup read past the first page


def test_find_batch_falls_back_to_the_upload_when_metadata_is_dropped(start: Start, tmp_path: Path) -> None:
    fake, root = start(keep_metadata=False)
    path = chunk_file(tmp_path, ["one"])

    async def run(p: Provider) -> tuple[Any, Any, Any]:
        file_id = await p.upload("m-c1", path)
        made = await p.create_batch("m-c1", "m", file_id, "/v1/chat/completions")
        since = int(time.time()) - 300
        return made, await p.find_batch("m-c1", since, file_id), await p.find_batch("m-c1", since, "file-other")

    made, found, not_ours = with_adapter(root, run)
    assert made.metadata == {}  # the fake dropped it
    assert found is not None and found.id == made.id
    assert not_ours is None


# -- ends other than completed ---------------------------------------------------------------


def test_expired_batch_returns_partial_results_and_expired_lines(start: Start, tmp_path: Path) -> None:
    fake, root = start()
    fake.expire_next, fake.expire_fraction = 1, 0.5
    path = chunk_file(tmp_path, [f"t{i}" for i in range(4)])

    async def run(p: Provider) -> Any:
        batch = await p.create_batch("e-c1", "e", await p.upload("e-c1", path), "/v1/chat/completions")
        await settle(p, batch.id)
        final = await p.get_batch(batch.id)
        await p.download(final.output_file_id, tmp_path / "out.jsonl")
        await p.download(final.error_file_id, tmp_path / "err.jsonl")
        return final

    final = with_adapter(root, run)
    assert final.status is RemoteStatus.EXPIRED and (final.completed, final.failed) == (2, 2)
    assert sorted(r["custom_id"] for r in lines(tmp_path / "out.jsonl")) == ["r0", "r1"]
    expired = lines(tmp_path / "err.jsonl")
    assert sorted(r["custom_id"] for r in expired) == ["r2", "r3"]
    assert all(r["response"] is None and r["error"]["code"] == "batch_expired" for r in expired)


def test_cancel(start: Start, tmp_path: Path) -> None:
    _fake, root = start()
    path = chunk_file(tmp_path, ["one", "two"])

    async def run(p: Provider) -> tuple[Any, list[RemoteStatus]]:
        batch = await p.create_batch("x-c1", "x", await p.upload("x-c1", path), "/v1/chat/completions")
        return await p.cancel(batch.id), await settle(p, batch.id)

    cancelling, seen = with_adapter(root, run)
    assert cancelling.status is RemoteStatus.CANCELLING and seen == [RemoteStatus.CANCELLED]


def test_azure_takes_only_a_24h_window(start: Start, tmp_path: Path) -> None:
    fake, root = start()
    path = chunk_file(tmp_path, ["one"])

    async def run(p: Provider) -> None:
        await p.create_batch("w-c1", "w", await p.upload("w-c1", path), "/v1/chat/completions", "7d")

    with pytest.raises(ConfigError, match="24h"):
        with_adapter(root, run)
    assert not fake.batches


# -- llmbatch run end to end ---------------------------------------------------------------


def cli(tmp_path: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "AZURE_"))}
    env.update(LLMBATCH_HOME=str(tmp_path / "home"), AZURE_OPENAI_API_KEY=KEY, NO_PROXY="127.0.0.1,localhost")
    return subprocess.run(
        [sys.executable, "-m", "llmbatch", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def job_rows(n: int) -> list[dict[str, Any]]:
    """Rows naming a model that is not a deployment (--model fixes that), with some markers."""
    texts = {3: "please FAIL400", 7: "FAIL429 once", 11: "and FAIL429", 17: "FAIL400 too"}
    return [chat_line(i, texts.get(i, f"text {i}"), model="gpt-4o-mini") for i in range(n)]


def uploaded_lines(fake: FakeAzure) -> list[dict[str, Any]]:
    """Every line of every batch's input (llmbatch deletes the uploads once collected; batches keep them)."""
    return [json.loads(x) for b in fake.batches.values() for x in b.input_data.splitlines() if x.strip()]


def check_outputs(tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    out = lines(tmp_path / "input.results.jsonl")
    assert [r["custom_id"] for r in out] == [r["custom_id"] for r in rows]  # input order
    for rec, row in zip(out, rows):
        text = row["body"]["messages"][-1]["content"]
        if "FAIL400" in text:
            assert rec["response"]["status_code"] == 400, rec
        else:
            assert rec["response"]["status_code"] == 200, rec
            assert rec["response"]["body"]["choices"][0]["message"]["content"] == text
    errors = lines(tmp_path / "input.errors.jsonl")
    assert sorted(e["custom_id"] for e in errors) == ["row-17", "row-3"]
    assert all(e["response"]["status_code"] == 400 for e in errors)


def test_cli_v1_end_to_end(start: Start, tmp_path: Path) -> None:
    fake, root = start()
    fake.reject_creates = 2  # the quota is full at first
    fake.lose_create_responses = 1  # and one create's answer is lost
    rows = job_rows(24)
    (tmp_path / "input.jsonl").write_bytes(jsonl(rows))

    proc = cli(tmp_path, "run", str(tmp_path / "input.jsonl"), "--provider", "azure", "--base-url", root,
               "--model", DEPLOYMENT, "--batch-size", "10", "--poll-interval", "0.05")  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    check_outputs(tmp_path, rows)
    assert "token_limit_exceeded" in proc.stderr

    tags = fake.tags()
    assert len(tags) == len(set(tags)) == 4, tags  # 3 chunks + the FAIL429 retry; none created twice
    assert fake.reject_creates == 0 and fake.lose_create_responses == 0
    sent = fake.sent_custom_ids()
    assert sorted(set(sent)) == sorted(r["custom_id"] for r in rows)
    assert sorted(sent) == sorted([r["custom_id"] for r in rows] + ["row-11", "row-7"])
    assert {rec["body"]["model"] for rec in uploaded_lines(fake)} == {DEPLOYMENT}
    assert all(c["path"].startswith("/openai/v1/") for c in fake.calls)


def test_cli_dated_api_end_to_end(start: Start, tmp_path: Path) -> None:
    fake, root = start()
    fake.reject_creates = 1
    fake.token_limit_batches = 1  # one batch is made and then fails for the quota: its rows go again
    rows = job_rows(20)
    (tmp_path / "input.jsonl").write_bytes(jsonl(rows))

    proc = cli(tmp_path, "run", str(tmp_path / "input.jsonl"), "--provider", "azure", "--base-url", root,
               "--api-version", DATED, "--model", DEPLOYMENT, "--batch-size", "10", "--poll-interval", "0.05",
               "--max-attempts", "4")  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    check_outputs(tmp_path, rows)

    statuses = [b.status for b in fake.batches.values()]
    assert statuses.count("failed") == 1 and statuses.count("completed") == len(statuses) - 1
    assert len(fake.tags()) == len(set(fake.tags()))
    assert {c["query"].get("api-version") for c in fake.calls} == {DATED}
    assert {rec["url"] for rec in uploaded_lines(fake)} == {"/chat/completions"}


# -- a real Azure resource ------------------------------------------------------------------


@pytest.mark.live
def test_live_tiny_job(tmp_path: Path) -> None:
    """Two rows on a real Global Batch deployment: AZURE_OPENAI_API_KEY, AZURE_OPENAI_ENDPOINT and
    LLMBATCH_AZURE_DEPLOYMENT must be set. Azure batches can take hours; this waits up to an hour."""
    deployment = os.environ.get("LLMBATCH_AZURE_DEPLOYMENT")
    if not (os.environ.get("AZURE_OPENAI_API_KEY") and os.environ.get("AZURE_OPENAI_ENDPOINT") and deployment):
        pytest.skip("set AZURE_OPENAI_API_KEY, AZURE_OPENAI_ENDPOINT and LLMBATCH_AZURE_DEPLOYMENT")
    rows = [chat_line(i, f"Reply with the number {i} and nothing else.", max_tokens=5) for i in range(2)]
    (tmp_path / "input.jsonl").write_bytes(jsonl(rows))
    env = {**os.environ, "LLMBATCH_HOME": str(tmp_path / "home")}
    proc = subprocess.run(
        [sys.executable, "-m", "llmbatch", "run", str(tmp_path / "input.jsonl"), "--provider", "azure",
         "--model", deployment, "--poll-interval", "30"],
        env=env, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = lines(tmp_path / "input.results.jsonl")
    assert [r["response"]["status_code"] for r in out] == [200, 200]
