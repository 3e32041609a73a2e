"""The job runner in-process against `MemoryProvider`, an in-memory fake of OpenAI's Batch API.

Each test opens a real job (`JobSession.open` + `prepare`: a real input file, a real job store)
and runs it through `JobRunner` with the fake in place of the provider, so planning, retries,
the budget and reconciling run in milliseconds with no server, no socket and no sleeping: the
fake advances a batch on each poll. Expectations come from the test's own arithmetic (row
counts, the input's custom_ids in order, prices from the rates the test sets), and what the
provider saw from the fake's own counts (calls, batches, rows sent and run).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fakes.memory_provider import BatchScript, Crash, MemoryProvider, Request, RowError, chat_completion
from pydantic import BaseModel, ConfigDict, Field

from conftest import back_up_store, chat_line, jsonl
from llmbatch._exceptions import ConfigError, ProviderError
from llmbatch.jobs import (
    EXIT_BUDGET,
    EXIT_FAILED_ROWS,
    EXIT_OK,
    JobRunner,
    JobSession,
    JobSettings,
    Prepared,
    line_id,
)

FAST = {"poll_interval": 0.001, "max_poll_interval": 0.001}


# -- helpers ---------------------------------------------------------------------------------


@dataclass
class Job:
    """A job opened and prepared for the test, run with the fake in place of its provider."""

    tmp: Path
    session: JobSession
    prepared: Prepared
    rows: list[dict[str, Any]]
    messages: list[str] = field(default_factory=list)

    @property
    def ids(self) -> list[str]:
        return [r["custom_id"] for r in self.rows]

    def runner(self, fake: MemoryProvider) -> JobRunner:
        return JobRunner(
            self.session.store, self.session.dir, self.prepared.settings, fake,
            prices=self.prepared.prices, say=self.messages.append,
        )  # fmt: skip

    def run(self, fake: MemoryProvider) -> Any:
        return asyncio.run(self.runner(fake).run())

    def again(self, **settings: Any) -> None:
        """Prepares the job again with changed settings (a rerun of `llmbatch run` with new flags)."""
        new = self.prepared.settings.model_copy(update=settings)
        self.prepared = self.session.prepare(new)

    def results(self) -> list[dict[str, Any]]:
        return read_lines(self.tmp / "input.results.jsonl")

    def errors(self) -> list[dict[str, Any]]:
        path = self.tmp / "input.errors.jsonl"
        return read_lines(path) if path.exists() else []


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def open_job(tmp_path: Path) -> Iterator[Callable[..., Job]]:
    """Opens a job of `rows` with these settings (provider "openai"; the fake replaces it)."""
    sessions: list[JobSession] = []

    def make(rows: list[dict[str, Any]], **settings: Any) -> Job:
        inp = tmp_path / "input.jsonl"
        inp.write_bytes(jsonl(rows))
        js = JobSettings(provider="openai", **{**FAST, **settings})
        messages: list[str] = []
        session, created = JobSession.open([inp], js, tmp_path / "jobs", api_key="test", say=messages.append)
        assert created
        sessions.append(session)
        return Job(tmp_path, session, session.prepare(js), rows, messages)

    yield make
    for s in sessions:
        s.close()


def row_no(request: Request) -> int:
    """The input index of a `chat_line(i)` row (from its custom_id, or its text for a direct call)."""
    if request.custom_id is not None:
        return int(request.custom_id.rsplit("-", 1)[1])
    return int(request.text.rsplit(" ", 1)[1])


def ok(request: Request, completion_tokens: int = 5) -> tuple[int, Any]:
    return 200, chat_completion(request.text, completion_tokens=completion_tokens)


def assert_all_succeeded(job: Job) -> None:
    out = job.results()
    assert [r["custom_id"] for r in out] == job.ids
    for rec, row in zip(out, job.rows):
        assert rec["error"] is None and rec["response"]["status_code"] == 200, rec
        assert rec["response"]["body"]["choices"][0]["message"]["content"] == row["body"]["messages"][-1]["content"]


def answered_directly(job: Job) -> list[str]:
    """The custom_ids of the rows no batch answered: their lines' ids are derived from job and row."""
    job_id = job.session.store.job()["id"]
    return [r["custom_id"] for i, r in enumerate(job.results()) if r["id"] == line_id(job_id, i)]


def assert_one_batch_per_chunk(job: Job, fake: MemoryProvider, chunks: int) -> None:
    tags = Counter(b.tag for b in fake.batch_list)
    assert len(tags) == chunks and set(tags.values()) == {1}, tags
    assert {c.batch_id for c in job.session.store.chunks()} == set(fake.batches)


# -- planning under limits ------------------------------------------------------------------


