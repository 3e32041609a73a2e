"""The Together adapter against an HTTP fake of Together's Batch API (tests/fakes/together.py).

The adapter and the official `together` SDK under it talk over real HTTP to the fake; the
end-to-end tests run `llmbatch run --provider together` as a subprocess against it.
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
from fakes.together import TogetherFake

from conftest import chat_line, jsonl
from llmbatch._exceptions import ConfigError, ProviderError
from llmbatch.jobs import JobRunner, JobSettings, ingest, open_job
from llmbatch.providers import RemoteStatus, create_provider
from llmbatch.providers._together import TogetherBatchProvider

KEY = "test-key"
CHAT = "/v1/chat/completions"
MODEL = "meta-llama/Llama-3.3-70B-Instruct-Turbo"


@pytest.fixture
def fake() -> Iterator[TogetherFake]:
    fake = TogetherFake(api_key=KEY)
    with serve_app(fake.app) as url:
        fake.url = url
        yield fake


def provider(fake: TogetherFake) -> TogetherBatchProvider:
    return TogetherBatchProvider(api_key=KEY, base_url=fake.url)


def chunk_file(tmp_path: Path, rows: list[dict[str, Any]], name: str = "chunk.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(jsonl(rows))
    return path


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


async def poll_to_end(p: TogetherBatchProvider, batch_id: str) -> list[RemoteStatus]:
    seen = []
    for _ in range(20):
        b = await p.get_batch(batch_id)
        if not seen or seen[-1] != b.status:
            seen.append(b.status)
        if b.status.terminal:
            return seen
    raise AssertionError(f"batch {batch_id} never ended: {seen}")


# -- the adapter ---------------------------------------------------------------------------


def test_upload_writes_together_lines_under_the_tagged_name(fake: TogetherFake, tmp_path: Path) -> None:
    rows = [
        chat_line(0, model=MODEL, max_completion_tokens=7),
        {**chat_line(1, model=MODEL), "body": {"model": MODEL, "messages": [
            {"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}]}},
    ]  # fmt: skip
    path = chunk_file(tmp_path, rows)

    async def scenario() -> tuple[str, str | None, str | None, str | None, str]:
        p = provider(fake)
        try:
            fid = await p.upload("job1-c00001", path)
            found = await p.find_upload("job1-c00001", int(time.time()) - 60)
            other = await p.find_upload("job1-c00002", 0)
            later = await p.find_upload("job1-c00001", int(time.time()) + 3600)
            again = await p.upload("job1-c00001", path)
            return fid, found, other, later, again
        finally:
            await p.aclose()

    fid, found, other, later, again = asyncio.run(scenario())
    f = fake.files[fid]
    assert f["filename"] == "llmbatch-job1-c00001.jsonl" and f["purpose"] == "batch-api"
    lines = fake.file_lines(fid)
    assert [set(x) for x in lines] == [{"custom_id", "body"}] * 2
    assert lines[0]["body"]["max_tokens"] == 7 and "max_completion_tokens" not in lines[0]["body"]
    assert [m["role"] for m in lines[1]["body"]["messages"]] == ["system", "user"]
    assert (found, other, later) == (fid, None, None)
    if fake.upload_forms[-1].get("checksum"):  # together 3 sends one, and then Together keeps one file
        assert again == fid
    assert sorted(x.name for x in tmp_path.iterdir()) == ["chunk.jsonl"]  # the translated copy is gone


def test_batch_lifecycle_results_and_row_errors(fake: TogetherFake, tmp_path: Path) -> None:
    texts = [f"hello {i}" for i in range(20)]
    texts[3], texts[11], texts[15] = "FAIL400 please", "FAIL429 now", "FAIL429 again"
    rows = [chat_line(i, t, model=MODEL) for i, t in enumerate(texts)]
    path = chunk_file(tmp_path, rows)

    async def scenario() -> tuple[list[RemoteStatus], Any]:
        p = provider(fake)
        try:
            fid = await p.upload("t-c00001", path)
            b = await p.create_batch("t-c00001", "job", fid, CHAT)
            assert b.status is RemoteStatus.VALIDATING
            statuses = await poll_to_end(p, b.id)
            final = await p.get_batch(b.id)
            await p.download(final.output_file_id, tmp_path / "out.jsonl")
            await p.download(final.error_file_id, tmp_path / "err.jsonl")
            return statuses, final
        finally:
            await p.aclose()

    statuses, final = asyncio.run(scenario())
    assert statuses == [RemoteStatus.VALIDATING, RemoteStatus.IN_PROGRESS, RemoteStatus.COMPLETED]
    out = read_lines(tmp_path / "out.jsonl")
    ids = [r["custom_id"] for r in out]
    assert sorted(ids) == sorted(f"row-{i}" for i in range(20) if i not in (3, 11, 15))
    assert ids != sorted(ids, key=lambda c: int(c.split("-")[1])), "the fake shuffles results"
    for rec in out:
        assert set(rec) == {"id", "custom_id", "response", "error", "native"}
        assert rec["error"] is None and rec["response"]["status_code"] == 200
        body = rec["response"]["body"]
        n = int(rec["custom_id"].split("-")[1])
        assert body["choices"][0]["message"]["content"] == texts[n]
        assert body["choices"][0]["finish_reason"] == "stop"  # Together says "eos"
        assert rec["native"]["response"]["body"]["choices"][0]["finish_reason"] == "eos"
        assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
        assert body["usage"]["completion_tokens"] == len(texts[n].split())
    errors = {r["custom_id"]: r for r in read_lines(tmp_path / "err.jsonl")}
    assert set(errors) == {"row-3", "row-11", "row-15"}
    bad = errors["row-3"]["response"]
    assert bad["status_code"] == 400
    assert bad["body"]["error"]["message"] == "Input validation error: FAIL400"  # was {"error": "string"}
    assert bad["body"]["error"]["type"] == "invalid_request_error"
    limited = errors["row-11"]
    assert limited["error"] is None and limited["response"]["status_code"] == 429
    assert limited["response"]["body"]["error"]["type"] == "rate_limit_error"


def test_expired_batch_keeps_only_finished_rows(fake: TogetherFake, tmp_path: Path) -> None:
    fake.expire_next = 1
    path = chunk_file(tmp_path, [chat_line(i, model=MODEL) for i in range(10)])

    async def scenario() -> list[RemoteStatus]:
        p = provider(fake)
        try:
            b = await p.create_batch("t-c00001", "job", await p.upload("t-c00001", path), CHAT)
            statuses = await poll_to_end(p, b.id)
            await p.download((await p.get_batch(b.id)).output_file_id or "", tmp_path / "out.jsonl")
            return statuses
        finally:
            await p.aclose()

    assert asyncio.run(scenario())[-1] is RemoteStatus.EXPIRED
    assert sorted(r["custom_id"] for r in read_lines(tmp_path / "out.jsonl")) == sorted(f"row-{i}" for i in range(5))


def test_failed_validation_reports_the_reason(fake: TogetherFake) -> None:
    fid = fake.add_file("bad.jsonl", jsonl([chat_line(0, model=MODEL)]))  # OpenAI's envelope, not Together's

    async def scenario() -> Any:
        p = provider(fake)
        try:
            b = await p.create_batch("t-c00001", "job", fid, CHAT)
            assert (await poll_to_end(p, b.id))[-1] is RemoteStatus.FAILED
            return await p.get_batch(b.id)
        finally:
            await p.aclose()

    failed = asyncio.run(scenario())
    assert failed.output_file_id is None and failed.error_file_id is None
    assert failed.errors == [{"code": "batch_failed", "param": None, "line": None,
                              "message": "line 1: each line must hold exactly custom_id and body"}]  # fmt: skip


def test_cancel_goes_through_canceling(fake: TogetherFake, tmp_path: Path) -> None:
    fake.progress_polls = 50
    path = chunk_file(tmp_path, [chat_line(i, model=MODEL) for i in range(6)])

    async def scenario() -> list[RemoteStatus]:
        p = provider(fake)
        try:
            b = await p.create_batch("t-c00001", "job", await p.upload("t-c00001", path), CHAT)
            await p.get_batch(b.id)
            await p.get_batch(b.id)
            cancelling = await p.cancel(b.id)
            return [cancelling.status, *await poll_to_end(p, b.id)]
        finally:
            await p.aclose()

    assert asyncio.run(scenario()) == [RemoteStatus.CANCELLING, RemoteStatus.CANCELLED]
    (b,) = fake.batches.values()
    assert b["status"] == "CANCELLED" and b["output_file_id"]


def test_find_batch_matches_the_chunks_own_upload(fake: TogetherFake, tmp_path: Path) -> None:
    p1 = chunk_file(tmp_path, [chat_line(i, model=MODEL) for i in range(3)], "a.jsonl")
    p2 = chunk_file(tmp_path, [chat_line(i, model=MODEL) for i in range(3, 6)], "b.jsonl")

    async def scenario() -> None:
        p = provider(fake)
        try:
            since = int(time.time()) - 300
            f1, f2 = await p.upload("t-c00001", p1), await p.upload("t-c00002", p2)
            made = await p.create_batch("t-c00001", "job", f1, CHAT)
            found = await p.find_batch("t-c00001", since, f1)
            assert found is not None and found.id == made.id
            assert await p.find_batch("t-c00002", since, f2) is None
            assert await p.find_batch("t-c00001", int(time.time()) + 3600, f1) is None
            with pytest.raises(ProviderError) as err:
                await p.find_batch("t-c00003", since, None)
            assert err.value.retryable  # no guessing: the runner asks again later
        finally:
            await p.aclose()

    asyncio.run(scenario())
    assert len(fake.batches) == 1


def test_runner_adopts_an_upload_and_a_batch_made_before_a_crash(fake: TogetherFake, tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(jsonl([chat_line(i, model=MODEL) for i in range(30)]))
    url = fake.url
    settings = JobSettings(provider="together", base_url=url, batch_size=10, poll_interval=0.05)
    store, job_dir, _ = open_job([inp], settings, tmp_path / "jobs")
    ingest(store, [inp], settings)

    async def scenario() -> tuple[str, str]:
        p = TogetherBatchProvider(api_key=KEY, base_url=url)
        runner = JobRunner(store, job_dir, settings, p, say=lambda m: None)
        runner.plan()
        c1, c2, _c3 = store.chunks(("planned",))
        # Chunk 1 was uploaded, then the process died before recording the file id.
        store.move_chunk(c1.id, "uploading", ("planned",), intent_at=c1.created_at)
        orphan_upload = await p.upload(c1.tag, runner._write_chunk_file(c1))
        # Chunk 2's batch was created, then the process died before recording the batch id.
        file_id = await p.upload(c2.tag, runner._write_chunk_file(c2))
        store.move_chunk(c2.id, "uploading", ("planned",), intent_at=c2.created_at)
        store.move_chunk(c2.id, "uploaded", ("uploading",), file_id=file_id)
        store.move_chunk(c2.id, "creating", ("uploaded",), intent_at=c2.created_at)
        orphan_batch = await p.create_batch(c2.tag, runner.job_id, file_id, c2.endpoint)
        outcome = await JobRunner(store, job_dir, settings, p, say=lambda m: None).run()
        await p.aclose()
        assert outcome.code == 0, outcome.summary
        return orphan_upload, orphan_batch.id

    orphan_upload, orphan_batch = asyncio.run(scenario())
    batches = fake.batch_list()
    assert len(batches) == 3, "one batch per chunk"
    assert orphan_batch in {b["id"] for b in batches}
    assert orphan_upload in {b["input_file_id"] for b in batches}
    assert len((tmp_path / "in.results.jsonl").read_text().splitlines()) == 30


def test_direct_translates_both_ways(fake: TogetherFake) -> None:
    async def scenario() -> tuple[tuple[int, Any], tuple[int, Any], tuple[int, Any]]:
        p = provider(fake)
        try:
            ok = await p.direct(CHAT, chat_line(0, "hi there", model=MODEL, max_completion_tokens=3)["body"])
            bad = await p.direct(CHAT, chat_line(1, "FAIL400", model=MODEL)["body"])
            other = await p.direct("/v1/embeddings", {"model": "m", "input": "x"})
            return ok, bad, other
        finally:
            await p.aclose()

    (status, body), (bad_status, bad_body), (other_status, _) = asyncio.run(scenario())
    assert status == 200 and body["choices"][0]["message"]["content"] == "hi there"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert fake.direct_bodies[0]["max_tokens"] == 3 and "max_completion_tokens" not in fake.direct_bodies[0]
    assert bad_status == 400
    assert bad_body == {"error": {"message": "Input validation error: FAIL400", "type": "invalid_request_error",
                                  "param": None, "code": None}}  # fmt: skip
    assert other_status == 400


def test_errors_become_provider_errors(fake: TogetherFake) -> None:
    async def scenario() -> tuple[ProviderError, ProviderError]:
        wrong_key = TogetherBatchProvider(api_key="nope", base_url=fake.url, max_retries=0)
        gone = TogetherBatchProvider(api_key=KEY, base_url="http://127.0.0.1:9", max_retries=0)
        try:
            with pytest.raises(ProviderError) as e1:
                await wrong_key.get_batch("x")
            with pytest.raises(ProviderError) as e2:
                await gone.get_batch("x")
            return e1.value, e2.value
        finally:
            await wrong_key.aclose()
            await gone.aclose()

    unauthorized, unreachable = asyncio.run(scenario())
    assert unauthorized.status == 401 and not unauthorized.retryable
    assert "Invalid API key provided" in str(unauthorized)
    assert unreachable.status is None and unreachable.retryable


@pytest.mark.parametrize(
    ("endpoint", "body", "reason"),
    [
        ("/v1/embeddings", {"model": MODEL, "input": "x"}, "cannot batch /v1/embeddings"),
        (CHAT, {"model": MODEL, "messages": [], "logprobs": True}, "logprobs"),
        (CHAT, {"model": MODEL, "messages": [], "top_logprobs": 2}, "`top_logprobs`"),
        (CHAT, {"model": MODEL, "messages": [], "user": "u1"}, "`user`"),
        (CHAT, {"model": MODEL, "messages": [], "max_tokens": 5, "max_completion_tokens": 6}, "differ"),
        (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "file", "file": {}}]}]},
         "'file' content parts"),
    ],
)  # fmt: skip
def test_check_request_names_what_together_lacks(endpoint: str, body: dict[str, Any], reason: str) -> None:
    reasons = TogetherBatchProvider.check_request(endpoint, body)
    assert reasons and reason in "; ".join(reasons), reasons


def test_check_request_passes_what_translates() -> None:
    body = {
        "model": MODEL, "messages": [{"role": "developer", "content": "x"}, {"role": "user", "content": [
            {"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}],
        "max_completion_tokens": 5, "logprobs": False, "top_k": 3, "temperature": 0.2, "user": None,
    }  # fmt: skip
    assert TogetherBatchProvider.check_request(CHAT, body) == []


def test_key_and_base_url(monkeypatch: pytest.MonkeyPatch, fake: TogetherFake) -> None:
    monkeypatch.delenv("TOGETHER_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="set TOGETHER_API_KEY or pass --api-key"):
        create_provider("together")
    monkeypatch.setenv("TOGETHER_API_KEY", KEY)
    monkeypatch.setenv("TOGETHER_BASE_URL", fake.url + "/v1")
    p = create_provider("together")
    assert isinstance(p, TogetherBatchProvider)
    assert p.base_url in (fake.url, fake.url + "/v1")  # whichever the installed SDK major wants

    async def listing() -> None:
        try:
            assert await p.find_upload("nothing", 0) is None
        finally:
            await p.aclose()

    asyncio.run(listing())
    assert fake.calls[-1] == "GET /v1/files"


# -- `llmbatch run --provider together` ----------------------------------------------------


def run_cli(tmp_path: Path, fake: TogetherFake, inp: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOGETHER_")}
    env.update(LLMBATCH_HOME=str(tmp_path / "home"), TOGETHER_API_KEY=KEY, NO_PROXY="127.0.0.1,localhost")
    cmd = [sys.executable, "-m", "llmbatch", "run", str(inp), "--provider", "together",
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


def test_cli_chunks_order_row_errors_retries_and_lost_answers(fake: TogetherFake, tmp_path: Path) -> None:
    fake.expire_next = 1  # the first batch to end expires with half its rows done
    fake.lose_upload_answers = 1  # an upload and two creations happen, but their answers are lost
    fake.lose_create_answers = 2
    texts = [f"text {i}" for i in range(25)]
    texts[4], texts[17] = "FAIL400 four", "FAIL400 seventeen"
    texts[6], texts[12], texts[21] = "FAIL429 six", "FAIL429 twelve", "FAIL429 twenty-one"
    rows = [chat_line(i, t, model=MODEL) for i, t in enumerate(texts)]
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
    assert all(e["response"]["body"]["error"]["message"] == "Input validation error: FAIL400" for e in errors)

    batches = fake.batch_list()
    # Every batch has its own upload: no chunk got a second batch, lost answers or not.
    assert len({b["input_file_id"] for b in batches}) == len(batches)
    assert sorted(len(fake.lines[b["id"]]) for b in batches[:3]) == [5, 10, 10]
    (lapsed,) = [b for b in batches if b["status"] == "EXPIRED"]
    retried = sorted(line["custom_id"] for b in batches[3:] for line in fake.lines[b["id"]])
    half = len(fake.lines[lapsed["id"]]) // 2
    expired = sorted(line["custom_id"] for line in fake.lines[lapsed["id"]][half:])
    assert retried == sorted(expired + ["row-12", "row-21", "row-6"])
    found = found_events(tmp_path)
    assert sum("found upload" in m for m in found) == 1 and sum("found batch" in m for m in found) == 2, found


def test_cli_reports_unsupported_parameters_at_ingest(fake: TogetherFake, tmp_path: Path) -> None:
    rows = [chat_line(0, model=MODEL), chat_line(1, model=MODEL, logprobs=True, top_logprobs=2),
            chat_line(2, model=MODEL), chat_line(3, model=MODEL, user="someone")]  # fmt: skip
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(jsonl(rows))

    proc = run_cli(tmp_path, fake, inp)
    assert proc.returncode == 2, proc.stderr
    assert "input.jsonl:2" in proc.stderr and "logprobs" in proc.stderr
    assert "input.jsonl:4" in proc.stderr and "`user`" in proc.stderr
    assert "input.jsonl:1" not in proc.stderr and "input.jsonl:3" not in proc.stderr
    assert fake.batches == {} and fake.files == {}


@pytest.mark.live
def test_live_tiny_job(tmp_path: Path) -> None:
    """Two rows on Together's real Batch API (run with pytest --live and TOGETHER_API_KEY set)."""
    if not os.environ.get("TOGETHER_API_KEY"):
        pytest.skip("TOGETHER_API_KEY is not set")
    rows = [chat_line(i, f"Reply with the word {w}.", model="meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo",
                      max_tokens=5) for i, w in enumerate(["apple", "pear"])]  # fmt: skip
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(jsonl(rows))
    env = {**os.environ, "LLMBATCH_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "llmbatch", "run", str(inp), "--provider", "together", "--poll-interval", "20"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=6 * 3600)
    assert proc.returncode == 0, proc.stderr
    out = read_lines(tmp_path / "input.results.jsonl")
    assert [r["response"]["status_code"] for r in out] == [200, 200]
