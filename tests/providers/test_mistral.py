"""The Mistral adapter against an HTTP fake of Mistral's Batch API (tests/fakes/mistral.py).

The adapter and the official `mistralai` SDK under it talk over real HTTP to the fake; the
end-to-end tests run `llmbatch run --provider mistral` as a subprocess against it.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes.mistral import MistralFake
from provider_cli import (
    CHAT,
    KEY,
    TAG,
    check_cancel,
    check_expiry,
    check_marked_batches,
    check_store_rollback,
    chunk_file,
    failed_batch,
    found_events,
    leave_orphans,
    read_lines,
    read_shuffled_output,
    restart,
    run_batch,
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
from llmbatch.providers import JOB_KEY, TAG_KEY, RemoteStatus, create_provider
from llmbatch.providers._mistral import MistralBatchProvider

MODEL = "mistral-small-latest"


@pytest.fixture
def fake() -> Iterator[MistralFake]:
    with served(MistralFake(api_key=KEY)) as fake:
        yield fake


def provider(fake: MistralFake) -> MistralBatchProvider:
    return MistralBatchProvider(api_key=KEY, base_url=fake.url)


def row(i: int, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"custom_id": f"row-{i}", "method": "POST", "url": endpoint, "body": body}


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

    async def scenario(p: MistralBatchProvider) -> tuple[str, str | None, str | None, str | None]:
        fid = await p.upload("job1-c00001", path)
        found = await p.find_upload("job1-c00001", int(time.time()) - 60)
        other = await p.find_upload("job1-c00002", 0)
        later = await p.find_upload("job1-c00001", int(time.time()) + 3600)
        return fid, found, other, later

    fid, found, other, later = with_adapter(provider(fake), scenario)
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

    async def scenario(p: MistralBatchProvider) -> tuple[list[RemoteStatus], Any]:
        statuses = await run_batch(p, tmp_path, path)
        (job,) = fake.batches
        return statuses, await p.get_batch(job)

    statuses, final = with_adapter(provider(fake), scenario)
    assert statuses == [RemoteStatus.VALIDATING, RemoteStatus.IN_PROGRESS, RemoteStatus.COMPLETED]
    assert (final.total, final.completed, final.failed) == (20, 17, 3)
    assert final.metadata == {TAG_KEY: TAG, JOB_KEY: "job"}
    out = read_shuffled_output(tmp_path / "out.jsonl")
    for rec in out:
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

    async def scenario(p: MistralBatchProvider) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        await run_batch(p, tmp_path, emb, "/v1/embeddings")
        embedded = read_lines(tmp_path / "out.jsonl")
        await run_batch(p, tmp_path, mod, "/v1/moderations")
        return embedded, read_lines(tmp_path / "out.jsonl")

    (embedded,), (moderated,) = with_adapter(provider(fake), scenario)
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
    with_adapter(provider(fake), lambda p: check_expiry(p, tmp_path, MODEL))


def test_failed_validation_reports_errors_with_counts(fake: MistralFake) -> None:
    bad = jsonl([chat_line(i, model=MODEL) for i in range(3)]) + b"{not json\n"  # OpenAI's envelope, not Mistral's
    fid = fake.add_file("bad.jsonl", bad)

    failed = with_adapter(provider(fake), lambda p: failed_batch(p, fid))
    assert sorted(e["message"] for e in failed.errors) == [
        "a line is not valid JSON",
        "lines must hold exactly custom_id and body (3 requests)",
    ]


def test_cancel_goes_through_cancellation_requested(fake: MistralFake, tmp_path: Path) -> None:
    fake.running_polls = 50
    with_adapter(provider(fake), lambda p: check_cancel(p, tmp_path, MODEL))
    (b,) = fake.batches.values()
    assert b["status"] == "CANCELLED" and b["output_file"]


def test_find_batch_pages_through_the_listing(fake: MistralFake, tmp_path: Path) -> None:
    path = chunk_file(tmp_path, [chat_line(i, model=MODEL) for i in range(3)])

    async def scenario(p: MistralBatchProvider) -> None:
        p.page_size = 10
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

    with_adapter(provider(fake), scenario)
    listings = [c for c in fake.calls if c.startswith("GET /v1/batch/jobs?")]
    assert any("page=2" in c for c in listings), listings
    assert all("created_after=" in c for c in listings)


def test_runner_adopts_an_upload_and_a_batch_made_before_a_crash(fake: MistralFake, tmp_path: Path) -> None:
    store, job_dir, settings = thirty_row_job(tmp_path, "mistral", fake.url, MODEL)

    async def scenario() -> tuple[str, str]:
        p = provider(fake)
        orphans = await leave_orphans(store, job_dir, settings, p)
        await p.aclose()
        # The restart: a fresh process, which learns the found upload's model from the file.
        await restart(store, job_dir, settings, provider(fake))
        return orphans

    orphan_upload, orphan_batch = asyncio.run(scenario())
    batches = fake.batch_list()
    assert len(batches) == 3 and len({b["metadata"][TAG_KEY] for b in batches}) == 3
    assert [b["model"] for b in batches] == [MODEL] * 3
    assert orphan_batch in {b["id"] for b in batches}
    assert orphan_upload in {f for b in batches for f in b["input_files"]}
    assert len((tmp_path / "in.results.jsonl").read_text().splitlines()) == 30


def test_direct_translates_both_ways(fake: MistralFake) -> None:
    async def scenario(p: MistralBatchProvider) -> list[tuple[int, Any]]:
        return [
            await p.direct(CHAT, chat_line(0, "THINK hi", model=MODEL, max_completion_tokens=3)["body"]),
            await p.direct(CHAT, chat_line(1, "FAIL400", model=MODEL)["body"]),
            await p.direct("/v1/embeddings", {"model": "mistral-embed", "input": "x", "dimensions": 2}),
            await p.direct("/v1/completions", {"model": MODEL, "prompt": "x"}),
        ]

    (status, body), (bad_status, bad_body), (emb_status, _), (other_status, _) = with_adapter(provider(fake), scenario)
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


def test_cli_chunks_order_row_errors_retries_and_lost_answers(fake: MistralFake, tmp_path: Path) -> None:
    fake.expire_next = 1  # the first batch to end times out with half its rows done
    fake.lose_create_answers = 2  # two creations happen, but their answers are lost
    run_marked_job("mistral", tmp_path, fake.url, "Invalid request: FAIL400", model=MODEL, max_completion_tokens=20)

    batches = fake.batch_list()
    tags = [b["metadata"][TAG_KEY] for b in batches]
    assert len(set(tags)) == len(tags), "a chunk got two remote batches"
    assert all(line["body"]["max_tokens"] == 20 for b in batches for line in fake.lines[b["id"]])
    check_marked_batches(fake.lines, batches, "TIMEOUT_EXCEEDED")
    assert sum("found batch" in m for m in found_events(tmp_path)) == 2


def test_cli_reports_unsupported_parameters_at_ingest(fake: MistralFake, tmp_path: Path) -> None:
    stderr = run_refused_job("mistral", tmp_path, fake.url, MODEL, logit_bias={"5": 1})
    assert "logit_bias" in stderr
    assert fake.batches == {} and fake.files == {}


@pytest.mark.live
def test_live_tiny_job(tmp_path: Path) -> None:
    """Two rows on Mistral's real Batch API (run with pytest --live and MISTRAL_API_KEY set)."""
    run_live_job("mistral", tmp_path, "mistral-small-latest", max_completion_tokens=5)