def test_batch_size_splits_rows_into_chunks_in_input_order(open_job: Callable[..., Job]) -> None:
    job = open_job([chat_line(i) for i in range(250)], batch_size=60)
    fake = MemoryProvider()
    assert job.run(fake).code == EXIT_OK
    assert [len(b.lines) for b in fake.batch_list] == [60, 60, 60, 60, 10]
    assert [cid for b in fake.batch_list for cid in b.custom_ids] == job.ids
    assert_one_batch_per_chunk(job, fake, 5)
    assert_all_succeeded(job)
    assert fake.calls["upload"] == fake.calls["create_batch"] == fake.calls["delete_file"] == 5


def test_max_bytes_limits_each_chunk_file(open_job: Callable[..., Job]) -> None:
    rows = [chat_line(f"r{i:03d}", f"hello {i:03d}") for i in range(30)]
    lengths = {len(json.dumps(r)) for r in rows}
    assert len(lengths) == 1  # every line the same size: 7 fit in the limit, 8 do not
    line = lengths.pop() + 1  # with its newline
    job = open_job(rows, max_bytes=7 * line + line // 2)
    fake = MemoryProvider()
    assert job.run(fake).code == EXIT_OK
    assert [len(b.lines) for b in fake.batch_list] == [7, 7, 7, 7, 2]
    assert [len(fake.files[b.input_file_id].data) for b in fake.batch_list] == [7 * line] * 4 + [2 * line]
    assert [cid for b in fake.batch_list for cid in b.custom_ids] == job.ids


def test_max_in_flight_caps_batches_at_once(open_job: Callable[..., Job]) -> None:
    job = open_job([chat_line(i) for i in range(50)], batch_size=5, max_in_flight=3)
    fake = MemoryProvider(polls=4)
    assert job.run(fake).code == EXIT_OK
    assert len(fake.batch_list) == 10
    assert fake.max_in_flight_seen == 3
    assert_all_succeeded(job)


def test_enqueued_token_limit_spreads_chunks_and_passes_a_row_larger_than_it(open_job: Callable[..., Job]) -> None:
    rows = [chat_line(i, "the same short prompt") for i in range(12)]
    rows.append(chat_line(12, " ".join(["word"] * 80)))
    # The limit is set from the rows' own estimates, as ingest recorded them: 3.5 rows' worth.
    probe = open_job(rows)
    estimates = [est_in for _m, est_in, _o in probe.session.store.pending_estimates()]
    small, big = set(estimates[:12]), estimates[12]
    assert len(small) == 1
    (each,) = small
    limit = 3 * each + each // 2
    assert big > limit
    probe.session.close()
    (probe.tmp / "jobs").rename(probe.tmp / "probe-jobs")

    job = open_job(rows, max_enqueued_tokens=limit)
    fake = MemoryProvider(polls=3)
    assert job.run(fake).code == EXIT_OK
    assert [len(b.lines) for b in fake.batch_list] == [3, 3, 3, 3, 1]
    assert fake.max_in_flight_seen == 1  # two chunks of 3 rows would pass the limit
    assert [cid for b in fake.batch_list for cid in b.custom_ids] == job.ids


def test_one_model_and_endpoint_per_batch(open_job: Callable[..., Job]) -> None:
    rows: list[dict[str, Any]] = []
    for i in range(30):
        if i % 3 == 0:
            rows.append(chat_line(i, model="gpt-4o"))
        elif i % 3 == 1:
            rows.append(chat_line(i, model="gpt-4o-mini"))
        else:
            rows.append({"custom_id": f"row-{i}", "method": "POST", "url": "/v1/embeddings",
                         "body": {"model": "text-embedding-3-small", "input": f"text {i}"}})  # fmt: skip
    job = open_job(rows, batch_size=4)
    fake = MemoryProvider()
    assert job.run(fake).code == EXIT_OK
    assert all(b.status == "completed" for b in fake.batch_list)  # the fake refuses mixed files
    by_group: dict[tuple[str, str], list[str]] = {}
    for b in fake.batch_list:
        assert len(b.models) == 1 and {line["url"] for line in b.lines} == {b.endpoint}
        by_group.setdefault((b.endpoint, b.models.pop()), []).extend(b.custom_ids)
    assert sorted(len(b.lines) for b in fake.batch_list) == sorted([4, 4, 2] * 3)
    # Each group's rows went in input order, every row once.
    assert by_group == {
        ("/v1/chat/completions", "gpt-4o"): [f"row-{i}" for i in range(0, 30, 3)],
        ("/v1/chat/completions", "gpt-4o-mini"): [f"row-{i}" for i in range(1, 30, 3)],
        ("/v1/embeddings", "text-embedding-3-small"): [f"row-{i}" for i in range(2, 30, 3)],
    }
    out = job.results()
    assert [r["custom_id"] for r in out] == job.ids
    assert all(r["response"]["status_code"] == 200 for r in out)


# -- retries --------------------------------------------------------------------------------


def test_retryable_row_errors_are_retried_until_they_succeed(open_job: Callable[..., Job]) -> None:
    def answer(r: Request) -> Any:
        kind = row_no(r) % 4
        if kind == 0 and r.attempt == 1:
            return 429, {"error": {"message": "rate limited", "type": "rate_limit"}}
        if kind == 1 and r.attempt <= 2:
            return 500, {"error": {"message": "server error", "type": "server_error"}}
        if kind == 2 and r.attempt == 1:
            return RowError("batch_expired", "not run before the window passed")
        return ok(r)

    job = open_job([chat_line(i) for i in range(60)], max_attempts=3)
    fake = MemoryProvider(answer=answer)
    assert job.run(fake).code == EXIT_OK
    assert_all_succeeded(job)
    assert job.errors() == []
    # Round 1: all 60; round 2: the 45 that failed once; round 3: the 15 that failed twice.
    assert [len(b.lines) for b in fake.batch_list] == [60, 45, 15]
    expected = {f"row-{i}": (2, 3, 2, 1)[i % 4] for i in range(60)}  # by row_no % 4
    assert dict(fake.sent) == expected
    assert set(fake.ran.values()) == {1}


def test_rows_failing_every_attempt_are_final_and_a_400_at_once(open_job: Callable[..., Job]) -> None:
    always_503 = {f"row-{i}" for i in range(0, 40, 5)}
    bad_400 = {f"row-{i}" for i in (3, 14, 26)}

    def answer(r: Request) -> Any:
        if r.custom_id in always_503:
            return 503, {"error": {"message": "overloaded", "type": "server_error"}}
        if r.custom_id in bad_400:
            return 400, {"error": {"message": "bad request", "type": "invalid_request_error"}}
        return ok(r)

    job = open_job([chat_line(i) for i in range(40)], max_attempts=3)
    fake = MemoryProvider(answer=answer)
    assert job.run(fake).code == EXIT_FAILED_ROWS
    assert {cid: fake.sent[cid] for cid in always_503} == dict.fromkeys(always_503, 3)
    assert {cid: fake.sent[cid] for cid in bad_400} == dict.fromkeys(bad_400, 1)
    assert sum(fake.sent.values()) == 40 + 2 * len(always_503)
    out = job.results()
    assert [r["custom_id"] for r in out] == job.ids
    statuses = {r["custom_id"]: r["response"]["status_code"] for r in out}
    assert statuses == {cid: 503 if cid in always_503 else 400 if cid in bad_400 else 200 for cid in job.ids}
    errors = job.errors()
    assert [e["custom_id"] for e in errors] == [c for c in job.ids if c in always_503 | bad_400]  # input order


@pytest.mark.parametrize("report_unrun", [True, False], ids=["listed-unrun", "missing-unrun"])
def test_an_expired_batch_keeps_its_finished_rows_and_retries_the_rest(
    open_job: Callable[..., Job], report_unrun: bool
) -> None:
    job = open_job([chat_line(i) for i in range(40)])
    fake = MemoryProvider(report_unrun=report_unrun)
    fake.script(BatchScript.expire(run_rows=25))
    assert job.run(fake).code == EXIT_OK
    first, second = fake.batch_list
    assert first.status == "expired" and second.status == "completed"
    assert second.custom_ids == job.ids[25:]  # only the rows the window cut off
    assert set(fake.ran.values()) == {1} and len(fake.ran) == 40
    assert_all_succeeded(job)


def test_expired_rows_out_of_attempts_are_final(open_job: Callable[..., Job]) -> None:
    job = open_job([chat_line(i) for i in range(20)], max_attempts=1)
    fake = MemoryProvider()
    fake.script(BatchScript.expire(run_rows=12))
    assert job.run(fake).code == EXIT_FAILED_ROWS
    assert len(fake.batch_list) == 1
    errors = job.errors()
    assert [e["custom_id"] for e in errors] == job.ids[12:]
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    assert [r["response"]["status_code"] for r in job.results()[:12]] == [200] * 12


def test_a_batch_failing_validation_fails_the_rows_it_names_and_retries_the_others(
    open_job: Callable[..., Job],
) -> None:
    job = open_job([chat_line(i) for i in range(10)], max_attempts=2)
    fake = MemoryProvider()
    fake.script(BatchScript.fail("invalid_request", "line 4 is bad", line=4))
    assert job.run(fake).code == EXIT_FAILED_ROWS
    first, second = fake.batch_list
    assert first.status == "failed" and second.custom_ids == [c for c in job.ids if c != "row-3"]
    (error,) = job.errors()
    assert error["custom_id"] == "row-3" and "line 4 is bad" in error["error"]["message"]


# -- the budget -----------------------------------------------------------------------------


def test_budget_stops_before_the_cap_and_a_larger_cap_finishes_without_resending(
    open_job: Callable[..., Job], tmp_path: Path
) -> None:
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"gpt-4o-mini": {"input": 0, "output": 20, "batch_input": 0, "batch_output": 10}}))
    # Input is free and every reply uses all 10 of its max_tokens: each chunk of 100 rows is
    # estimated, and costs, 100 x 10 x $10 per 1M = $0.01.
    job = open_job([chat_line(i, max_tokens=10) for i in range(500)], batch_size=100, price_file=prices, max_cost=0.015)
    fake = MemoryProvider(answer=lambda r: ok(r, completion_tokens=10))
    outcome = job.run(fake)
    assert outcome.code == EXIT_BUDGET, outcome.summary
    assert "400 not run" in outcome.summary
    assert len(fake.batch_list) == 1
    assert job.session.store.totals()["cost"] == pytest.approx(0.01)
    out = job.results()
    assert [r["custom_id"] for r in out] == job.ids
    assert [r["response"]["status_code"] for r in out[:100]] == [200] * 100
    assert all(r["response"] is None and r["error"]["code"] == "not_run" for r in out[100:])
    assert job.session.store.job()["status"] == "budget_stopped"  # type: ignore[index]

    job.again(max_cost=1.0)
    assert job.run(fake).code == EXIT_OK
    assert len(fake.batch_list) == 5
    assert_one_batch_per_chunk(job, fake, 5)
    assert dict(fake.sent) == dict.fromkeys(job.ids, 1)  # nothing sent twice
    assert job.session.store.totals()["cost"] == pytest.approx(500 * 10 * 10 / 1e6)
    assert_all_succeeded(job)


