"""The Mistral adapter against an HTTP fake of Mistral's Batch API (tests/fakes/mistral.py).

The adapter and the official `mistralai` SDK under it talk over real HTTP to the fake; the
end-to-end tests run `llmbatch run --provider mistral` as a subprocess against it.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes._serve import serve_app
from fakes.mistral import MistralFake

from conftest import chat_line, jsonl
from llmbatch._exceptions import ConfigError, ProviderError
from llmbatch.jobs import JobRunner, JobSettings, ingest, open_job
from llmbatch.providers import JOB_KEY, TAG_KEY, RemoteStatus, create_provider
from llmbatch.providers._mistral import MistralBatchProvider

KEY = "test-key"
CHAT = "/v1/chat/completions"
MODEL = "mistral-small-latest"


@pytest.fixture
def fake() -> Iterator[MistralFake]:
    fake = MistralFake(api_key=KEY)
    with serve_app(fake.app) as url:
        fake.url = url
        yield fake


def provider(fake: MistralFake) -> MistralBatchProvider:
    return MistralBatchProvider(api_key=KEY, base_url=fake.url)


def chunk_file(tmp_path: Path, rows: list[dict[str, Any]], name: str = "chunk.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(jsonl(rows))
    return path


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def row(i: int, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"custom_id": f"row-{i}", "method": "POST", "url": endpoint, "body": body}


async def poll_to_end(p: MistralBatchProvider, batch_id: str) -> list[RemoteStatus]:
    seen: list[RemoteStatus] = []
    for _ in range(20):
        b = await p.get_batch(batch_id)
        if not seen or seen[-1] != b.status:
            seen.append(b.status)
        if b.status.terminal:
            return seen
    raise AssertionError(f"batch {batch_id} never ended: {seen}")


async def run_batch(p: MistralBatchProvider, tmp_path: Path, path: Path, endpoint: str = CHAT) -> list[RemoteStatus]:
    """Uploads, creates, polls to the end and downloads both result files to out/err.jsonl."""
    b = await p.create_batch("m-c00001", "job", await p.upload("m-c00001", path), endpoint)
    statuses = await poll_to_end(p, b.id)
    final = await p.get_batch(b.id)
    for file_id, name in ((final.output_file_id, "out.jsonl"), (final.error_file_id, "err.jsonl")):
        if file_id:
            await p.download(file_id, tmp_path / name)
    return statuses


# -- the adapter ---------------------------------------------------------------------------


def test_upload_translates_requests_and_is_found_by_tag(fake: MistralFake, tmp_path: Path) -> None:
    rows = [
        chat_line(0, model=MODEL, max_completion_tokens=7, seed=11),
        row(1, CHAT, {"model": MODEL, "messages": [
            {"role": "developer", "content": "be brief", "name": None},
            {"role": "user", "content": [
                {"type": "text", "text": "hear"},
                {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
            ]},
        ]}),
    ]  # fmt: skip
    path = chunk_file(tmp_path, rows)

    async def scenario() -> tuple[str, str | None, str | None, str | None]:
        p = provider(fake)
        try:
            fid = await p.upload("job1-c00001", path)
            found = await p.find_upload("job1-c00001", int(time.time()) - 60)
            other = await p.find_upload("job1-c00002", 0)
            later = await p.find_upload("job1-c00001", int(time.time()) + 3600)
            return fid, found, other, later
        finally:
            await p.aclose()

    fid, found, other, later = asyncio.run(scenario())
    f = fake.files[fid]
    assert f["filename"] == "llmbatch-job1-c00001.jsonl" and f["purpose"] == "batch"
    first, second = fake.file_lines(fid)
    assert set(first) == {"custom_id", "body"}
    assert first["body"]["max_tokens"] == 7 and first["body"]["random_seed"] == 11
    assert "max_completion_tokens" not in first["body"] and "seed" not in first["body"]
    assert second["body"]["messages"][0] == {"role": "system", "content": "be brief"}
    assert second["body"]["messages"][1]["content"][1] == {"type": "input_audio", "input_audio": "UklGRg=="}
    assert (found, other, later) == (fid, None, None)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["chunk.jsonl"]


def test_batch_lifecycle_results_and_row_errors(fake: MistralFake, tmp_path: Path) -> None:
    texts = [f"hello {i}" for i in range(20)]
    texts[3], texts[8], texts[11], texts[15] = "FAIL400 please", "THINK twice", "FAIL429 now", "FAILSTR oops"
    path = chunk_file(tmp_path, [chat_line(i, t, model=MODEL) for i, t in enumerate(texts)])

    async def scenario() -> tuple[list[RemoteStatus], Any]:
        p = provider(fake)
        try:
            statuses = await run_batch(p, tmp_path, path)
            (job,) = fake.batches
            return statuses, await p.get_batch(job)
        finally:
            await p.aclose()

    statuses, final = asyncio.run(scenario())
    assert statuses == [RemoteStatus.VALIDATING, RemoteStatus.IN_PROGRESS, RemoteStatus.COMPLETED]
    assert (final.total, final.completed, final.failed) == (20, 17, 3)
    assert final.metadata == {TAG_KEY: "m-c00001", JOB_KEY: "job"}
    out = read_lines(tmp_path / "out.jsonl")
    ids = [r["custom_id"] for r in out]
    assert sorted(ids) == sorted(f"row-{i}" for i in range(20) if i not in (3, 11, 15))
    assert ids != sorted(ids, key=lambda c: int(c.split("-")[1])), "the fake shuffles results"
    for rec in out:
        assert set(rec) == {"id", "custom_id", "response", "error", "native"}
        body = rec["response"]["body"]
        n = int(rec["custom_id"].split("-")[1])
        assert rec["error"] is None and rec["response"]["status_code"] == 200
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"] == {"role": "assistant", "content": texts[n], "refusal": None}
        assert body["choices"][0]["finish_reason"] == "stop"
        assert body["usage"]["completion_tokens"] == len(texts[n].split())
        assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    think = next(r for r in out if r["custom_id"] == "row-8")
    assert think["native"]["response"]["body"]["choices"][0]["message"]["content"][0]["type"] == "thinking"

    errors = {r["custom_id"]: r for r in read_lines(tmp_path / "err.jsonl")}
    assert set(errors) == {"row-3", "row-11", "row-15"}
    bad = errors["row-3"]["response"]
    assert bad["status_code"] == 400
    assert bad["body"] == {"error": {"message": "Invalid request: FAIL400", "type": "invalid_request_error",
                                     "param": None, "code": "1000"}}  # fmt: skip
    assert errors["row-11"]["response"]["status_code"] == 429
    assert errors["row-15"]["response"] is None
    assert errors["row-15"]["error"] == {"code": "error", "message": "Internal error while processing"}


def test_embeddings_and_moderations(fake: MistralFake, tmp_path: Path) -> None:
    emb = chunk_file(tmp_path, [row(0, "/v1/embeddings", {"model": "mistral-embed", "input": ["a b", "c"],
                                                           "dimensions": 3})], "emb.jsonl")  # fmt: skip
    mod = chunk_file(tmp_path, [row(0, "/v1/moderations", {"model": "mistral-moderation-latest",
                                                           "input": ["kill it", "fine"]})], "mod.jsonl")  # fmt: skip

    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        p = provider(fake)
        try:
            await run_batch(p, tmp_path, emb, "/v1/embeddings")
            embedded = read_lines(tmp_path / "out.jsonl")
            await run_batch(p, tmp_path, mod, "/v1/moderations")
            return embedded, read_lines(tmp_path / "out.jsonl")
        finally:
            await p.aclose()

    (embedded,), (moderated,) = asyncio.run(scenario())
    first = fake.batch_list()[0]
    assert first["endpoint"] == "/v1/embeddings"
    assert fake.lines[first["id"]][0]["body"] == {
        "model": "mistral-embed",
        "input": ["a b", "c"],
        "output_dimension": 3,
    }
    assert [d["index"] for d in embedded["response"]["body"]["data"]] == [0, 1]
    assert "native" not in embedded  # nothing to rewrite
    results = moderated["response"]["body"]["results"]
    assert [r["flagged"] for r in results] == [True, False]
    assert "flagged" not in moderated["native"]["response"]["body"]["results"][0]


def test_timeout_exceeded_keeps_only_finished_rows(fake: MistralFake, tmp_path: Path) -> None:
    fake.expire_next = 1
    path = chunk_file(tmp_path, [chat_line(i, model=MODEL) for i in range(10)])

    async def scenario() -> list[RemoteStatus]:
        p = provider(fake)
        try:
            return await run_batch(p, tmp_path, path)
        finally:
            await p.aclose()

    assert asyncio.run(scenario())[-1] is RemoteStatus.EXPIRED
    assert sorted(r["custom_id"] for r in read_lines(tmp_path / "out.jsonl")) == sorted(f"row-{i}" for i in range(5))


def test_failed_validation_reports_errors_with_counts(fake: MistralFake) -> None:
    bad = jsonl([chat_line(i, model=MODEL) for i in range(3)]) + b"{not json\n"  # OpenAI's envelope, not Mistral's
    fid = fake.add_file("bad.jsonl", bad)

    async def scenario() -> Any:
        p = provider(fake)
        try:
            b = await p.create_batch("m-c00001", "job", fid, CHAT)
            assert (await poll_to_end(p, b.id))[-1] is RemoteStatus.FAILED
            return await p.get_batch(b.id)
        finally:
            await p.aclose()

    failed = asyncio.run(scenario())
    assert failed.output_file_id is None and failed.error_file_id is None
    assert sorted(e["message"] for e in failed.errors) == [
        "a line is not valid JSON",
        "lines must hold exactly custom_id and body (3 requests)",
    ]


def test_cancel_goes_through_cancellation_requested(fake: MistralFake, tmp_path: Path) -> None:
    fake.running_polls = 50
    path = chunk_file(tmp_path, [chat_line(i, model=MODEL) for i in range(6)])

    async def scenario() -> list[RemoteStatus]:
        p = provider(fake)
        try:
            b = await p.create_batch("m-c00001", "job", await p.upload("m-c00001", path), CHAT)
            await p.get_batch(b.id)
            await p.get_batch(b.id)
            cancelling = await p.cancel(b.id)
            return [cancelling.status, *await poll_to_end(p, b.id)]
        finally:
            await p.aclose()

    assert asyncio.run(scenario()) == [RemoteStatus.CANCELLING, RemoteStatus.CANCELLED]
    (b,) = fake.batches.values()
    assert b["status"] == "CANCELLED" and b["output_file"]


def test_find_batch_pages_through_the_listing(fake: MistralFake, tmp_path: Path) -> None:
    path = chunk_file(tmp_path, [chat_line(i, model=MODEL) for i in range(3)])

    async def scenario() -> None:
        p = provider(fake)
        p.page_size = 10
        try:
            since = int(time.time()) - 300
            fid = await p.upload("m-c00001", path)
            made = await p.create_batch("m-c00001", "job", fid, CHAT)
            for _ in range(25):  # newer batches push ours to the third page
                fake.add_batch(metadata={"other": "x"})
            by_tag = await p.find_batch("m-c00001", since)
            by_file = await p.find_batch("m-c00009", since, fid)
            assert by_tag is not None and by_file is not None and by_tag.id == by_file.id == made.id
            assert await p.find_batch("m-c00002", since, "another-file") is None
            assert await p.find_batch("m-c00001", int(time.time()) + 3600, fid) is None
        finally:
            await p.aclose()

    asyncio.run(scenario())
    listings = [c for c in fake.calls if c.startswith("GET /v1/batch/jobs?")]
    assert any("page=2" in c for c in listings), listings
    assert all("created_after=" in c for c in listings)


def test_runner_adopts_an_upload_and_a_batch_made_before_a_crash(fake: MistralFake, tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(jsonl([chat_line(i, model=MODEL) for i in range(30)]))
    settings = JobSettings(provider="mistral", base_url=fake.url, batch_size=10, poll_interval=0.05)
    store, job_dir, _ = open_job([inp], settings, tmp_path / "jobs")
    ingest(store, [inp], settings)

    async def scenario() -> tuple[str, str]:
        p = provider(fake)
        runner = JobRunner(store, job_dir, settings, p, say=lambda m: None)
        runner.plan()
        c1, c2, _c3 = store.chunks(("planned",))
        store.move_chunk(c1.id, "uploading", ("planned",), intent_at=c1.created_at)
        orphan_upload = await p.upload(c1.tag, runner._write_chunk_file(c1))
        file_id = await p.upload(c2.tag, runner._write_chunk_file(c2))
        store.move_chunk(c2.id, "uploading", ("planned",), intent_at=c2.created_at)
        store.move_chunk(c2.id, "uploaded", ("uploading",), file_id=file_id)
        store.move_chunk(c2.id, "creating", ("uploaded",), intent_at=c2.created_at)
        orphan_batch = await p.create_batch(c2.tag, runner.job_id, file_id, c2.endpoint)
        await p.aclose()
        # The restart: a fresh process, which learns the found upload's model from the file.
        p = provider(fake)
        outcome = await JobRunner(store, job_dir, settings, p, say=lambda m: None).run()
        await p.aclose()
        assert outcome.code == 0, outcome.summary
        return orphan_upload, orphan_batch.id

    orphan_upload, orphan_batch = asyncio.run(scenario())
    batches = fake.batch_list()
    assert len(batches) == 3 and len({b["metadata"][TAG_KEY] for b in batches}) == 3
    assert [b["model"] for b in batches] == [MODEL] * 3
    assert orphan_batch in {b["id"] for b in batches}
    assert orphan_upload in {f for b in batches for f in b["input_files"]}
    assert len((tmp_path / "in.results.jsonl").read_text().splitlines()) == 30


def test_direct_translates_both_ways(fake: MistralFake) -> None:
    async def scenario() -> list[tuple[int, Any]]:
        p = provider(fake)
        try:
            return [
                await p.direct(CHAT, chat_line(0, "THINK hi", model=MODEL, max_completion_tokens=3)["body"]),
                await p.direct(CHAT, chat_line(1, "FAIL400", model=MODEL)["body"]),
                await p.direct("/v1/embeddings", {"model": "mistral-embed", "input": "x", "dimensions": 2}),
                await p.direct("/v1/completions", {"model": MODEL, "prompt": "x"}),
            ]
        finally:
            await p.aclose()

    (status, body), (bad_status, bad_body), (emb_status, _), (other_status, _) = asyncio.run(scenario())
    assert status == 200 and body["choices"][0]["message"]["content"] == "THINK hi"
    assert fake.direct_bodies[0]["max_tokens"] == 3 and "max_completion_tokens" not in fake.direct_bodies[0]
    assert bad_status == 400 and bad_body["error"]["message"] == "Invalid request: FAIL400"
    assert emb_status == 200 and fake.direct_bodies[2]["output_dimension"] == 2
    assert other_status == 400


def test_errors_become_provider_errors(fake: MistralFake) -> None:
    async def scenario() -> tuple[ProviderError, ProviderError, ProviderError]:
        wrong_key = MistralBatchProvider(api_key="nope", base_url=fake.url)
        gone = MistralBatchProvider(api_key=KEY, base_url="http://127.0.0.1:9")
        p = provider(fake)
        try:
            with pytest.raises(ProviderError) as e1:
                await wrong_key.get_batch("x")
            with pytest.raises(ProviderError) as e2:
                await gone.get_batch("x")
            with pytest.raises(ProviderError) as e3:
                await p.get_batch("no-such-batch")
            return e1.value, e2.value, e3.value
        finally:
            for c in (wrong_key, gone, p):
                await c.aclose()

    unauthorized, unreachable, missing = asyncio.run(scenario())
    assert unauthorized.status == 401 and not unauthorized.retryable
    assert unreachable.status is None and unreachable.retryable
    assert missing.status == 404 and "Batch job not found" in str(missing)


@pytest.mark.parametrize(
    ("endpoint", "body", "reason"),
    [
        ("/v1/completions", {"model": MODEL, "prompt": "x"}, "cannot batch /v1/completions"),
        (CHAT, {"model": MODEL, "messages": [], "logit_bias": {"1": 2}}, "`logit_bias`"),
        (CHAT, {"model": MODEL, "messages": [], "user": "u1"}, "`user`"),
        (CHAT, {"model": MODEL, "messages": [], "seed": 1, "random_seed": 2}, "seed and random_seed differ"),
        (CHAT, {"model": MODEL, "messages": [], "service_tier": "flex"}, "service_tier 'flex'"),
        (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x", "name": "bob"}]}, "have no name"),
        (CHAT, {"model": MODEL, "messages": [{"role": "function", "content": "x"}]}, "no 'function' role"),
        (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "file", "file": {}}]}]},
         "'file' content parts"),
        (CHAT, {"model": MODEL, "messages": [], "tools": [{"type": "custom", "custom": {"name": "x"}}]},
         "only function tools"),
        ("/v1/embeddings", {"model": "e", "input": "x", "user": "u"}, "`user`"),
        ("/v1/moderations", {"model": "m", "input": [{"type": "image_url"}]}, "text only"),
    ],
)  # fmt: skip
def test_check_request_names_what_mistral_lacks(endpoint: str, body: dict[str, Any], reason: str) -> None:
    reasons = MistralBatchProvider.check_request(endpoint, body)
    assert reasons and reason in "; ".join(reasons), reasons


def test_check_request_passes_what_translates() -> None:
    body = {
        "model": MODEL, "messages": [
            {"role": "developer", "content": "x"},
            {"role": "user", "content": [
                {"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
            {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "42"},
        ],
        "max_completion_tokens": 5, "seed": 3, "logprobs": True, "top_logprobs": 2, "n": 2,
        "response_format": {"type": "json_object"}, "tool_choice": "required", "parallel_tool_calls": False,
        "safe_prompt": True, "user": None,
    }  # fmt: skip
    assert MistralBatchProvider.check_request(CHAT, body) == []


def test_key_and_base_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MISTRAL_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="set MISTRAL_API_KEY or pass --api-key"):
        create_provider("mistral")
    monkeypatch.setenv("MISTRAL_API_KEY", KEY)
    assert create_provider("mistral").base_url == "https://api.mistral.ai"  # type: ignore[attr-defined]
    assert create_provider("mistral", base_url="http://h:1/v1/").base_url == "http://h:1"  # type: ignore[attr-defined]


# -- `llmbatch run --provider mistral` -----------------------------------------------------


def run_cli(tmp_path: Path, fake: MistralFake, inp: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MISTRAL_")}
    env.update(LLMBATCH_HOME=str(tmp_path / "home"), MISTRAL_API_KEY=KEY, NO_PROXY="127.0.0.1,localhost")
    cmd = [sys.executable, "-m", "llmbatch", "run", str(inp), "--provider", "mistral",
           "--base-url", fake.url, "--poll-interval", "0.05", *extra]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def found_events(tmp_path: Path) -> list[str]:
    """The job's "found upload/batch" events: what reconciliation adopted."""
    (job_dir,) = (tmp_path / "home" / "jobs").iterdir()
    db = sqlite3.connect(job_dir / "job.sqlite")
    try:
        return [m for (m,) in db.execute("SELECT message FROM events WHERE message LIKE '%: found %'")]
    finally:
        db.close()


