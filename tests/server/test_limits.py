"""Request and answer sizes are capped per endpoint (README: "Limits"): a body over its limit is a
413 before it is read or parsed, by Content-Length or by counting a chunked body; requests whose
answer would be enormous are a 400 naming the parameter; nothing huge is echoed back."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from conftest import chat_line, jsonl, upload, wait_batch

CHAT = "/v1/chat/completions"
MiB = 1024 * 1024


def _envelope(r: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert len(r.content) < 2000, len(r.content)  # nothing of the request echoed whole
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error
    return error


def _chunks(total: int, piece: bytes) -> Iterator[bytes]:
    yield b'{"input_file_id": "'
    for _ in range(total // len(piece)):
        yield piece
    yield b'", "endpoint": "/v1/chat/completions", "completion_window": "24h"}'


@pytest.mark.parametrize("chunked", [False, True])
def test_an_oversized_batch_create_body_is_413_without_echoing_it(server, chunked: bool) -> None:  # type: ignore[no-untyped-def]
    with server.http() as http:
        headers = {"content-type": "application/json"}
        content: bytes | Iterator[bytes] = _chunks(3 * MiB, b"f" * 65536)
        if not chunked:  # httpx sends a generator chunked, bytes with a Content-Length
            content = b"".join(content)
        r = http.post("/v1/batches", content=content, headers=headers)
        error = _envelope(r, 413)
        assert error["code"] == "request_too_large"
        assert "POST /v1/batches" in error["message"] and "1,048,576" in error["message"], error
        # The connection still serves the next request.
        assert http.get("/health").status_code == 200


def test_an_oversized_direct_body_and_a_body_on_a_get_are_413(server) -> None:  # type: ignore[no-untyped-def]
    with server.http() as http:
        big = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * (9 * MiB)}]}
        _envelope(http.post(CHAT, json=big), 413)
        _envelope(http.request("GET", "/v1/batches", content=b"x" * (2 * MiB)), 413)
        # Under the limits all is as before.
        assert http.post(CHAT, json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).is_success


def test_a_batch_row_over_the_request_limit_fails_validation(server_factory) -> None:  # type: ignore[no-untyped-def]
    srv = server_factory("--max-request-size", "100KB")
    client = srv.client()
    rows = [chat_line(1), chat_line(2, "w" * 150_000), chat_line(3)]
    b = wait_batch(client, client.batches.create(input_file_id=upload(client, jsonl(rows)).id, endpoint=CHAT,
                                                 completion_window="24h").id)  # fmt: skip
    assert b.status == "failed" and b.errors is not None
    [error] = b.errors.data
    assert (error.code, error.line) == ("request_too_large", 2) and "100,000" in (error.message or ""), error


def test_embedding_dimensions_inputs_and_tokens_are_capped(server) -> None:  # type: ignore[no-untyped-def]
    with server.http() as http:
        one = {"model": "text-embedding-3-small", "input": "hello"}
        assert http.post("/v1/embeddings", json={**one, "dimensions": 8192}).is_success
        _envelope(http.post("/v1/embeddings", json={**one, "dimensions": 8193}), 400, "dimensions")
        _envelope(http.post("/v1/embeddings", json={**one, "input": ["a"] * 2049}), 400, "input")
        # 2,048 inputs of 3,072 floats is the largest answer (OpenAI's text-embedding-3-large); more is refused.
        many = {**one, "input": ["a"] * 2048, "dimensions": 3073}
        error = _envelope(http.post("/v1/embeddings", json=many), 400, "dimensions")
        assert "6,291,456" in error["message"], error
        # OpenAI's token limits: 8,192 per input, 300,000 in all.
        _envelope(http.post("/v1/embeddings", json={**one, "input": "hello " * 9000}), 400, "input")
        _envelope(http.post("/v1/embeddings", json={**one, "input": ["hello " * 8000] * 40}), 400, "input")


def test_echo_answers_over_the_answer_limit_are_400_naming_why(server) -> None:  # type: ignore[no-untyped-def]
    with server.http() as http:
        chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "y" * 40_000}]}
        assert http.post(CHAT, json={**chat, "n": 100}).is_success  # 4,000,000 characters: the limit
        error = _envelope(http.post(CHAT, json={**chat, "n": 101}), 400, "n")
        assert "4,000,000" in error["message"], error
        completions = {"model": "gpt-3.5-turbo-instruct", "prompt": ["z" * 40_000] * 2, "n": 60}
        _envelope(http.post("/v1/completions", json=completions), 400, "n")
        # A schema whose every count is allowed but whose instance multiplies them: 1,000 x 1,000 strings.
        inner = {"type": "array", "minItems": 1000, "items": {"type": "string"}}
        schema = {"type": "object", "properties": {"rows": {"type": "array", "minItems": 1000, "items": inner}}}
        fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}
        error = _envelope(http.post(CHAT, json={**chat, "response_format": fmt}), 400)
        assert error["param"].startswith("response_format"), error