def test_actual_usage_replaces_estimates_as_batches_finish(open_job: Callable[..., Job]) -> None:
    """Priced with --price-input/--price-output for a model the table lacks: each chunk of 100
    rows x max_tokens 1000 x $10 per 1M is estimated at $1.00, so a $1.50 cap holds one chunk
    in flight at a time; each actually costs 100 x 5 x $10 per 1M, and the job finishes."""
    rows = [chat_line(i, model="house-model", max_tokens=1000) for i in range(300)]
    job = open_job(rows, batch_size=100, price_input=0, price_output=10, max_cost=1.5)
    fake = MemoryProvider(answer=lambda r: ok(r, completion_tokens=5), polls=3)
    outcome = job.run(fake)
    assert outcome.code == EXIT_OK, outcome.summary
    assert len(fake.batch_list) == 3
    assert fake.max_in_flight_seen == 1
    assert job.session.store.totals()["cost"] == pytest.approx(300 * 5 * 10 / 1e6)
    assert_all_succeeded(job)


def test_a_budget_without_prices_is_refused_before_anything_is_sent(open_job: Callable[..., Job]) -> None:
    job = open_job([chat_line(i, model="house-model") for i in range(5)], max_cost=1.0)
    fake = MemoryProvider()
    with pytest.raises(ConfigError, match="house-model"):
        job.run(fake)
    assert sum(fake.calls.values()) == 0