def test_cli_chunks_order_row_errors_retries_and_lost_answers(fake: MistralFake, tmp_path: Path) -> None:
    fake.expire_next = 1  # the first batch to end times out with half its rows done
    fake.lose_create_answers = 2  # two creations happen, but their answers are lost
    texts = [f"text {i}" for i in range(25)]
    texts[4], texts[17] = "FAIL400 four", "FAIL400 seventeen"
    texts[6], texts[12], texts[21] = "FAIL429 six", "FAIL429 twelve", "FAIL429 twenty-one"
    rows = [chat_line(i, t, model=MODEL, max_completion_tokens=20) for i, t in enumerate(texts)]
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(jsonl(rows))

    proc = run_cli(tmp_path, fake, inp, "--batch-size", "10")
    assert proc.returncode == 1, proc.stderr

    out = read_lines(tmp_path / "input.results.jsonl")
    assert [r["custom_id"] for r in out] == [r["custom_id"] for r in rows]
    for n, rec in enumerate(out):
        if n in (4, 17):
            assert rec["response"]["status_code"] == 400
        else:
            assert rec["response"]["status_code"] == 200, rec
            assert rec["response"]["body"]["choices"][0]["message"]["content"] == texts[n]
    errors = read_lines(tmp_path / "input.errors.jsonl")
    assert [e["custom_id"] for e in errors] == ["row-4", "row-17"]
    assert all(e["response"]["body"]["error"]["message"] == "Invalid request: FAIL400" for e in errors)

    batches = fake.batch_list()
    tags = [b["metadata"][TAG_KEY] for b in batches]
    assert len(set(tags)) == len(tags), "a chunk got two remote batches"
    assert sorted(len(fake.lines[b["id"]]) for b in batches[:3]) == [5, 10, 10]
    assert all(line["body"]["max_tokens"] == 20 for b in batches for line in fake.lines[b["id"]])
    (lapsed,) = [b for b in batches if b["status"] == "TIMEOUT_EXCEEDED"]
    half = len(fake.lines[lapsed["id"]]) // 2
    expired = sorted(line["custom_id"] for line in fake.lines[lapsed["id"]][half:])
    retried = sorted(line["custom_id"] for b in batches[3:] for line in fake.lines[b["id"]])
    assert retried == sorted(expired + ["row-12", "row-21", "row-6"])
    assert sum("found batch" in m for m in found_events(tmp_path)) == 2