# -- a rolled-back job store (issue 13) -----------------------------------------------------


@pytest.mark.parametrize("stop_at", [2, 3], ids=["two-running", "one-collected"])
def test_a_store_rolled_back_adopts_the_jobs_batches_by_their_metadata(
    fake: MistralFake, tmp_path: Path, stop_at: int
) -> None:
    fake.queued_polls = fake.running_polls = 2
    settings = JobSettings(provider="mistral", base_url=fake.url, batch_size=10, max_in_flight=2,
                           poll_interval=0.01, max_poll_interval=0.01)  # fmt: skip
    messages = check_store_rollback(
        tmp_path, settings, MODEL, lambda: provider(fake), lambda: len(fake.batches), stop_at
    )
    tags = Counter((b["metadata"] or {}).get(TAG_KEY) for b in fake.batches.values())
    assert len(tags) == 4 and set(tags.values()) == {1}, tags
    ran = Counter(line["custom_id"] for lines in fake.lines.values() for line in lines)
    assert ran == dict.fromkeys((f"row-{i}" for i in range(40)), 1)
    assert sum("adopted batch" in m for m in messages) == stop_at
    # One listing of the job's batches per run, from the job's inputs' time on.
    assert sum(c.startswith("GET /v1/batch/jobs?") and "created_after" in c for c in fake.calls) == 2