# -- reconciling by tag ---------------------------------------------------------------------


def test_a_create_whose_answer_was_lost_is_adopted_by_tag(open_job: Callable[..., Job]) -> None:
    job = open_job([chat_line(i) for i in range(30)], batch_size=10)
    fake = MemoryProvider()
    fake.fail("create_batch", lose=True)  # the batch is made; the caller hears a timeout
    assert job.run(fake).code == EXIT_OK
    assert fake.calls["create_batch"] == 3  # never created again
    assert fake.calls["find_batch"] >= 1
    assert_one_batch_per_chunk(job, fake, 3)
    assert dict(fake.sent) == dict.fromkeys(job.ids, 1)
    assert_all_succeeded(job)


def test_an_upload_whose_answer_was_lost_is_found_by_tag(open_job: Callable[..., Job]) -> None:
    job = open_job([chat_line(i) for i in range(30)], batch_size=10)
    fake = MemoryProvider()
    fake.fail("upload", lose=True)
    assert job.run(fake).code == EXIT_OK
    assert fake.calls["upload"] == 3 and fake.calls["find_upload"] >= 1
    uploads = [f.id for f in fake.files.values() if f.purpose == "batch"]
    assert sorted(uploads) == sorted(b.input_file_id for b in fake.batch_list)
    assert_one_batch_per_chunk(job, fake, 3)
    assert_all_succeeded(job)


