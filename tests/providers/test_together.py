"""The Together adapter against an HTTP fake of Together's Batch API (tests/fakes/together.py).

The adapter and the official `together` SDK under it talk over real HTTP to the fake; the
end-to-end tests run `llmbatch run --provider together` as a subprocess against it.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes.together import TogetherFake
from provider_cli import (
    CHAT,
    KEY,
    check_cancel,
    check_expiry,
    check_marked_batches,
    check_store_rollback,
    chunk_file,
    failed_batch,
    found_events,
    leave_orphans,
    poll_to_end,
    read_lines,
    read_shuffled_output,
    restart,
    run_live_job,
    run_marked_job,
    run_refused_job,
    served,
    thirty_row_job,
    with_adapter,
)

from conftest import chat_line, jsonl
from llmbatch._exceptions import ConfigError, ProviderError
from llmbatch.jobs import JobSettings
from llmbatch.providers import RemoteStatus, create_provider
from llmbatch.providers._together import TogetherBatchProvider

MODEL = "meta-llama/Llama-3.3-70B-Instruct-Turbo"


@pytest.fixture
def fake() -> Iterator[TogetherFake]:
    with served(TogetherFake(api_key=KEY)) as fake:
        yield fake


def provider(fake: TogetherFake) -> TogetherBatchProvider:
    return TogetherBatchProvider(api_key=KEY, base_url=fake.url)


# -- the adapter ---------------------------------------------------------------------------


def test_upload_writes_together_lines_under_the_tagged_name(fake: TogetherFake, tmp_path: Path) -> None:
    rows = [
        chat_line(0, model=MODEL, max_completion_tokens=7),
        {**chat_line(1, model=MODEL), "body": {"model": MODEL, "messages": [
            {"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}]}},
    ]  # fmt: skip
    path = chunk_file(tmp_path, rows)

    async def scenario(p: TogetherBatchProvider) -> tuple[str, str | None, str | None, str | None, str]:
        fid = await p.upload("job1-c00001", path)
        found = await p.find_upload("job1-c00001", int(time.time()) - 60)
        other = await p.find_upload("job1-c00002", 0)
        later = await p.find_upload("job1-c00001", int(time.time()) + 3600)
        again = await p.upload("job1-c00001", path)
        return fid, found, other, later, again

    fid, found, other, later, again = with_adapter(provider(fake), scenario)
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
    texts[3], texts[11], texts[15] = "FAIL400 please", "FAIL429 now", "FAILSTATUS"
    rows = [chat_line(i, t, model=MODEL) for i, t in enumerate(texts)]
    path = chunk_file(tmp_path, rows)

    async def scenario(p: TogetherBatchProvider) -> tuple[list[RemoteStatus], Any]:
        fid = await p.upload("t-c00001", path)
        b = await p.create_batch("t-c00001", "job", fid, CHAT)
        assert b.status is RemoteStatus.VALIDATING
        statuses = await poll_to_end(p, b.id)
        final = await p.get_batch(b.id)
        await p.download(final.output_file_id, tmp_path / "out.jsonl")
        await p.download(final.error_file_id, tmp_path / "err.jsonl")
        return statuses, final

    statuses, final = with_adapter(provider(fake), scenario)
    assert statuses == [RemoteStatus.VALIDATING, RemoteStatus.IN_PROGRESS, RemoteStatus.COMPLETED]
    out = read_shuffled_output(tmp_path / "out.jsonl")
    for rec in out:
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
    # A code naming a bad request ("invalid_model", as in Together's docs) fails the row for good: a 400.
    bad = errors["row-3"]["response"]
    assert bad["status_code"] == 400
    assert bad["body"]["error"]["message"] == "Input validation error: FAIL400"
    assert bad["body"]["error"]["type"] == "invalid_request_error"
    assert errors["row-3"]["native"]["error"]["code"] == "invalid_model"
    also_bad = errors["row-15"]["response"]
    assert also_bad["status_code"] == 400  # a status-400 response line, its bare string error made a body
    assert also_bad["body"]["error"]["message"] == "Input validation error: FAILSTATUS"
    assert also_bad["body"]["error"]["type"] == "invalid_request_error"
    # Any other code ("timeout") is a row that did not run: retried by the runner.
    limited = errors["row-11"]
    assert limited["response"] is None and limited["error"]["code"] == "timeout"


def test_expired_batch_keeps_only_finished_rows(fake: TogetherFake, tmp_path: Path) -> None:
    fake.expire_next = 1
    with_adapter(provider(fake), lambda p: check_expiry(p, tmp_path, MODEL))


def test_failed_validation_reports_the_reason(fake: TogetherFake) -> None:
    fid = fake.add_file("bad.jsonl", jsonl([chat_line(0, model=MODEL)]))  # OpenAI's envelope, not Together's

    failed = with_adapter(provider(fake), lambda p: failed_batch(p, fid))
    assert failed.errors == [{"code": "batch_failed", "param": None, "line": None,
                              "message": "line 1: each line must hold exactly custom_id and body"}]  # fmt: skip


def test_a_running_batch_reports_its_share_done(fake: TogetherFake, tmp_path: Path) -> None:
    """Together gives no counts while a batch runs, only `progress` (0-100): the adapter passes it
    on as a fraction, which the runner turns into rows for the progress display."""
    fake.progress_polls = 3
    path = chunk_file(tmp_path, [chat_line(i, model=MODEL) for i in range(4)], "a.jsonl")

    async def scenario(p: TogetherBatchProvider) -> list[float | None]:
        made = await p.create_batch("t-c00001", "job", await p.upload("t-c00001", path), CHAT)
        shares = []
        batch = made
        while not batch.status.terminal:
            batch = await p.get_batch(made.id)
            if batch.status is RemoteStatus.IN_PROGRESS:
                shares.append(batch.fraction_done)
        return shares

    shares = with_adapter(provider(fake), scenario)
    assert all(s is not None for s in shares) and any(0 < s < 1 for s in shares), shares  # type: ignore[operator]
    assert shares == sorted(shares), shares  # type: ignore[type-var]


def test_cancel_goes_through_canceling(fake: TogetherFake, tmp_path: Path) -> None:
    fake.progress_polls = 50
    with_adapter(provider(fake), lambda p: check_cancel(p, tmp_path, MODEL))
    (b,) = fake.batches.values()
    assert b["status"] == "CANCELLED" and b["output_file_id"]


def test_find_batch_matches_the_chunks_own_upload(fake: TogetherFake, tmp_path: Path) -> None:
    p1 = chunk_file(tmp_path, [chat_line(i, model=MODEL) for i in range(3)], "a.jsonl")
    p2 = chunk_file(tmp_path, [chat_line(i, model=MODEL) for i in range(3, 6)], "b.jsonl")

    async def scenario(p: TogetherBatchProvider) -> None:
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

    with_adapter(provider(fake), scenario)
    assert len(fake.batches) == 1


def test_runner_adopts_an_upload_and_a_batch_made_before_a_crash(fake: TogetherFake, tmp_path: Path) -> None:
    store, job_dir, settings = thirty_row_job(tmp_path, "together", fake.url, MODEL)

    async def scenario() -> tuple[str, str]:
        p = provider(fake)
        orphans = await leave_orphans(store, job_dir, settings, p)
        await restart(store, job_dir, settings, p)
        return orphans

    orphan_upload, orphan_batch = asyncio.run(scenario())
    batches = fake.batch_list()
    assert len(batches) == 3, "one batch per chunk"
    assert orphan_batch in {b["id"] for b in batches}
    assert orphan_upload in {b["input_file_id"] for b in batches}
    assert len((tmp_path / "in.results.jsonl").read_text().splitlines()) == 30


def test_direct_translates_both_ways(fake: TogetherFake) -> None:
    async def scenario(p: TogetherBatchProvider) -> tuple[tuple[int, Any], tuple[int, Any], tuple[int, Any]]:
        ok = await p.direct(CHAT, chat_line(0, "hi there", model=MODEL, max_completion_tokens=3)["body"])
        bad = await p.direct(CHAT, chat_line(1, "FAIL400", model=MODEL)["body"])
        other = await p.direct("/v1/embeddings", {"model": "m", "input": "x"})
        return ok, bad, other

    (status, body), (bad_status, bad_body), (other_status, _) = with_adapter(provider(fake), scenario)
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

    assert with_adapter(p, lambda p: p.find_upload("nothing", 0)) is None
    assert fake.calls[-1] == "GET /v1/files"


# -- `llmbatch run --provider together` ----------------------------------------------------


def test_cli_chunks_order_row_errors_retries_and_lost_answers(fake: TogetherFake, tmp_path: Path) -> None:
    fake.expire_next = 1  # the first batch to end expires with half its rows done
    fake.lose_upload_answers = 1  # an upload and two creations happen, but their answers are lost
    fake.lose_create_answers = 2
    run_marked_job("together", tmp_path, fake.url, "Input validation error: FAIL400", model=MODEL)

    batches = fake.batch_list()
    # Every batch has its own upload: no chunk got a second batch, lost answers or not.
    assert len({b["input_file_id"] for b in batches}) == len(batches)
    check_marked_batches(fake.lines, batches, "EXPIRED")
    found = found_events(tmp_path)
    assert sum("found upload" in m for m in found) == 1 and sum("found batch" in m for m in found) == 2, found


def test_cli_reports_unsupported_parameters_at_ingest(fake: TogetherFake, tmp_path: Path) -> None:
    stderr = run_refused_job("together", tmp_path, fake.url, MODEL, logprobs=True, top_logprobs=2)
    assert "logprobs" in stderr
    assert fake.batches == {} and fake.files == {}


@pytest.mark.live
def test_live_tiny_job(tmp_path: Path) -> None:
    """Two rows on Together's real Batch API (run with pytest --live and TOGETHER_API_KEY set)."""
    run_live_job("together", tmp_path, "meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo", max_tokens=5)