def test_cli_reports_unsupported_parameters_at_ingest(fake: MistralFake, tmp_path: Path) -> None:
    rows = [chat_line(0, model=MODEL), chat_line(1, model=MODEL, logit_bias={"5": 1}),
            chat_line(2, model=MODEL), chat_line(3, model=MODEL, user="someone")]  # fmt: skip
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(jsonl(rows))

    proc = run_cli(tmp_path, fake, inp)
    assert proc.returncode == 2, proc.stderr
    assert "input.jsonl:2" in proc.stderr and "logit_bias" in proc.stderr
    assert "input.jsonl:4" in proc.stderr and "`user`" in proc.stderr
    assert "input.jsonl:1" not in proc.stderr and "input.jsonl:3" not in proc.stderr
    assert fake.batches == {} and fake.files == {}


@pytest.mark.live
def test_live_tiny_job(tmp_path: Path) -> None:
    """Two rows on Mistral's real Batch API (run with pytest --live and MISTRAL_API_KEY set)."""
    if not os.environ.get("MISTRAL_API_KEY"):
        pytest.skip("MISTRAL_API_KEY is not set")
    rows = [chat_line(i, f"Reply with the word {w}.", model="mistral-small-latest", max_completion_tokens=5)
            for i, w in enumerate(["apple", "pear"])]  # fmt: skip
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(jsonl(rows))
    env = {**os.environ, "LLMBATCH_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "llmbatch", "run", str(inp), "--provider", "mistral", "--poll-interval", "20"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=6 * 3600)
    assert proc.returncode == 0, proc.stderr
    out = read_lines(tmp_path / "input.results.jsonl")
    assert [r["response"]["status_code"] for r in out] == [200, 200]