def test_retryable_submission_errors_are_ridden_out(open_job: Callable[..., Job]) -> None:
    job = open_job([chat_line(i) for i in range(30)], batch_size=10, max_in_flight=1)
    fake = MemoryProvider()
    fake.fail("upload", 3, status=503)
    fake.fail("create_batch", 2, status=429)
    fake.fail("get_batch", 2, status=500)
    fake.fail("download", 1, status=502)
    assert job.run(fake).code == EXIT_OK
    assert fake.calls["upload"] == 3 + 3 and fake.calls["create_batch"] == 3 + 2
    assert_one_batch_per_chunk(job, fake, 3)
    assert_all_succeeded(job)
    assert any("will try again" in m for m in job.messages)


def test_a_refused_create_stops_the_run_and_a_rerun_reuses_the_upload(open_job: Callable[..., Job]) -> None:
    job = open_job([chat_line(i) for i in range(20)])
    fake = MemoryProvider()
    fake.fail("create_batch", status=400)
    with pytest.raises(ProviderError) as refused:
        job.run(fake)
    assert refused.value.status == 400 and not refused.value.retryable
    assert fake.batch_list == [] and fake.calls["upload"] == 1

    assert job.run(fake).code == EXIT_OK
    (batch,) = fake.batch_list
    (upload,) = [f for f in fake.files.values() if f.purpose == "batch"]
    assert batch.input_file_id == upload.id and fake.calls["upload"] == 1
    assert_all_succeeded(job)


@pytest.mark.parametrize("before", [True, False], ids=["before", "after"])
@pytest.mark.parametrize("kind", ["upload", "create_batch", "get_batch", "download", "delete_file"])
def test_a_crash_inside_any_call_then_a_fresh_runner_finishes_every_row_once(
    open_job: Callable[..., Job], kind: str, before: bool
) -> None:
    job = open_job([chat_line(i) for i in range(30)], batch_size=10, max_in_flight=2)
    fake = MemoryProvider()
    fake.fail(kind, crash=True, before=before)
    with pytest.raises(Crash):
        job.run(fake)
    assert job.run(fake).code == EXIT_OK  # a fresh runner on the same store: the restart
    assert_one_batch_per_chunk(job, fake, 3)
    uploads = [f.id for f in fake.files.values() if f.purpose == "batch"]
    assert sorted(uploads) == sorted(b.input_file_id for b in fake.batch_list)  # none uploaded twice
    assert dict(fake.ran) == dict.fromkeys(job.ids, 1)
    assert dict(fake.sent) == dict.fromkeys(job.ids, 1)
    assert_all_succeeded(job)


def _run_until_batches(job: Job, fake: MemoryProvider, n: int) -> None:
    """Runs the job until the fake has made `n` batches, then stops it (as a kill would)."""

    async def interrupted() -> None:
        task = asyncio.create_task(job.runner(fake).run())
        while len(fake.batch_list) < n and not task.done():
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(interrupted())


def test_a_run_cancelled_mid_way_resumes_with_every_row_once(open_job: Callable[..., Job]) -> None:
    job = open_job([chat_line(i) for i in range(60)], batch_size=10, max_in_flight=2)
    fake = MemoryProvider(polls=3)

    _run_until_batches(job, fake, 3)
    assert 3 <= len(fake.batch_list) < 6
    assert job.run(fake).code == EXIT_OK
    assert_one_batch_per_chunk(job, fake, 6)
    assert dict(fake.ran) == dict.fromkeys(job.ids, 1)
    assert_all_succeeded(job)


# -- the direct API, a full quota -----------------------------------------------------------


def test_the_last_few_rows_go_through_the_direct_api(open_job: Callable[..., Job]) -> None:
    def answer(r: Request) -> Any:
        if r.via == "batch" and row_no(r) % 5 == 0:
            return 500, {"error": {"message": "server error", "type": "server_error"}}
        return ok(r)

    job = open_job([chat_line(i) for i in range(200)], direct_below=100, max_attempts=2)
    fake = MemoryProvider(answer=answer)
    assert job.run(fake).code == EXIT_OK
    assert len(fake.batch_list) == 1  # the 40 failed rows did not make a second batch
    assert fake.calls["direct"] == 40
    assert_all_succeeded(job)
    assert answered_directly(job) == [f"row-{i}" for i in range(0, 200, 5)]