# -- a rolled-back job store (issue 13) -----------------------------------------------------


@pytest.mark.parametrize(
    ("stop_at", "keep"), [(2, False), (3, False), (3, True)], ids=["two-running", "one-collected", "one-collected-kept"]
)
def test_a_store_rolled_back_adopts_the_batches_of_the_jobs_uploads(
    fake: TogetherFake, tmp_path: Path, stop_at: int, keep: bool
) -> None:
    """Together batches carry no tag: the job's are found by their input files' names, so a
    collected chunk's upload is kept until the job has finished (then deleted, unless
    `--keep-uploads`), and a batch collected before the rollback is still found."""
    fake.validate_polls = fake.progress_polls = 2
    settings = JobSettings(provider="together", base_url=fake.url, batch_size=10, max_in_flight=2,
                           poll_interval=0.01, max_poll_interval=0.01, keep_uploads=keep)  # fmt: skip
    messages = check_store_rollback(
        tmp_path, settings, MODEL, lambda: provider(fake), lambda: len(fake.batches), stop_at
    )
    named = Counter(f["file_name"] for f in fake.upload_forms)
    batch_files = Counter(b["input_file_id"] for b in fake.batches.values())
    assert len(fake.batches) == 4 and set(batch_files.values()) == {1}, (named, batch_files)
    ran = Counter(line["custom_id"] for lines in fake.lines.values() for line in lines)
    assert ran == dict.fromkeys((f"row-{i}" for i in range(40)), 1)
    assert sum("adopted batch" in m for m in messages) == stop_at
    assert fake.calls.count("GET /v1/batches") == 2  # one listing per run
    # Once the job has finished, its uploads are deleted (kept with --keep-uploads).
    uploads = [f for f in fake.files.values() if f["filename"].startswith("llmbatch-")]
    assert len(uploads) == (4 if keep else 0), uploads
