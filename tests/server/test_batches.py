"""The Batches API through the official openai SDK: lifecycle, outputs, errors, cancel, expiry."""

from __future__ import annotations

import json
import time
from typing import Any

import openai
import pytest

from conftest import TERMINAL, chat_line, jsonl, read_jsonl, run_batch, upload, wait_batch

CHAT = "/v1/chat/completions"
EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
ORDER = ["validating", "in_progress", "finalizing", "completed"]


def create(client: openai.OpenAI, rows: list[dict[str, Any]] | bytes, endpoint: str = CHAT, **kwargs: Any) -> Any:
    data = rows if isinstance(rows, bytes) else jsonl(rows)
    f = upload(client, data)
    kwargs.setdefault("completion_window", "24h")
    return client.batches.create(input_file_id=f.id, endpoint=endpoint, **kwargs)  # type: ignore[arg-type]


def watch(client: openai.OpenAI, batch_id: str, timeout: float = 30.0) -> tuple[Any, list[Any]]:
    """Polls until the batch ends; returns the final batch and every batch object seen."""
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        b = client.batches.retrieve(batch_id)
        seen.append(b)
        if b.status in TERMINAL:
            return b, seen
        assert time.monotonic() < deadline, f"batch {batch_id} still {b.status} after {timeout}s"
        time.sleep(0.02)