def test_a_crash_during_direct_calls_resends_only_those_rows(open_job: Callable[..., Job]) -> None:
    def answer(r: Request) -> Any:
        if r.via == "batch" and row_no(r) % 10 == 0:
            return 500, {"error": {"message": "server error", "type": "server_error"}}
        return ok(r)

    job = open_job([chat_line(i) for i in range(50)], direct_below=10)
    fake = MemoryProvider(answer=answer)
    fake.fail("direct", crash=True)  # the first direct call is answered, then the process dies
    with pytest.raises(Crash):
        job.run(fake)
    assert job.run(fake).code == EXIT_OK
    assert len(fake.batch_list) == 1
    # The 5 rows with the direct API when it died are sent again (at most direct_below paid twice).
    assert fake.calls["direct"] == 5 + 5
    out = job.results()
    assert [r["custom_id"] for r in out] == job.ids and all(r["response"]["status_code"] == 200 for r in out)
    assert answered_directly(job) == [f"row-{i}" for i in range(0, 50, 10)]


def test_a_job_larger_than_direct_below_goes_in_batches_only(open_job: Callable[..., Job]) -> None:
    job = open_job([chat_line(i) for i in range(150)], batch_size=100, direct_below=100)
    fake = MemoryProvider()
    assert job.run(fake).code == EXIT_OK
    assert [len(b.lines) for b in fake.batch_list] == [100, 50]
    assert fake.calls["direct"] == 0
    assert_all_succeeded(job)


def test_the_job_model_goes_with_every_row_in_batches_direct_calls_and_retries(open_job: Callable[..., Job]) -> None:
    """`--model` replaces the rows' own model on every path that sends a row: the batch, the
    direct API, and retries through either (issue 15: direct calls sent the row's own model)."""
    models: Counter[tuple[str, str]] = Counter()

    def answer(r: Request) -> Any:
        models[r.via, r.body["model"]] += 1
        if r.attempt == 1 and row_no(r) % 5 == 0:  # fails once, in the batch and then directly
            return 500, {"error": {"message": "server error", "type": "server_error"}}
        return ok(r)

    job = open_job([chat_line(i) for i in range(200)], model="gpt-4.1-mini", direct_below=100, max_attempts=3)
    fake = MemoryProvider(answer=answer)
    assert job.run(fake).code == EXIT_OK
    # The 40 rows failed in the batch went direct, failed once more there and were sent again.
    assert len(fake.batch_list) == 1 and fake.calls["direct"] == 80
    assert models == {("batch", "gpt-4.1-mini"): 200, ("direct", "gpt-4.1-mini"): 80}
    assert_all_succeeded(job)

    models.clear()
    few = open_job([chat_line(i) for i in range(10)], model="gpt-4.1-mini", direct_below=100)
    assert few.run(MemoryProvider(answer=answer)).code == EXIT_OK
    # All ten directly; rows 0 and 5 failed their first direct call and were sent again.
    assert models == {("direct", "gpt-4.1-mini"): 12}


def test_a_batch_refused_for_a_full_quota_is_sent_again_after_a_pause_without_an_attempt(
    open_job: Callable[..., Job],
) -> None:
    clock = SimpleNamespace(skew=0.0)
    job = open_job([chat_line(i) for i in range(30)], max_attempts=1)  # a counted attempt would be final
    fake = MemoryProvider()
    fake.script(BatchScript.fail("token_limit_exceeded", "Enqueued token limit reached"))
    runner = job.runner(fake)
    runner.ctx.clock = lambda: time.monotonic() + clock.skew  # the pause passes when the test says

    async def scenario() -> Any:
        await runner.start()
        for _ in range(5):  # the refusal is collected; the rows wait out the pause
            await runner.round()
        assert fake.calls["create_batch"] == 1
        assert fake.batch_list[0].status == "failed"
        clock.skew += 3600.0
        return await runner.run()

    outcome = asyncio.run(scenario())
    assert outcome.code == EXIT_OK, outcome.summary
    first, second = fake.batch_list
    assert second.custom_ids == job.ids and second.status == "completed"
    assert_all_succeeded(job)


# -- exported lines' ids --------------------------------------------------------------------


class OutputResponse(BaseModel):
    status_code: int
    request_id: str | None
    body: Any


class OutputError(BaseModel):
    code: str | None
    message: str


class BatchRequestOutput(BaseModel):
    """OpenAI's batch output line (openai-openapi's `BatchRequestOutput`; the SDK has no type
    for it): `id` a string, as peers key on it."""

    model_config = ConfigDict(extra="allow")  # `native`: a translated line's original
    id: str = Field(min_length=1)
    custom_id: str
    response: OutputResponse | None
    error: OutputError | None


