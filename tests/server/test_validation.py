"""Batch input validation: bad input fails the batch, naming every offending line; the server stays up."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from conftest import chat_line, jsonl, read_jsonl, run_batch, upload, wait_batch

CHAT = "/v1/chat/completions"


def line(obj: Any) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def good(i: int, **kw: Any) -> bytes:
    return line(chat_line(i, **kw))


def failed_batch(client: openai.OpenAI, data: bytes, endpoint: str = CHAT) -> list[dict[str, Any]]:
    """Runs a batch that must fail validation; returns its errors, each checked for shape."""
    f = upload(client, data)
    created = client.batches.create(
        input_file_id=f.id,
        endpoint=endpoint,
        completion_window="24h",  # type: ignore[arg-type]
    )
    b = wait_batch(client, created.id)
    assert b.status == "failed", b
    assert b.failed_at is not None
    assert b.failed_at >= b.created_at
    assert b.in_progress_at is None and b.completed_at is None
    assert b.output_file_id is None and b.error_file_id is None
    assert b.errors is not None and b.errors.object == "list"
    errors = [e.model_dump() for e in b.errors.data]
    assert errors
    for e in errors:
        assert isinstance(e["code"], str) and e["code"]
        assert isinstance(e["line"], int) and e["line"] >= 1
        assert f"Line {e['line']}" in e["message"], e
    return errors


def only_error(errors: list[dict[str, Any]]) -> dict[str, Any]:
    assert len(errors) == 1, errors
    return errors[0]


def test_malformed_json_line(client: openai.OpenAI) -> None:
    data = good(1) + good(2) + b'{"custom_id": "row-3", "method": "POST",\n' + good(4) + good(5)
    e = only_error(failed_batch(client, data))
    assert e["line"] == 3
    assert e["code"] == "invalid_json_line"


def test_line_is_a_json_array(client: openai.OpenAI) -> None:
    data = good(1) + line([chat_line(2)]) + good(3)
    e = only_error(failed_batch(client, data))
    assert e["line"] == 2
    assert e["code"] == "invalid_json_line"


@pytest.mark.parametrize("value", ["absent", None, "", 7])
def test_missing_custom_id(client: openai.OpenAI, value: Any) -> None:
    row = chat_line(2)
    if value == "absent":
        del row["custom_id"]
    else:
        row["custom_id"] = value
    e = only_error(failed_batch(client, good(1) + line(row) + good(3)))
    assert e["line"] == 2
    assert e["param"] == "custom_id"
    assert e["code"] == "missing_required_parameter"


def test_duplicate_custom_id(client: openai.OpenAI) -> None:
    data = good(1) + good(2) + line(chat_line(1, text="again")) + good(4)
    e = only_error(failed_batch(client, data))
    assert e["line"] == 3
    assert e["code"] == "duplicate_custom_id"
    assert e["param"] == "custom_id"
    assert "Line 3" in e["message"] and "line 1" in e["message"]
    assert "row-1" in e["message"]


@pytest.mark.parametrize("method", ["GET", "post", None])
def test_method_not_post(client: openai.OpenAI, method: str | None) -> None:
    row = chat_line(2)
    row["method"] = method
    e = only_error(failed_batch(client, good(1) + line(row)))
    assert e["line"] == 2
    assert e["code"] == "invalid_method"
    assert e["param"] == "method"


@pytest.mark.parametrize("url", ["/v1/embeddings", "/v1/chat/completions/", "v1/chat/completions", None])
def test_url_not_matching_endpoint(client: openai.OpenAI, url: str | None) -> None:
    row = chat_line(3)
    row["url"] = url
    e = only_error(failed_batch(client, good(1) + good(2) + line(row)))
    assert e["line"] == 3
    assert e["code"] == "mismatched_url"
    assert e["param"] == "url"


@pytest.mark.parametrize("body", ["a string", ["a", "list"], None, 5])
def test_body_not_an_object(client: openai.OpenAI, body: Any) -> None:
    row = chat_line(1)
    row["body"] = body
    e = only_error(failed_batch(client, line(row) + good(2)))
    assert e["line"] == 1
    assert e["code"] == "invalid_body"
    assert e["param"] == "body"


def test_body_missing(client: openai.OpenAI) -> None:
    row = chat_line(1)
    del row["body"]
    e = only_error(failed_batch(client, good(0) + line(row)))
    assert e["line"] == 2
    assert e["param"] == "body"


@pytest.mark.parametrize("model", ["absent", "", None, 3])
def test_missing_model(client: openai.OpenAI, model: Any) -> None:
    row = chat_line(2)
    if model == "absent":
        del row["body"]["model"]
    else:
        row["body"]["model"] = model
    e = only_error(failed_batch(client, good(1) + line(row) + good(3)))
    assert e["line"] == 2
    assert e["param"] == "body.model"
    assert e["code"] == "missing_required_parameter"


def test_two_models_in_one_file(client: openai.OpenAI) -> None:
    data = good(1) + good(2) + good(3, model="gpt-4o") + good(4)
    e = only_error(failed_batch(client, data))
    assert e["line"] == 3
    assert e["code"] == "mismatched_model"
    assert e["param"] == "body.model"
    assert "gpt-4o" in e["message"] and "gpt-4o-mini" in e["message"]


def test_stream_true(client: openai.OpenAI) -> None:
    data = good(1) + good(2, stream=True) + good(3, stream=False)
    e = only_error(failed_batch(client, data))
    assert e["line"] == 2
    assert e["code"] == "invalid_body"
    assert e["param"] == "body.stream"


def test_non_utf8_line(client: openai.OpenAI) -> None:
    bad = good(2).replace(b"hello 2", b"hello \xff\xfe 2")
    assert bad != good(2)
    e = only_error(failed_batch(client, good(1) + bad + good(3)))
    assert e["line"] == 2
    assert e["code"] == "invalid_encoding"


def test_more_lines_than_the_limit(server_factory) -> None:  # type: ignore[no-untyped-def]
    srv = server_factory("--max-lines", "5")
    client = srv.client()
    # exactly at the limit: fine (blank lines do not count)
    b = run_batch(client, b"".join(good(i) for i in range(5)) + b"\n\n")
    assert b.status == "completed", b
    assert b.request_counts.total == 5

    errors = failed_batch(client, b"".join(good(i) for i in range(6)))
    e = only_error(errors)
    assert e["line"] == 6
    assert e["code"] == "too_many_requests"
    assert "5" in e["message"]


def test_only_blank_lines(client: openai.OpenAI) -> None:
    for data in (b"\n\n", b"\n   \n\t\n", b"\r\n\r\n"):
        e = only_error(failed_batch(client, data))
        assert e["code"] == "empty_file"
        assert e["line"] == 1


def test_every_bad_line_is_reported(client: openai.OpenAI) -> None:
    no_id = chat_line(5)
    del no_id["custom_id"]
    wrong_url = chat_line(7)
    wrong_url["url"] = "/v1/completions"
    data = (
        good(1)
        + b"not json\n"  # 2
        + good(3)
        + line(chat_line(1))  # 4: duplicate of line 1
        + line(no_id)  # 5
        + b"\n"  # 6: blank, skipped
        + line(wrong_url)  # 7
        + line([1, 2])  # 8
        + good(9, model="other-model")  # 9
        + good(10)
    )
    errors = failed_batch(client, data)
    got = sorted((e["line"], e["code"]) for e in errors)
    assert got == [
        (2, "invalid_json_line"),
        (4, "duplicate_custom_id"),
        (5, "missing_required_parameter"),
        (7, "mismatched_url"),
        (8, "invalid_json_line"),
        (9, "mismatched_model"),
    ]


def test_one_line_with_several_problems(client: openai.OpenAI) -> None:
    row = chat_line(1, stream=True)
    row["method"] = "PUT"
    row["url"] = "/v1/embeddings"
    errors = failed_batch(client, line(row))
    assert {e["code"] for e in errors} == {"invalid_method", "mismatched_url", "invalid_body"}
    assert {e["line"] for e in errors} == {1}


# -- rejected at creation ------------------------------------------------------------------


def test_unknown_input_file(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        client.batches.create(input_file_id="file-doesnotexist", endpoint=CHAT, completion_window="24h")
    assert exc.value.param == "input_file_id"
    assert exc.value.code == "file_not_found"


def test_input_file_with_wrong_purpose(client: openai.OpenAI) -> None:
    f = upload(client, jsonl([chat_line(0)]), purpose="user_data")
    with pytest.raises(openai.BadRequestError) as exc:
        client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    assert exc.value.param == "input_file_id"


@pytest.mark.parametrize(
    "content",
    [b"this is not json", b"", b'{"input_file_id": ', b"[1, 2, 3]", b'"a string"', b"\xff\xfe"],
    ids=["text", "empty", "truncated", "array", "string", "binary"],
)
def test_non_json_body_to_create_batch(server, content: bytes) -> None:  # type: ignore[no-untyped-def]
    r = server.http().post("/v1/batches", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"]


# -- accepted ------------------------------------------------------------------------------


def test_blank_lines_between_valid_lines_are_skipped(client: openai.OpenAI) -> None:
    data = b"\n" + good(1) + b"\n\n" + good(2) + b"   \n" + good(3) + b"\r\n" + b"\n"
    b = run_batch(client, data)
    assert b.status == "completed", b
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (3, 3, 0)
    out = read_jsonl(client, b.output_file_id)
    assert [o["custom_id"] for o in out] == ["row-1", "row-2", "row-3"]


def test_crlf_line_endings_accepted(client: openai.OpenAI) -> None:
    data = good(1).replace(b"\n", b"\r\n") + good(2).replace(b"\n", b"\r\n")
    b = run_batch(client, data)
    assert b.status == "completed", b
    assert b.request_counts.completed == 2


def test_last_line_without_newline(client: openai.OpenAI) -> None:
    b = run_batch(client, good(1) + good(2).rstrip(b"\n"))
    assert b.status == "completed", b
    assert b.request_counts.total == 2


def test_server_survives_bad_input(server) -> None:  # type: ignore[no-untyped-def]
    client = server.client()
    # one more round of garbage, then the server must still answer and run a good batch
    for data in (b"\x00\x01\x02\n", b"{" * 10_000 + b"\n", b"[" * 100_000 + b"\n", b"1e999999\n"):
        failed_batch(client, data)
    assert server.proc.poll() is None
    r = httpx.get(f"http://127.0.0.1:{server.port}/health")
    assert r.status_code == 200
    assert r.json()["status"] == "ok"
    b = run_batch(client, [chat_line(i) for i in range(3)])
    assert b.status == "completed"
    assert b.request_counts.completed == 3


def test_utf8_byte_order_mark_is_accepted(client: openai.OpenAI) -> None:
    """Files saved by some Windows editors start with a BOM; the first row must still run."""
    final = run_batch(client, b"\xef\xbb\xbf" + jsonl([chat_line(i) for i in range(3)]))
    assert final.status == "completed", final.errors
    assert [r["custom_id"] for r in read_jsonl(client, final.output_file_id)] == ["row-0", "row-1", "row-2"]