def wait_for(client: openai.OpenAI, batch_id: str, pred: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        b = client.batches.retrieve(batch_id)
        if pred(b):
            return b
        assert b.status not in TERMINAL, f"batch ended ({b.status}) before the awaited state: {b}"
        assert time.monotonic() < deadline, f"timed out waiting on batch {batch_id}: {b}"
        time.sleep(0.02)


def assert_one_line_per_row(rows: list[dict[str, Any]], *files: list[dict[str, Any]]) -> None:
    ids = [line["custom_id"] for f in files for line in f]
    assert sorted(ids) == sorted(r["custom_id"] for r in rows)
    assert len(ids) == len(set(ids))


# -- a successful batch --------------------------------------------------------------------


def test_chat_batch_completes(client: openai.OpenAI) -> None:
    n = 12
    rows = [chat_line(i, text=f"echo me number {i}, please") for i in range(n)]
    created = create(client, rows, metadata={"project": "tests", "run": "1"})
    assert created.object == "batch"
    assert created.id.startswith("batch_")
    assert created.status == "validating"
    assert created.endpoint == CHAT
    assert created.completion_window == "24h"
    assert created.expires_at == created.created_at + 86400
    assert created.metadata == {"project": "tests", "run": "1"}
    assert created.output_file_id is None and created.error_file_id is None

    b, seen = watch(client, created.id)
    statuses = [s.status for s in seen]
    assert b.status == "completed", b
    # statuses only ever move forward through validating -> in_progress -> finalizing -> completed
    ranks = [ORDER.index(s) for s in statuses]
    assert ranks == sorted(ranks), statuses

    assert b.created_at == created.created_at
    assert b.in_progress_at is not None and b.finalizing_at is not None and b.completed_at is not None
    assert b.created_at <= b.in_progress_at <= b.finalizing_at <= b.completed_at
    assert b.failed_at is None and b.expired_at is None and b.cancelling_at is None and b.cancelled_at is None
    assert b.expires_at == b.created_at + 86400
    assert b.request_counts is not None
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (n, n, 0)
    assert b.model == "gpt-4o-mini"
    assert b.metadata == {"project": "tests", "run": "1"}
    assert b.errors is None
    assert b.error_file_id is None

    out = read_jsonl(client, b.output_file_id)
    assert len(out) == n
    assert [line["custom_id"] for line in out] == [r["custom_id"] for r in rows]  # input order
    assert len({line["id"] for line in out}) == n
    for line, row in zip(out, rows):
        assert set(line) == {"id", "custom_id", "response", "error"}
        assert line["id"].startswith("batch_req_")
        assert line["error"] is None
        assert line["response"]["status_code"] == 200
        assert line["response"]["request_id"]
        body = line["response"]["body"]
        assert body["object"] == "chat.completion"
        assert body["model"] == "gpt-4o-mini"
        assert body["choices"][0]["message"]["content"] == row["body"]["messages"][0]["content"]
        assert body["choices"][0]["finish_reason"] == "stop"

    assert b.usage is not None
    assert b.usage.input_tokens > 0 and b.usage.output_tokens > 0
    assert b.usage.total_tokens == b.usage.input_tokens + b.usage.output_tokens
    assert b.usage.input_tokens == sum(line["response"]["body"]["usage"]["prompt_tokens"] for line in out)
    assert b.usage.output_tokens == sum(line["response"]["body"]["usage"]["completion_tokens"] for line in out)

    of = client.files.retrieve(b.output_file_id)
    assert of.purpose == "batch_output"
    assert of.filename == f"batch_{b.id}_output.jsonl"
    content = client.files.content(b.output_file_id).content
    assert of.bytes == len(content)
    assert content.endswith(b"\n") and content.count(b"\n") == n

    # the batch is listed, and retrieving it again gives the same object
    assert client.batches.retrieve(b.id).model_dump() == b.model_dump()
    assert b.id in [x.id for x in client.batches.list(limit=100)]


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/embeddings", "/v1/responses"])
def test_other_endpoints_complete(client: openai.OpenAI, endpoint: str) -> None:
    texts = [f"text number {i}" for i in range(4)]
    if endpoint == "/v1/completions":
        bodies = [{"model": "gpt-3.5-turbo-instruct", "prompt": t} for t in texts]
    elif endpoint == "/v1/embeddings":
        bodies = [{"model": "text-embedding-3-small", "input": t, "dimensions": 8} for t in texts]
    else:
        bodies = [{"model": "gpt-4o-mini", "input": t} for t in texts]
    rows = [{"custom_id": f"r{i}", "method": "POST", "url": endpoint, "body": b} for i, b in enumerate(bodies)]
    b = run_batch(client, rows, endpoint=endpoint)
    assert b.status == "completed", b
    assert b.endpoint == endpoint
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (4, 4, 0)
    assert b.model == bodies[0]["model"]
    assert b.usage.input_tokens > 0
    out = read_jsonl(client, b.output_file_id)
    assert [line["custom_id"] for line in out] == [r["custom_id"] for r in rows]
    for line, text in zip(out, texts):
        assert line["response"]["status_code"] == 200
        body = line["response"]["body"]
        if endpoint == "/v1/completions":
            assert body["object"] == "text_completion"
            assert body["choices"][0]["text"] == text
        elif endpoint == "/v1/embeddings":
            assert body["object"] == "list"
            assert len(body["data"][0]["embedding"]) == 8
        else:
            assert body["object"] == "response"
            assert body["output"][0]["content"][0]["text"] == text
    assert b.error_file_id is None


def test_request_counts_move_while_running(server_factory) -> None:  # type: ignore[no-untyped-def]
    srv = server_factory("--echo-latency", "0.05", "--max-concurrency", "4")
    client = srv.client()
    n = 200
    created = create(client, [chat_line(i) for i in range(n)])
    b, seen = watch(client, created.id, timeout=60)
    assert b.status == "completed"
    assert b.request_counts.completed == n

    statuses = [s.status for s in seen]
    assert "in_progress" in statuses
    ranks = [ORDER.index(s) for s in statuses]
    assert ranks == sorted(ranks), statuses

    running = [s.request_counts.completed for s in seen if s.status == "in_progress"]
    assert any(0 < c < n for c in running), running
    assert running == sorted(running), "completed count went backwards"
    assert all(s.request_counts.total == n for s in seen if s.status == "in_progress")


# -- failed rows ---------------------------------------------------------------------------


def test_row_errors_go_to_error_file(client: openai.OpenAI) -> None:
    rows = [chat_line(i) for i in range(6)]
    bad = {1, 4}
    for i in bad:
        del rows[i]["body"]["messages"]
    b = run_batch(client, rows)
    assert b.status == "completed", b
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (6, 4, 2)
    out = read_jsonl(client, b.output_file_id)
    err = read_jsonl(client, b.error_file_id)
    assert sorted(line["custom_id"] for line in out) == sorted(f"row-{i}" for i in range(6) if i not in bad)
    assert sorted(line["custom_id"] for line in err) == sorted(f"row-{i}" for i in bad)
    for line in err:
        assert line["id"].startswith("batch_req_")
        assert line["response"]["status_code"] == 400
        assert line["response"]["body"]["error"]["param"] == "messages"
        assert line["response"]["body"]["error"]["type"] == "invalid_request_error"
        assert line["error"] is None
    ef = client.files.retrieve(b.error_file_id)
    assert ef.purpose == "batch_output"
    assert ef.filename == f"batch_{b.id}_error.jsonl"


def _failure_run(server_factory: Any, rows: list[dict[str, Any]]) -> tuple[set[str], set[str]]:
    srv = server_factory("--echo-fail-rate", "0.5")
    client = srv.client()
    b = run_batch(client, rows)
    assert b.status == "completed", b
    out = read_jsonl(client, b.output_file_id)
    err = read_jsonl(client, b.error_file_id)
    assert b.request_counts.total == len(rows)
    assert b.request_counts.completed == len(out)
    assert b.request_counts.failed == len(err)
    assert b.request_counts.completed + b.request_counts.failed == len(rows)
    assert_one_line_per_row(rows, out, err)
    for line in err:
        assert line["response"]["status_code"] == 500
        assert line["response"]["body"]["error"]["type"] == "server_error"
        assert line["error"] is None
    for line in out:
        assert line["response"]["status_code"] == 200
    return {line["custom_id"] for line in out}, {line["custom_id"] for line in err}


def test_injected_failures_are_deterministic(server_factory) -> None:  # type: ignore[no-untyped-def]
    rows = [chat_line(i) for i in range(40)]
    ok1, failed1 = _failure_run(server_factory, rows)
    assert 0 < len(failed1) < 40
    ok2, failed2 = _failure_run(server_factory, rows)
    assert failed2 == failed1
    assert ok2 == ok1


# -- listing -------------------------------------------------------------------------------


def test_list_batches_newest_first_with_pagination(server_factory) -> None:  # type: ignore[no-untyped-def]
    srv = server_factory()
    client = srv.client()
    f = upload(client, jsonl([chat_line(0)]))
    ids = [client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h").id for _ in range(5)]
    newest_first = ids[::-1]

    pages = []
    after = None
    while True:
        page = client.batches.list(limit=2, **({"after": after} if after else {}))
        page_ids = [b.id for b in page.data]
        raw = srv.http().get("/v1/batches", params={"limit": 2, **({"after": after} if after else {})}).json()
        assert [b["id"] for b in raw["data"]] == page_ids
        assert raw["object"] == "list"
        assert raw["first_id"] == page_ids[0] and raw["last_id"] == page_ids[-1]
        assert raw["has_more"] is page.has_more
        pages.append(page_ids)
        if not page.has_more:
            break
        after = page_ids[-1]
        assert len(pages) < 10
    assert pages == [newest_first[0:2], newest_first[2:4], newest_first[4:]]

    assert [b.id for b in client.batches.list(limit=2)] == newest_first  # auto-pagination
    assert [b.id for b in client.batches.list()] == newest_first
    with pytest.raises(openai.BadRequestError) as exc:
        client.batches.list(after="batch_doesnotexist")
    assert exc.value.param == "after"
    for batch_id in ids:
        wait_batch(client, batch_id)


def test_unknown_batch_id(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        client.batches.retrieve("batch_doesnotexist")
    assert exc.value.code == "batch_not_found"
    with pytest.raises(openai.NotFoundError):
        client.batches.cancel("batch_doesnotexist")


# -- cancel --------------------------------------------------------------------------------


def test_cancel_running_batch(server_factory) -> None:  # type: ignore[no-untyped-def]
    srv = server_factory("--echo-latency", "0.2", "--max-concurrency", "2")
    client = srv.client()
    rows = [chat_line(i) for i in range(50)]
    created = create(client, rows)
    running = wait_for(client, created.id, lambda b: b.request_counts.completed >= 2)
    assert running.status == "in_progress"

    cancelling = client.batches.cancel(created.id)
    assert cancelling.id == created.id
    assert cancelling.status in ("cancelling", "cancelled")
    assert cancelling.cancelling_at is not None

    b = wait_batch(client, created.id, timeout=20)
    assert b.status == "cancelled", b
    assert b.cancelling_at is not None and b.cancelled_at is not None
    assert b.cancelling_at <= b.cancelled_at
    assert b.completed_at is None and b.failed_at is None

    out = read_jsonl(client, b.output_file_id)
    err = read_jsonl(client, b.error_file_id)
    assert len(out) >= running.request_counts.completed
    assert len(out) < 50
    assert_one_line_per_row(rows, out, err)
    for line in out:
        assert line["response"]["status_code"] == 200
        assert line["error"] is None
    assert err, "no row was left to cancel"
    for line in err:
        assert line["response"] is None
        assert line["error"]["code"] == "batch_cancelled"
        assert line["error"]["message"]
        assert line["id"].startswith("batch_req_")
    assert b.request_counts.total == 50
    assert b.request_counts.completed == len(out)
    assert b.request_counts.failed == len(err)

    # cancelling again: the batch is finished
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(created.id)
    # and nothing more runs after the cancel
    time.sleep(0.3)
    assert client.batches.retrieve(created.id).model_dump() == b.model_dump()


def test_cancel_completed_batch_conflicts(client: openai.OpenAI) -> None:
    b = run_batch(client, [chat_line(0)])
    assert b.status == "completed"
    with pytest.raises(openai.ConflictError) as exc:
        client.batches.cancel(b.id)
    assert exc.value.status_code == 409
    assert client.batches.retrieve(b.id).status == "completed"


# -- expiry --------------------------------------------------------------------------------


def test_batch_expires(server_factory) -> None:  # type: ignore[no-untyped-def]
    srv = server_factory(
        "--completion-window", "24h", "--completion-window", "2s", "--echo-latency", "0.2", "--max-concurrency", "2"
    )
    client = srv.client()
    rows = [chat_line(i) for i in range(100)]
    created = create(client, rows, completion_window="2s")
    assert created.completion_window == "2s"
    assert created.expires_at == created.created_at + 2

    b = wait_batch(client, created.id, timeout=20)
    assert b.status == "expired", b
    assert b.expired_at is not None
    assert b.expired_at >= b.expires_at
    assert b.completed_at is None and b.cancelled_at is None

    out = read_jsonl(client, b.output_file_id)
    err = read_jsonl(client, b.error_file_id)
    assert 0 < len(out) < 100
    assert_one_line_per_row(rows, out, err)
    for line in out:
        assert line["response"]["status_code"] == 200
    for line in err:
        assert line["response"] is None
        assert line["error"] == {"code": "batch_expired", "message": EXPIRED_MESSAGE}
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (100, len(out), len(err))

    # the 24h window is still accepted on the same server
    b24 = run_batch(client, [chat_line(0)])
    assert b24.status == "completed"
    assert b24.expires_at == b24.created_at + 86400


# -- rejected at creation ------------------------------------------------------------------


def test_unaccepted_completion_window(client: openai.OpenAI) -> None:
    f = upload(client, jsonl([chat_line(0)]))
    for window in ("48h", "2s", "", "1d"):
        with pytest.raises(openai.BadRequestError) as exc:
            client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window=window)  # type: ignore[arg-type]
        assert exc.value.param == "completion_window"


def test_unknown_endpoint(client: openai.OpenAI) -> None:
    f = upload(client, jsonl([chat_line(0)]))
    for endpoint in ("/v1/foo", "/v1/images/generations", "v1/chat/completions", "/v1/chat/completions/"):
        with pytest.raises(openai.BadRequestError) as exc:
            client.batches.create(
                input_file_id=f.id,
                endpoint=endpoint,
                completion_window="24h",  # type: ignore[arg-type]
            )
        assert exc.value.param == "endpoint"


def test_missing_required_parameters(server) -> None:  # type: ignore[no-untyped-def]
    f = upload(server.client(), jsonl([chat_line(0)]))
    full = {"input_file_id": f.id, "endpoint": CHAT, "completion_window": "24h"}
    for name in full:
        body = {k: v for k, v in full.items() if k != name}
        r = server.http().post("/v1/batches", json=body)
        assert r.status_code == 400
        assert r.json()["error"]["param"] == name


def test_engine_without_the_endpoint_fails_the_batch(client: openai.OpenAI) -> None:
    rows = [{"custom_id": "m1", "method": "POST", "url": "/v1/moderations", "body": {"model": "omni", "input": "x"}}]
    created = create(client, rows, endpoint="/v1/moderations")
    assert created.status == "validating"
    b = wait_batch(client, created.id)
    assert b.status == "failed", b
    assert b.failed_at is not None
    assert b.errors is not None and b.errors.data
    assert b.errors.data[0].code == "unsupported_endpoint"
    assert "/v1/moderations" in (b.errors.data[0].message or "")
    assert b.output_file_id is None and b.error_file_id is None


def test_output_expires_after(client: openai.OpenAI) -> None:
    rows = [chat_line(0), chat_line(1)]
    del rows[1]["body"]["messages"]  # so there is an error file too
    b = run_batch(client, rows, output_expires_after={"anchor": "created_at", "seconds": 7200})
    assert b.status == "completed"
    for fid in (b.output_file_id, b.error_file_id):
        f = client.files.retrieve(fid)
        assert f.expires_at is not None
        assert abs(f.expires_at - (f.created_at + 7200)) <= 1
    plain = run_batch(client, [chat_line(0)])
    assert client.files.retrieve(plain.output_file_id).expires_at is None

    f = upload(client, jsonl([chat_line(0)]))
    for bad in ({"anchor": "created_at", "seconds": 60}, {"anchor": "last_active_at", "seconds": 7200}):
        with pytest.raises(openai.BadRequestError) as exc:
            client.batches.create(
                input_file_id=f.id,
                endpoint=CHAT,
                completion_window="24h",
                output_expires_after=bad,  # type: ignore[arg-type]
            )
        assert exc.value.param == "output_expires_after"


# -- metadata ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metadata",
    [
        {f"k{i}": "v" for i in range(17)},
        {"k" * 65: "v"},
        {"k": "v" * 513},
        {"k": 5},
        ["not", "an", "object"],
    ],
    ids=["17-pairs", "long-key", "long-value", "non-string-value", "not-an-object"],
)
def test_metadata_limits(client: openai.OpenAI, metadata: Any) -> None:
    f = upload(client, jsonl([chat_line(0)]))
    before = {b.id for b in client.batches.list(limit=100)}
    with pytest.raises(openai.BadRequestError) as exc:
        client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h", metadata=metadata)
    assert exc.value.param == "metadata"
    assert {b.id for b in client.batches.list(limit=100)} <= before


def test_metadata_at_the_limits_accepted(client: openai.OpenAI) -> None:
    metadata = {f"{i:02d}" + "k" * 62: f"{i:02d}" + "v" * 510 for i in range(16)}
    assert all(len(k) == 64 and len(v) == 512 for k, v in metadata.items())
    b = run_batch(client, [chat_line(0)], metadata=metadata)
    assert b.status == "completed"
    assert b.metadata == metadata
    assert json.loads(client.batches.retrieve(b.id).model_dump_json())["metadata"] == metadata