def test_every_exported_line_has_an_id_the_providers_or_one_from_job_and_row(
    open_job: Callable[..., Job], tmp_path: Path
) -> None:
    """Batch answers keep the provider's line id; a direct answer and an invalid row (which no
    batch answered) get one derived from the job and the row, the same on every export
    (issue 15: they were `"id": null`)."""

    def answer(r: Request) -> Any:
        if r.via == "batch" and row_no(r) == 2:
            return 500, {"error": {"message": "server error", "type": "server_error"}}  # retried directly
        if row_no(r) == 5:
            return 400, {"error": {"message": "bad request", "type": "invalid_request_error"}}  # final
        return ok(r)

    rows = [chat_line(i) for i in range(10)]
    del rows[7]["body"]["model"]  # invalid: skipped, exported as an error line
    job = open_job(rows, direct_below=3, skip_invalid=True)
    fake = MemoryProvider(answer=answer)
    assert job.run(fake).code == EXIT_FAILED_ROWS
    assert fake.calls["direct"] == 1
    out = [BatchRequestOutput.model_validate(r) for r in job.results()]
    assert [r.custom_id for r in out] == job.ids
    by_provider = {}
    for b in fake.batch_list:
        for line in b.ran + b.failed_lines:
            rec = json.loads(line)
            by_provider[rec["custom_id"]] = rec["id"]
    job_id = job.session.store.job()["id"]
    for i, r in enumerate(out):
        assert r.id == (by_provider[r.custom_id] if i not in (2, 7) else line_id(job_id, i)), r
    assert len({r.id for r in out}) == 10 and line_id(job_id, 2).startswith("batch_req_")
    again, _errors = job.session.export(tmp_path / "again.jsonl")
    assert again.read_bytes() == (tmp_path / "input.results.jsonl").read_bytes()


# -- the user's cancel ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_attempts", "report_unrun"), [(3, True), (1, True), (1, False)],
    ids=["default-attempts", "one-attempt", "one-attempt-unlisted"],
)  # fmt: skip
def test_user_cancel_refunds_cut_off_rows_and_resume_runs_them(
    open_job: Callable[..., Job], max_attempts: int, report_unrun: bool
) -> None:
    job = open_job([chat_line(i) for i in range(40)], max_attempts=max_attempts)
    fake = MemoryProvider(polls=10, report_unrun=report_unrun)

    async def interrupted_then_cancelled() -> int:
        task = asyncio.create_task(job.runner(fake).run())
        while not (fake.batch_list and fake.batch_list[0].ran):
            await asyncio.sleep(0)
        task.cancel()  # Ctrl+C
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return await job.runner(fake).cancel()  # `llmbatch cancel`

    assert asyncio.run(interrupted_then_cancelled()) == 1
    (batch,) = fake.batch_list
    done = len(batch.ran)
    assert batch.status == "cancelled" and 0 < done < 40
    counts = job.session.store.counts()
    assert (counts["succeeded"], counts["pending"]) == (done, 40 - done)

    assert job.run(fake).code == EXIT_OK  # resume
    first, second = fake.batch_list
    assert second.custom_ids == job.ids[done:]  # the cut-off rows, once more, whatever max_attempts
    assert dict(fake.ran) == dict.fromkeys(job.ids, 1)
    assert_all_succeeded(job)


# -- a damaged or rolled-back store ---------------------------------------------------------


def _restore(job: Job, backup: Path) -> None:
    """Puts the older copy back in place of the job's store (its -wal and -shm gone) and opens the job again."""
    path = job.session.store.path
    job.session.close()
    for extra in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        extra.unlink(missing_ok=True)
    shutil.copyfile(backup, path)
    job.session = JobSession(job.session.dir, api_key="test", say=job.messages.append)
    job.prepared = job.session.prepare(job.prepared.settings)


@pytest.mark.parametrize("backup_at", [0, 2], ids=["before-planning", "two-batches-in"])
def test_a_store_restored_from_an_older_copy_adopts_the_batches_it_lost(
    open_job: Callable[..., Job], tmp_path: Path, backup_at: int
) -> None:
    """Issue 13: a store rolled back to an older copy must not send a chunk again; its batches
    are found at the provider by the job's tag and adopted, and every row is sent once."""
    job = open_job([chat_line(i) for i in range(60)], batch_size=10, max_in_flight=2)
    fake = MemoryProvider(polls=3)
    backup = tmp_path / "backup.sqlite"
    if backup_at == 0:
        back_up_store(job.session.store.path, backup)

    async def interrupted() -> None:
        task = asyncio.create_task(job.runner(fake).run())
        while len(fake.batch_list) < backup_at and not task.done():
            await asyncio.sleep(0)
        if backup_at:
            back_up_store(job.session.store.path, backup)
        # More batches are created (and some collected) after the copy was made.
        while len(fake.batch_list) < 5 and not task.done():
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(interrupted())
    assert 5 <= len(fake.batch_list) < 6
    _restore(job, backup)
    listings = fake.calls["list_job_batches"]
    assert job.run(fake).code == EXIT_OK
    tags = Counter(b.tag for b in fake.batch_list)
    assert set(tags.values()) == {1}, tags
    assert dict(fake.sent) == dict.fromkeys(job.ids, 1)
    assert dict(fake.ran) == dict.fromkeys(job.ids, 1)
    assert_all_succeeded(job)
    assert any("adopted batch" in m for m in job.messages)
    assert fake.calls["list_job_batches"] == listings + 1  # one listing per run, not one per chunk


def test_an_adopted_batch_is_priced_as_it_was_planned(open_job: Callable[..., Job], tmp_path: Path) -> None:
    """A batch adopted after a rollback counts against --max-cost while it runs: its chunk is
    priced as the planner priced it before the store lost it (not at $0, which would let
    new chunks through the budget on top of it)."""
    job = open_job([chat_line(i) for i in range(30)], batch_size=10, max_in_flight=3, max_cost=100.0)
    fake = MemoryProvider(polls=1000)  # the batches stay running
    backup = tmp_path / "backup.sqlite"
    back_up_store(job.session.store.path, backup)

    _run_until_batches(job, fake, 3)
    planned = {c.tag: c.est_cost for c in job.session.store.chunks(("submitted",))}
    assert len(planned) == 3 and all(cost > 0 for cost in planned.values()), planned
    _restore(job, backup)

    async def audited() -> None:
        runner = job.runner(fake)
        await runner.start()

    asyncio.run(audited())
    store = job.session.store
    adopted = {c.tag: c.est_cost for c in store.chunks(("submitted",))}
    assert adopted.keys() == planned.keys()
    assert adopted == pytest.approx(planned)
    assert store.in_flight_cost() == pytest.approx(sum(planned.values()))


@pytest.mark.parametrize("unreadable", ["not-given", "deleted"])
def test_a_lost_batch_whose_rows_cannot_be_read_yet_holds_back_every_row_until_it_ends(
    open_job: Callable[..., Job], tmp_path: Path, unreadable: str
) -> None:
    """A lost batch still running whose input cannot be read (a provider that gives none back,
    as Gemini and Anthropic; or an input deleted) is polled until it ends and then adopted by
    its results; meanwhile nothing is sent, not even the last rows through the direct API (any
    pending row may be one of the batch's)."""
    job = open_job([chat_line(i) for i in range(20)], batch_size=10, max_in_flight=2)
    fake = MemoryProvider(polls=4, hide_inputs=unreadable == "not-given")
    backup = tmp_path / "backup.sqlite"
    back_up_store(job.session.store.path, backup)

    _run_until_batches(job, fake, 2)
    assert len(fake.batch_list) == 2 and not any(b.status.terminal for b in fake.batch_list)
    if unreadable == "deleted":
        for b in fake.batch_list:
            fake.files[b.input_file_id].deleted = True
    _restore(job, backup)
    job.again(direct_below=20)  # every row left is one of "the last few"
    assert job.run(fake).code == EXIT_OK
    assert len(fake.batch_list) == 2 and fake.calls["direct"] == 0
    assert dict(fake.sent) == dict.fromkeys(job.ids, 1)
    assert_all_succeeded(job)
    assert sum("holding back new batches until then" in m for m in job.messages) == 2
    assert sum("adopted batch" in m for m in job.messages) == 2


def test_a_store_consistent_with_the_provider_lists_once_and_adopts_nothing(open_job: Callable[..., Job]) -> None:
    job = open_job([chat_line(i) for i in range(30)], batch_size=10)
    fake = MemoryProvider()
    assert job.run(fake).code == EXIT_OK
    assert fake.calls["list_job_batches"] == 1 and fake.calls["download"] == 3  # results only
    assert_one_batch_per_chunk(job, fake, 3)
    assert not any("adopted" in m for m in job.messages)


def test_a_failed_listing_holds_back_every_submission_until_it_succeeds(open_job: Callable[..., Job]) -> None:
    job = open_job([chat_line(i) for i in range(30)], batch_size=10)
    fake = MemoryProvider()
    fake.fail("list_job_batches", 2, status=503)
    assert job.run(fake).code == EXIT_OK
    assert fake.calls["list_job_batches"] == 3
    assert_one_batch_per_chunk(job, fake, 3)
    assert any("listing the job's batches failed" in m for m in job.messages)
