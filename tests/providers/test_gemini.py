"""The gemini provider: its translation both ways, and the adapter against a fake Gemini API.

Translation tests call `_gemini_translate` directly. Adapter tests drive
`GeminiBatchProvider` (and the `google-genai` SDK under it) over real HTTP against
tests/fakes/gemini.py; the end-to-end tests run `llmbatch run --provider gemini` as a
subprocess against the same fake, including a run killed with SIGKILL at random moments.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TypeVar

import pytest
from fakes._serve import serve_app
from fakes.gemini import GeminiFake, embedding_of
from provider_cli import check_store_rollback, found_events, job_query, read_lines

from conftest import chat_line, jsonl, kill_then_finish
from llmbatch._exceptions import ConfigError, ProviderError
from llmbatch.jobs import JobSettings, JobStore
from llmbatch.providers import RemoteStatus, create_provider
from llmbatch.providers import _gemini_translate as gt
from llmbatch.providers._gemini import INLINE_UNKEYED_MAX_REQUESTS, GeminiBatchProvider, remote_status

T = TypeVar("T")
KEY = "test-key"
MODEL = "gemini-2.5-flash"
PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG fake image bytes +/").decode()
PDF = "data:application/pdf;base64," + base64.b64encode(b"%PDF-1.7 fake").decode()
Start = Callable[..., tuple[GeminiFake, str]]


@pytest.fixture
def start() -> Iterator[Start]:
    """Starts fake Gemini APIs (options as GeminiFake's); all stop at the end of the test."""
    with ExitStack() as stack:

        def make(**opts: Any) -> tuple[GeminiFake, str]:
            fake = GeminiFake(api_key=KEY, **opts)
            return fake, stack.enter_context(serve_app(fake.app))

        yield make


def with_adapter(root: str, fn: Callable[[GeminiBatchProvider], Awaitable[T]], **opts: Any) -> T:
    """Runs `fn` with a gemini adapter on `root`, closing it afterwards."""

    async def main() -> T:
        provider = create_provider("gemini", api_key=opts.pop("api_key", KEY), base_url=root, **opts)
        assert isinstance(provider, GeminiBatchProvider)
        try:
            return await fn(provider)
        finally:
            await provider.aclose()

    return asyncio.run(main())


def gemini_line(i: int | str, text: str | None = None, **body: Any) -> dict[str, Any]:
    return chat_line(i, text, model=MODEL, **body)


def write_chunk(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_bytes(jsonl(rows))
    return path


async def run_batch(p: GeminiBatchProvider, chunk: Path, tag: str = "job_t-c00001") -> tuple[Any, list[str]]:
    """Uploads, creates and polls a batch to its end; returns (final batch, statuses seen)."""
    endpoint = json.loads(chunk.read_text().splitlines()[0])["url"]
    file_id = await p.upload(tag, chunk)
    batch = await p.create_batch(tag, "job_t", file_id, endpoint)
    seen = [batch.status]
    while not batch.status.terminal:
        batch = await p.get_batch(batch.id)
        seen.append(batch.status)
    return batch, seen


def results(path: Path) -> dict[str, dict[str, Any]]:
    return {r["custom_id"]: r for r in map(json.loads, path.read_text().splitlines())}


# -- translation: OpenAI -> Gemini -------------------------------------------------------------


def rich_body() -> dict[str, Any]:
    """A chat body that uses every parameter the gemini provider translates."""
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "lookup", "arguments": '{"city": "Paris"}'},
        "extra_content": {"google": {"thought_signature": "c2ln"}},
    }
    return {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
            {"role": "user", "content": "What is the weather?"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Also this:"},
                    {"type": "image_url", "image_url": {"url": PNG, "detail": "auto"}},
                    {"type": "file", "file": {"file_data": PDF, "filename": "a.pdf"}},
                ],
            },
            {"role": "assistant", "content": "Let me look.", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {"role": "user", "content": "Thanks TOOL"},
        ],
        "max_completion_tokens": 200,
        "max_tokens": 50,
        "temperature": 0.3,
        "top_p": 0.9,
        "stop": "END",
        "n": 2,
        "seed": 7,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}}},
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "lookup",
                    "description": "Weather by city",
                    "parameters": {"type": "object", "properties": {"city_name": {"type": "string"}}},
                },
            }
        ],
        "tool_choice": {"type": "function", "function": {"name": "lookup"}},
    }


def test_every_supported_chat_parameter_is_translated() -> None:
    body = rich_body()
    assert gt.check_chat(body) == []
    png, pdf = PNG.split(",", 1)[1], PDF.split(",", 1)[1]
    assert gt.chat_request(body) == {
        "systemInstruction": {"parts": [{"text": "Be brief."}, {"text": "Use tools."}]},
        "contents": [
            {
                "role": "user",  # two user turns merged into one
                "parts": [
                    {"text": "What is the weather?"},
                    {"text": "Also this:"},
                    {"inlineData": {"mimeType": "image/png", "data": png}},
                    {"inlineData": {"mimeType": "application/pdf", "data": pdf}},
                ],
            },
            {
                "role": "model",
                "parts": [
                    {"text": "Let me look."},
                    {"functionCall": {"name": "lookup", "args": {"city": "Paris"}}, "thoughtSignature": "c2ln"},
                ],
            },
            {
                "role": "user",
                "parts": [
                    {"functionResponse": {"name": "lookup", "response": {"output": "sunny"}}},
                    {"text": "Thanks TOOL"},
                ],
            },
        ],
        "generationConfig": {
            "maxOutputTokens": 200,  # max_completion_tokens wins over max_tokens
            "temperature": 0.3,
            "topP": 0.9,
            "seed": 7,
            "presencePenalty": 0.5,
            "frequencyPenalty": -0.5,
            "stopSequences": ["END"],
            "candidateCount": 2,
            "responseMimeType": "application/json",
            "responseJsonSchema": {"type": "object"},
        },
        "tools": [
            {
                "functionDeclarations": [
                    {
                        "name": "lookup",
                        "description": "Weather by city",
                        "parametersJsonSchema": {"type": "object", "properties": {"city_name": {"type": "string"}}},
                    }
                ]
            }
        ],
        "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["lookup"]}},
    }


def test_smaller_variants_translate() -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5,
        "stop": ["a", "b"],
        "n": 1,
        "response_format": {"type": "json_object"},
    }
    assert gt.chat_request(body) == {
        "contents": [{"role": "user", "parts": [{"text": "hi"}]}],
        "generationConfig": {"maxOutputTokens": 5, "stopSequences": ["a", "b"], "responseMimeType": "application/json"},
    }
    plain = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "text"}}
    assert gt.chat_request(plain) == {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}


@pytest.mark.parametrize(
    ("choice", "strict", "expected"),
    [
        (None, False, None),
        ("auto", False, {"mode": "AUTO"}),
        ("none", False, {"mode": "NONE"}),
        ("required", False, {"mode": "ANY"}),
        ({"type": "function", "function": {"name": "f"}}, False, {"mode": "ANY", "allowedFunctionNames": ["f"]}),
        (None, True, {"mode": "VALIDATED"}),
        ("auto", True, {"mode": "VALIDATED"}),
        ("none", True, {"mode": "NONE"}),
    ],
)
def test_tool_choice_and_strict_become_a_function_calling_mode(choice: Any, strict: bool, expected: Any) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}, "strict": strict}}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [tool], "tool_choice": choice}
    assert gt.check_chat(body) == []
    req = gt.chat_request(body)
    assert req.get("toolConfig", {}).get("functionCallingConfig") == expected


def _user(content: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}]}


REJECTED: list[tuple[str, dict[str, Any], str]] = [
    ("logprobs", {**_user("x"), "logprobs": True}, "'logprobs'"),
    ("top_logprobs", {**_user("x"), "top_logprobs": 2}, "'top_logprobs'"),
    ("logit_bias", {**_user("x"), "logit_bias": {"1": 5}}, "'logit_bias'"),
    ("audio", {**_user("x"), "audio": {"voice": "alloy"}}, "'audio'"),
    ("modalities", {**_user("x"), "modalities": ["text", "audio"]}, "'modalities'"),
    ("prediction", {**_user("x"), "prediction": {"type": "content", "content": "x"}}, "'prediction'"),
    ("web_search_options", {**_user("x"), "web_search_options": {}}, "'web_search_options'"),
    ("reasoning_effort", {**_user("x"), "reasoning_effort": "low"}, "'reasoning_effort'"),
    ("functions", {**_user("x"), "functions": [{"name": "f"}]}, "'functions'"),
    ("user", {**_user("x"), "user": "u1"}, "'user'"),
    ("stream", {**_user("x"), "stream": True}, "stream"),
    ("parallel_tool_calls", {**_user("x"), "parallel_tool_calls": False}, "parallel_tool_calls"),
    ("n", {**_user("x"), "n": 0}, "n must be"),
    ("http image", _user([{"type": "image_url", "image_url": {"url": "https://x/a.png"}}]), "inline data only"),
    ("image detail", _user([{"type": "image_url", "image_url": {"url": PNG, "detail": "high"}}]), "detail"),
    ("audio input", _user([{"type": "input_audio", "input_audio": {"data": "AA==", "format": "wav"}}]), "audio"),
    ("file id", _user([{"type": "file", "file": {"file_id": "file-1"}}]), "file_data"),
    ("part type", _user([{"type": "video", "video": {}}]), "'video'"),
    ("system image", {"model": MODEL, "messages": [{"role": "system", "content": [{"type": "image_url"}]}]}, "type"),
    ("function role", {"model": MODEL, "messages": [{"role": "function", "name": "f", "content": "x"}]}, "role"),
    ("message name", {"model": MODEL, "messages": [{"role": "user", "content": "x", "name": "bob"}]}, "name"),
    ("only system", {"model": MODEL, "messages": [{"role": "system", "content": "x"}]}, "at least one user"),
    ("no messages", {"model": MODEL, "messages": []}, "non-empty"),
    (
        "refusal",
        {"model": MODEL, "messages": [_user("x")["messages"][0], {"role": "assistant", "refusal": "no"}]},
        "refusal",
    ),
    ("unknown tool", {"model": MODEL, "messages": [{"role": "tool", "tool_call_id": "c9", "content": "x"}]}, "c9"),
    (
        "bad arguments",
        {
            "model": MODEL,
            "messages": [
                {"role": "user", "content": "x"},
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}],
                },
            ],
        },
        "JSON object",
    ),
    ("tool type", {**_user("x"), "tools": [{"type": "web_search"}]}, "'web_search'"),
    ("tool_choice", {**_user("x"), "tool_choice": "allowed"}, "tool_choice"),
    ("response_format", {**_user("x"), "response_format": {"type": "grammar"}}, "response_format"),
    ("model name", {**_user("x"), "model": "a|b"}, "'|'"),
]


@pytest.mark.parametrize(("what", "body", "reason"), REJECTED, ids=[r[0] for r in REJECTED])
def test_what_gemini_lacks_is_rejected_by_name(what: str, body: dict[str, Any], reason: str) -> None:
    reasons = GeminiBatchProvider.check_request("/v1/chat/completions", body)
    assert reasons, f"{what} was let through"
    assert any(reason in r for r in reasons), reasons


def test_null_parameters_are_absent_and_other_endpoints_are_refused() -> None:
    assert gt.check_chat({**_user("x"), "logprobs": None, "max_tokens": None, "stream": False}) == []
    assert "cannot batch /v1/completions" in GeminiBatchProvider.check_request("/v1/completions", {"prompt": "x"})[0]
    ok = {"model": "gemini-embedding-001", "input": ["a", "b"], "dimensions": 8, "encoding_format": "float"}
    assert GeminiBatchProvider.check_request("/v1/embeddings", ok) == []
    for bad, reason in (
        ({**ok, "input": [[1, 2, 3]]}, "token arrays"),
        ({**ok, "encoding_format": "base64"}, "encoding_format"),
        ({**ok, "user": "u"}, "'user'"),
        ({**ok, "dimensions": 0}, "dimensions"),
    ):
        assert any(reason in r for r in GeminiBatchProvider.check_request("/v1/embeddings", bad)), bad
    assert gt.embed_requests(ok) == [
        {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "a"}]}, "outputDimensionality": 8},
        {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "b"}]}, "outputDimensionality": 8},
    ]


# -- translation: Gemini -> OpenAI -------------------------------------------------------------


def test_a_response_becomes_a_chat_completion() -> None:
    response = {
        "candidates": [
            {
                "content": {
                    "role": "model",
                    "parts": [
                        {"text": "hidden reasoning", "thought": True},
                        {"text": "Hello "},
                        {"text": "there"},
                        {"functionCall": {"name": "f", "args": {"a": 1}}, "thoughtSignature": "c2ln"},
                    ],
                },
                "finishReason": "STOP",
            },
            {"content": {"role": "model", "parts": [{"text": "second"}]}, "finishReason": "MAX_TOKENS"},
        ],
        "usageMetadata": {
            "promptTokenCount": 10,
            "toolUsePromptTokenCount": 2,
            "candidatesTokenCount": 5,
            "thoughtsTokenCount": 7,
            "cachedContentTokenCount": 4,
        },
        "modelVersion": "gemini-2.5-flash-001",
        "responseId": "resp-1",
    }
    body = gt.completion_body(response, custom_id="row-1", model=MODEL, created=123)
    first, second = body["choices"]
    assert first["message"]["content"] == "Hello there"
    (call,) = first["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "f", "arguments": '{"a":1}'}
    assert call["extra_content"] == {"google": {"thought_signature": "c2ln"}}
    assert first["finish_reason"] == "tool_calls"
    assert (second["index"], second["message"]["content"], second["finish_reason"]) == (1, "second", "length")
    assert body["id"] == "resp-1" and body["model"] == "gemini-2.5-flash-001" and body["created"] == 123
    assert body["usage"] == {
        "prompt_tokens": 12,
        "completion_tokens": 12,
        "total_tokens": 24,
        "prompt_tokens_details": {"cached_tokens": 4},
        "completion_tokens_details": {"reasoning_tokens": 7},
    }
    # The same result translated again gives the same tool call id.
    again = gt.completion_body(response, custom_id="row-1", model=MODEL, created=123)
    assert again["choices"][0]["message"]["tool_calls"][0]["id"] == call["id"]


@pytest.mark.parametrize(
    ("reason", "finish"),
    [
        ("STOP", "stop"),
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("BLOCKLIST", "content_filter"),
        ("PROHIBITED_CONTENT", "content_filter"),
        ("SPII", "content_filter"),
        ("OTHER", "stop"),
        (None, "stop"),
    ],
)
def test_finish_reasons(reason: str | None, finish: str) -> None:
    candidate: dict[str, Any] = {"content": {"parts": [{"text": "x"}]}}
    if reason:
        candidate["finishReason"] = reason
    body = gt.completion_body({"candidates": [candidate]}, custom_id="c", model=MODEL, created=0)
    assert body["choices"][0]["finish_reason"] == finish


def test_a_blocked_prompt_is_a_content_filter_answer() -> None:
    response = {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 3}}
    body = gt.completion_body(response, custom_id="c", model=MODEL, created=0)
    assert body["choices"][0]["message"]["content"] is None
    assert body["choices"][0]["finish_reason"] == "content_filter"
    assert body["usage"]["prompt_tokens"] == 3


@pytest.mark.parametrize(
    ("error", "status"),
    [
        ({"code": 400, "message": "bad"}, 400),
        ({"code": 429, "status": "RESOURCE_EXHAUSTED"}, 429),
        ({"code": 3, "message": "gRPC invalid argument"}, 400),
        ({"code": 8}, 429),
        ({"code": 13}, 500),
        ({"code": 14}, 503),
        ({"status": "UNAVAILABLE"}, 503),
        ({"status": "PERMISSION_DENIED"}, 403),
        ({"code": 99}, 500),
        ({}, 500),
    ],
)
def test_per_request_errors_get_an_http_status(error: dict[str, Any], status: int) -> None:
    assert gt.http_status_of(error) == status
    line = gt.result_line("row-1", {"error": error, "key": "row-1"}, model=MODEL, created=0)
    assert line["response"]["status_code"] == status
    assert "message" in line["response"]["body"]["error"]
    assert line["native"] == {"error": error, "key": "row-1"}


@pytest.mark.parametrize(
    ("state", "status"),
    [
        ("BATCH_STATE_PENDING", RemoteStatus.VALIDATING),
        ("JOB_STATE_PENDING", RemoteStatus.VALIDATING),
        ("JOB_STATE_QUEUED", RemoteStatus.VALIDATING),
        ("BATCH_STATE_RUNNING", RemoteStatus.IN_PROGRESS),
        ("JOB_STATE_RUNNING", RemoteStatus.IN_PROGRESS),
        ("BATCH_STATE_SUCCEEDED", RemoteStatus.COMPLETED),
        ("JOB_STATE_SUCCEEDED", RemoteStatus.COMPLETED),
        ("BATCH_STATE_FAILED", RemoteStatus.FAILED),
        ("JOB_STATE_FAILED", RemoteStatus.FAILED),
        ("BATCH_STATE_CANCELLED", RemoteStatus.CANCELLED),
        ("JOB_STATE_CANCELLED", RemoteStatus.CANCELLED),
        ("JOB_STATE_CANCELLING", RemoteStatus.CANCELLING),
        ("BATCH_STATE_EXPIRED", RemoteStatus.EXPIRED),
        ("JOB_STATE_EXPIRED", RemoteStatus.EXPIRED),
        ("BATCH_STATE_UNSPECIFIED", RemoteStatus.VALIDATING),
        ("JOB_STATE_SOMETHING_NEW", RemoteStatus.IN_PROGRESS),
    ],
)
def test_every_batch_state_is_mapped(state: str, status: RemoteStatus) -> None:
    assert remote_status(state) == status


# -- the adapter against the fake ---------------------------------------------------------------


def test_key_and_base_url_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "GOOGLE_GEMINI_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match="set GEMINI_API_KEY \\(or GOOGLE_API_KEY\\) or pass --api-key"):
        create_provider("gemini")
    monkeypatch.setenv("GOOGLE_API_KEY", "g")
    monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", "http://127.0.0.1:9")
    p = create_provider("gemini")
    assert p.base_url == "http://127.0.0.1:9"
    assert p._client._api_client.api_key == "g"  # type: ignore[attr-defined]
    monkeypatch.setenv("GEMINI_API_KEY", "first")
    assert create_provider("gemini")._client._api_client.api_key == "first"  # type: ignore[attr-defined]


def _norm(x: Any, raw: bool = False) -> Any:
    """A request as the API reads it: field names in camelCase (the SDK sends some in snake_case),
    base64 in one alphabet; user JSON (schemas, arguments) left as it is."""
    if raw:
        return x
    if isinstance(x, list):
        return [_norm(v) for v in x]
    if not isinstance(x, dict):
        return x
    out = {}
    for k, v in x.items():
        head, *rest = k.split("_")
        name = head + "".join(w.title() for w in rest)
        if name in ("data", "thoughtSignature") and isinstance(v, str):
            v = base64.urlsafe_b64decode(v.replace("+", "-").replace("/", "_") + "=" * (-len(v) % 4))
        out[name] = _norm(v, raw=name in ("parametersJsonSchema", "responseJsonSchema", "args", "response"))
    return out


def test_inline_batch_round_trip(start: Start, tmp_path: Path) -> None:
    """Small chunks go inline: every request reaches the API as translated, results come back
    by key (here in reverse order), with per-row errors, filters, tool calls and usage."""
    fake, root = start(reverse_results=True, pending_polls=1, running_polls=2)
    rows = [
        {"custom_id": "rich", "method": "POST", "url": "/v1/chat/completions", "body": rich_body()},
        gemini_line(1, "hello one"),
        gemini_line(2, "please FAIL400"),
        gemini_line(3, "maybe FAIL429"),
        gemini_line(4, "BLOCK this"),
        gemini_line(5, "one two three four", max_tokens=2),
    ]
    chunk = write_chunk(tmp_path / "job_t-c00001.jsonl", rows)

    async def go(p: GeminiBatchProvider) -> tuple[Any, list[str], str]:
        batch, seen = await run_batch(p, chunk)
        await p.download(batch.output_file_id, tmp_path / "out.jsonl")
        return batch, seen, batch.output_file_id

    batch, seen, output = with_adapter(root, go)
    assert seen == [RemoteStatus.VALIDATING, RemoteStatus.VALIDATING, RemoteStatus.IN_PROGRESS,
                    RemoteStatus.IN_PROGRESS, RemoteStatus.COMPLETED]  # fmt: skip
    assert output == f"{MODEL}|{batch.id}" and (batch.total, batch.completed, batch.failed) == (6, 4, 2)
    (remote,) = fake.all_batches()
    assert remote.source == "inline" and remote.display_name == "job_t-c00001" and remote.model == f"models/{MODEL}"
    assert not fake.files and not (tmp_path / "job_t-c00001.gemini.jsonl").exists()
    sent = dict(remote.requests)
    assert list(sent) == [r["custom_id"] for r in rows]
    for row in rows:
        assert _norm(sent[row["custom_id"]]) == _norm(gt.chat_request(row["body"])), row["custom_id"]

    out = results(tmp_path / "out.jsonl")
    assert sorted(out) == sorted(sent)
    ok = out["row-1"]["response"]
    assert ok["status_code"] == 200
    assert ok["body"]["choices"][0]["message"]["content"] == "hello one"  # the thought part is left out
    assert ok["body"]["usage"]["prompt_tokens_details"]["cached_tokens"] == 2
    assert ok["body"]["usage"]["completion_tokens_details"]["reasoning_tokens"] == 4
    assert ok["body"]["usage"]["completion_tokens"] == 2 + 4
    assert out["row-1"]["native"]["metadata"] == {"key": "row-1"} and "candidates" in out["row-1"]["native"]["response"]
    assert out["row-2"]["response"]["status_code"] == 400
    assert out["row-3"]["response"]["status_code"] == 429
    assert out["row-4"]["response"]["body"]["choices"][0]["finish_reason"] == "content_filter"
    assert out["row-5"]["response"]["body"]["choices"][0]["finish_reason"] == "length"
    rich = out["rich"]["response"]["body"]
    assert [c["finish_reason"] for c in rich["choices"]] == ["tool_calls", "tool_calls"]
    args = json.loads(rich["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"])
    assert args == {"text": "Thanks TOOL"}


def test_a_running_batch_reports_its_batch_stats(start: Start, tmp_path: Path) -> None:
    """The counts in `metadata.batchStats` (which the SDK's BatchJob leaves out) move while the
    batch runs: the progress display shows rows done before the batch ends."""
    _fake, root = start(pending_polls=1, running_polls=3)
    chunk = write_chunk(tmp_path / "job_t-c00001.jsonl", [gemini_line(i) for i in range(5)])

    async def go(p: GeminiBatchProvider) -> list[tuple[RemoteStatus, bool, int, int]]:
        file_id = await p.upload("job_t-c00001", chunk)
        batch = await p.create_batch("job_t-c00001", "job_t", file_id, "/v1/chat/completions")
        seen = []
        while not batch.status.terminal:
            batch = await p.get_batch(batch.id)
            seen.append((batch.status, batch.counts_live, batch.total, batch.completed))
        return seen

    seen = with_adapter(root, go)
    running = [s for s in seen if s[0] is RemoteStatus.IN_PROGRESS]
    assert running and all(live and total == 5 for _s, live, total, _c in running), seen
    assert [c for *_x, c in running] == [1, 2, 3], seen
    assert seen[-1][0] is RemoteStatus.COMPLETED and seen[-1][3] == 5, seen


@pytest.mark.parametrize("limit", [{"inline_max_bytes": 100}, {"inline_max_requests": 5}], ids=["bytes", "requests"])
def test_file_batch_round_trip_and_find_upload(start: Start, tmp_path: Path, limit: dict[str, int]) -> None:
    """Above the inline limits a chunk is uploaded with the Files API, tagged `TAG|MODEL`, and
    results are read from the responses file, by key."""
    fake, root = start(reverse_results=True)
    rows = [gemini_line(i, f"file row {i}") for i in range(5)] + [gemini_line(5, "FAIL400 here")]
    chunk = write_chunk(tmp_path / "job_t-c00002.jsonl", rows)
    since = int(time.time()) - 5

    async def go(p: GeminiBatchProvider) -> tuple[Any, Any, Any, Any]:
        file_id = await p.upload("job_t-c00002", chunk)
        found = await p.find_upload("job_t-c00002", since)
        later = await p.find_upload("job_t-c00002", since + 3600)
        other = await p.find_upload("job_t-c00003", since)
        batch = await p.create_batch("job_t-c00002", "job_t", file_id, "/v1/chat/completions")
        while not batch.status.terminal:
            batch = await p.get_batch(batch.id)
        await p.download(batch.output_file_id, tmp_path / "out.jsonl")
        return file_id, found, (later, other), batch

    file_id, found, misses, batch = with_adapter(root, go, **limit)
    (f,) = [f for f in fake.files.values() if f.source == "UPLOADED"]
    assert f.display_name == f"job_t-c00002|{MODEL}" and f.source == "UPLOADED"
    assert file_id == found == f"{MODEL}|{f.name}"
    assert misses == (None, None)
    (remote,) = fake.all_batches()
    assert remote.source == "file" and remote.input_file == f.name and remote.display_name == "job_t-c00002"
    assert [k for k, _ in remote.requests] == [r["custom_id"] for r in rows]
    out = results(tmp_path / "out.jsonl")
    assert sorted(out) == sorted(r["custom_id"] for r in rows)
    for i in range(5):
        assert out[f"row-{i}"]["response"]["body"]["choices"][0]["message"]["content"] == f"file row {i}"
        assert out[f"row-{i}"]["native"]["key"] == f"row-{i}"
    assert out["row-5"]["response"]["status_code"] == 400
    assert out["row-5"]["response"]["body"]["error"]["type"] == "invalid_argument"
    assert not list(tmp_path.glob("*.gemini*")), "translated and raw files are cleaned up"


def test_inline_results_without_keys_come_in_order_and_keep_later_chunks_small(start: Start, tmp_path: Path) -> None:
    """The API has been seen to drop `metadata.key` from inline results (python-genai #1886,
    #2008). Google documents inline responses in input order, so such results are written in the
    order they came, without a custom_id (the runner matches them by position when their count
    is the chunk's), with their usage; and from then on only small chunks go inline."""
    fake, root = start(drop_inline_keys=True)
    chunk = write_chunk(tmp_path / "job_t-c00001.jsonl", [gemini_line(i, f"hello {i}") for i in range(3)])

    async def go(p: GeminiBatchProvider) -> tuple[str, str, str]:
        batch, _ = await run_batch(p, chunk)
        await p.download(batch.output_file_id, tmp_path / "out.jsonl")
        big = [gemini_line(i) for i in range(INLINE_UNKEYED_MAX_REQUESTS + 1)]
        larger = await p.upload("job_t-c00002", write_chunk(tmp_path / "job_t-c00002.jsonl", big))
        small = await p.upload("job_t-c00003", write_chunk(tmp_path / "job_t-c00003.jsonl", big[:-1]))
        return (tmp_path / "out.jsonl").read_text(), larger, small

    text, larger, small = with_adapter(root, go)
    lines = [json.loads(line) for line in text.splitlines()]
    assert [line["custom_id"] for line in lines] == [None] * 3
    assert [text_of(line) for line in lines] == [f"hello {i}" for i in range(3)]
    assert all(line["response"]["body"]["usage"]["prompt_tokens"] > 0 for line in lines)
    assert larger.split("|")[1].startswith("files/")
    assert small.split("|")[1].startswith("local:")


def test_expired_and_cancelled_batches_have_no_results(start: Start, tmp_path: Path) -> None:
    fake, root = start(pending_polls=5)
    fake.expire_next(1)
    chunk = write_chunk(tmp_path / "job_t-c00001.jsonl", [gemini_line(i) for i in range(3)])

    async def go(p: GeminiBatchProvider) -> tuple[Any, Any]:
        expired, _ = await run_batch(p, chunk, "job_t-c00001")
        second = await p.create_batch(
            "job_t-c00002", "job_t", await p.upload("job_t-c00002", chunk), "/v1/chat/completions"
        )
        cancelled = await p.cancel(second.id)
        return expired, cancelled

    expired, cancelled = with_adapter(root, go)
    assert expired.status == RemoteStatus.EXPIRED and expired.output_file_id is None
    assert cancelled.status == RemoteStatus.CANCELLED and cancelled.output_file_id is None
    assert [b.state for b in fake.all_batches()] == ["BATCH_STATE_EXPIRED", "BATCH_STATE_CANCELLED"]


def test_find_batch_reads_every_page_and_matches_the_display_name(start: Start, tmp_path: Path) -> None:
    fake, root = start(max_page_size=2)
    chunk = write_chunk(tmp_path / "c.jsonl", [gemini_line(1)])
    tags = [f"job_t-c{i:05d}" for i in range(1, 6)]

    async def go(p: GeminiBatchProvider) -> tuple[Any, ...]:
        made = [await p.create_batch(t, "job_t", await p.upload(t, chunk), "/v1/chat/completions") for t in tags]
        now = int(time.time())
        first = await p.find_batch(tags[0], now - 60)  # the oldest: on the last page, newest first
        missing = await p.find_batch("job_t-c00099", now - 60)
        too_old = await p.find_batch(tags[0], now + 3600)
        return made, first, missing, too_old

    made, first, missing, too_old = with_adapter(root, go, page_size=2)
    assert first is not None and first.id == made[0].id and first.metadata["display_name"] == tags[0]
    assert missing is None and too_old is None
    lists = [path for method, path in fake.calls if method == "GET" and path.endswith("/batches")]
    assert len(lists) >= 3 * 2  # three pages, for each search that found nothing early


def test_create_refuses_what_it_cannot_do_safely(start: Start, tmp_path: Path) -> None:
    fake, root = start()
    chunk = write_chunk(tmp_path / "job_t-c00001.jsonl", [gemini_line(1)])

    async def go(p: GeminiBatchProvider) -> tuple[ProviderError, ProviderError, ProviderError]:
        file_id = await p.upload("job_t-c00001", chunk)
        with pytest.raises(ProviderError) as window:
            await p.create_batch("job_t-c00001", "job_t", file_id, "/v1/chat/completions", "2s")
        await p.create_batch("job_t-c00001", "job_t", file_id, "/v1/chat/completions")
        # Its local requests are gone once a batch was made from them: asking again waits for the listing.
        with pytest.raises(ProviderError) as again:
            await p.create_batch("job_t-c00001", "job_t", file_id, "/v1/chat/completions")
        wrong = create_provider("gemini", api_key="wrong", base_url=root)
        with pytest.raises(ProviderError) as bad_key:
            await wrong.get_batch(fake.all_batches()[0].name)
        await wrong.aclose()
        return window.value, again.value, bad_key.value

    window, again, bad_key = with_adapter(root, go)
    assert not window.retryable and "fixed window" in str(window)
    assert again.retryable
    assert bad_key.status == 400 and not bad_key.retryable
    assert len(fake.all_batches()) == 1


def test_an_unreachable_api_is_a_retryable_error(tmp_path: Path) -> None:
    async def go(p: GeminiBatchProvider) -> ProviderError:
        with pytest.raises(ProviderError) as err:
            await p.find_batch("job_t-c00001", 0)
        return err.value

    err = with_adapter("http://127.0.0.1:9", go)
    assert err.retryable and err.status is None and "cannot reach" in str(err)


def test_a_connection_dropped_before_the_answer_is_a_retryable_error() -> None:
    """The SDK's async calls go through aiohttp where it is installed (llmbatch depends on it):
    a server that hangs up before answering raises aiohttp's own errors, which must become a
    retryable ProviderError like httpx's, not escape the adapter."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(1)
    hung_up = []
    deadline = time.monotonic() + 60

    def hang_up() -> None:
        # Every connection is hung up on (however many times the SDK retries, however slowly on
        # a loaded machine) until the listener closes: bounded by time, not by a count after
        # which a retry would wait out the adapter's 600 s timeout on a connection never answered.
        while time.monotonic() < deadline:
            try:
                conn, _addr = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.recv(65536)
            conn.close()
            hung_up.append(1)

    thread = threading.Thread(target=hang_up, daemon=True)
    thread.start()

    async def go(p: GeminiBatchProvider) -> ProviderError:
        with pytest.raises(ProviderError) as err:
            await p.get_batch("batches/abc")
        return err.value

    try:
        err = with_adapter(f"http://127.0.0.1:{listener.getsockname()[1]}", go, timeout=30.0)
    finally:
        listener.close()
        thread.join(10)
    assert hung_up, "the request reached the test's server"
    assert err.retryable and err.status is None and "cannot reach" in str(err)


@pytest.mark.parametrize("inline_results", [False, True], ids=["results-file", "results-inline"])
def test_embeddings_go_by_file_and_come_back_per_row(start: Start, tmp_path: Path, inline_results: bool) -> None:
    """Embeddings go by file; their results come back per row whether Gemini writes them to a
    file or, as reported for some file batches, inline (`inlinedEmbedContentResponses`)."""
    fake, root = start(reverse_results=True)
    fake.inline_embed_results = inline_results
    model = "gemini-embedding-001"
    rows = [
        {"custom_id": "e1", "method": "POST", "url": "/v1/embeddings", "body": {"model": model, "input": "alpha"}},
        {
            "custom_id": "e2",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": model, "input": ["b", "cc", "ddd"], "dimensions": 3},
        },
        {
            "custom_id": "e3",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": model, "input": ["x FAIL400", "y"]},
        },
    ]
    chunk = write_chunk(tmp_path / "job_t-c00001.jsonl", rows)

    async def go(p: GeminiBatchProvider) -> Any:
        batch, _ = await run_batch(p, chunk)
        await p.download(batch.output_file_id, tmp_path / "out.jsonl")
        return batch

    with_adapter(root, go)  # the default inline limit: embeddings still go by file
    (remote,) = fake.all_batches()
    assert remote.kind == "embed" and remote.source == "file"
    assert [k for k, _ in remote.requests] == ["e1#0/1", "e2#0/3", "e2#1/3", "e2#2/3", "e3#0/2", "e3#1/2"]
    out = results(tmp_path / "out.jsonl")
    assert out["e1"]["response"]["body"]["data"] == [
        {"object": "embedding", "index": 0, "embedding": embedding_of("alpha", 4)}
    ]
    body = out["e2"]["response"]["body"]
    assert body["object"] == "list" and body["model"] == model
    assert [d["embedding"] for d in body["data"]] == [embedding_of(t, 3) for t in ("b", "cc", "ddd")]
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert body["usage"]["prompt_tokens"] == 3  # the embed results' tokenCount, summed over the row's inputs
    assert out["e3"]["response"]["status_code"] == 400


def test_direct_api(start: Start) -> None:
    fake, root = start()

    async def go(p: GeminiBatchProvider) -> tuple[Any, ...]:
        chat = await p.direct("/v1/chat/completions", {**rich_body(), "n": 1})
        failed = await p.direct("/v1/chat/completions", _user("FAIL400 now"))
        emb = await p.direct("/v1/embeddings", {"model": "gemini-embedding-001", "input": ["a", "bb"]})
        return chat, failed, emb

    (status, chat), (fail_status, failed), (emb_status, emb) = with_adapter(root, go)
    assert status == 200 and chat["object"] == "chat.completion"
    assert chat["choices"][0]["finish_reason"] == "tool_calls"
    assert chat["usage"]["completion_tokens_details"]["reasoning_tokens"] == 4
    # Through the SDK's own types and back: what reaches the API is the translation, whole.
    assert _norm(fake.direct_requests[0]) == _norm(gt.chat_request({**rich_body(), "n": 1}))
    assert fail_status == 400 and failed["error"]["type"] == "invalid_argument"
    assert emb_status == 200 and [d["embedding"] for d in emb["data"]] == [embedding_of(t, 4) for t in ("a", "bb")]


# -- end to end: `llmbatch run --provider gemini` -----------------------------------------------


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GEMINI_", "GOOGLE_", "LLMBATCH_"))}
    env.update(LLMBATCH_HOME=str(tmp_path / "home"), NO_PROXY="127.0.0.1,localhost", GEMINI_API_KEY=KEY, **extra)
    return env


def run_cmd(inp: Path, root: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "llmbatch", "run", str(inp), "--provider", "gemini", "--base-url", root,
        "--poll-interval", "0.05", *extra,
    ]  # fmt: skip


def run_cli(tmp_path: Path, inp: Path, root: str, *extra: str, env: dict[str, str] | None = None) -> Any:
    return subprocess.run(
        run_cmd(inp, root, *extra), env=env or cli_env(tmp_path), capture_output=True, text=True, timeout=120
    )


def chunk_tags(tmp_path: Path) -> set[str]:
    return {tag for (tag,) in job_query(tmp_path, "SELECT tag FROM chunks")}


def text_of(rec: dict[str, Any]) -> str:
    return rec["response"]["body"]["choices"][0]["message"]["content"]


def test_cli_chunks_errors_retries_and_ingest_checks(start: Start, tmp_path: Path) -> None:
    fake, root = start(reverse_results=True)
    rows = [gemini_line(i, f"hello {i}") for i in range(10)]
    rows[3] = gemini_line(3, "this will FAIL400")
    rows[5] = gemini_line(5, "this will FAIL429 once")
    rows[7] = gemini_line(7, "hello 7", logprobs=True)
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(jsonl(rows))

    refused = run_cli(tmp_path, inp, root, "--batch-size", "3")
    assert refused.returncode == 2, refused.stderr
    assert "input.jsonl:8" in refused.stderr and "logprobs" in refused.stderr
    assert not fake.all_batches()

    proc = run_cli(tmp_path, inp, root, "--batch-size", "3", "--skip-invalid")
    assert proc.returncode == 1, proc.stderr
    out = read_lines(tmp_path / "input.results.jsonl")
    assert [r["custom_id"] for r in out] == [r["custom_id"] for r in rows]
    for i, rec in enumerate(out):
        if i in (3, 7):
            continue
        assert rec["response"]["status_code"] == 200, rec
        assert text_of(rec) == rows[i]["body"]["messages"][0]["content"]
    errors = {e["custom_id"]: e for e in read_lines(tmp_path / "input.errors.jsonl")}
    assert sorted(errors) == ["row-3", "row-7"]
    assert errors["row-3"]["response"]["status_code"] == 400
    assert "input.jsonl:8" in errors["row-7"]["error"]["message"]
    assert "logprobs" in errors["row-7"]["error"]["message"]
    # Gemini's results have no line id: each line gets one of its own (issue 15: they were null).
    ids = [r["id"] for r in out]
    assert all(i.startswith("batch_req_") for i in ids) and len(set(ids)) == len(rows)

    batches = fake.all_batches()
    assert sorted(len(b.requests) for b in batches) == [1, 3, 3, 3]  # 9 valid rows in 3 chunks; row-5 again
    assert fake.sent_keys().count("row-5") == 2 and "row-7" not in fake.sent_keys()
    assert {b.display_name for b in batches} == chunk_tags(tmp_path)


def test_cli_model_override_reaches_batches_direct_calls_and_retries(start: Start, tmp_path: Path) -> None:
    """Rows naming `gpt-4o-mini` run with `--model gemini-2.5-flash`: the batch, the direct calls
    `--direct-below` makes and the retries all go to Gemini's model (issue 15: direct calls went
    to `models/gpt-4o-mini:generateContent`, which Gemini answers with a 404)."""
    fake, root = start()
    rows = [chat_line(i) for i in range(8)]  # model gpt-4o-mini
    rows[2] = chat_line(2, "this will FAIL429 once")  # in the batch, and again in its first direct call
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(jsonl(rows))
    proc = run_cli(tmp_path, inp, root, "--model", MODEL, "--direct-below", "4", "--max-attempts", "4")
    assert proc.returncode == 0, proc.stderr
    # A second job of the same rows: all 8 go direct from the start.
    inp2 = tmp_path / "again.jsonl"
    inp2.write_bytes(jsonl(rows))
    proc = run_cli(tmp_path, inp2, root, "--model", f"gemini/{MODEL}", "--direct-below", "50", "--max-attempts", "4")
    assert proc.returncode == 0, proc.stderr
    for name in ("input", "again"):
        assert [r["response"]["status_code"] for r in read_lines(tmp_path / f"{name}.results.jsonl")] == [200] * 8
    assert [(b.model, len(b.requests)) for b in fake.all_batches()] == [(f"models/{MODEL}", 8)]
    # Row 2 twice after the batch (429, then answered); the second job's 8 rows, row 2 answered at once.
    assert fake.direct_models == [MODEL] * 10


def test_cli_rows_of_an_expired_batch_go_again(start: Start, tmp_path: Path) -> None:
    fake, root = start()
    fake.expire_next(1)
    rows = [gemini_line(i) for i in range(6)]
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(jsonl(rows))

    proc = run_cli(tmp_path, inp, root)
    assert proc.returncode == 0, proc.stderr
    out = read_lines(tmp_path / "input.results.jsonl")
    assert [text_of(r) for r in out] == [f"hello {i}" for i in range(6)]
    first, second = fake.all_batches()
    assert first.state == "BATCH_STATE_EXPIRED" and second.state == "BATCH_STATE_SUCCEEDED"
    assert [k for k, _ in second.requests] == [r["custom_id"] for r in rows]


def test_cli_inline_results_without_keys_are_matched_by_position_and_all_usage_counts(
    start: Start, tmp_path: Path
) -> None:
    """Inline results without keys: a batch that answers every request is matched by position
    (Google documents input order), so its rows are not sent again; one that answers fewer
    cannot be matched, its rows go again, and what it generated still counts in the job's usage."""
    fake, root = start(drop_inline_keys=True)
    fake.short_inline = 1
    rows = [gemini_line(i, f"hello {i} " + "word " * i) for i in range(6)]
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(jsonl(rows))

    proc = run_cli(tmp_path, inp, root, "--batch-size", "3")
    assert proc.returncode == 0, proc.stderr
    out = read_lines(tmp_path / "input.results.jsonl")
    assert [text_of(r) for r in out] == [r["body"]["messages"][0]["content"] for r in rows]
    sent = Counter(key for key in fake.sent_keys())
    assert sorted(sent.values()) == [1, 1, 1, 2, 2, 2], sent  # only the short batch's rows went again
    assert all(b.source == "inline" for b in fake.all_batches())
    generated = [r["response"]["usageMetadata"] for b in fake.all_batches() for r in b.results]
    assert len(generated) == 8  # 2 of the short batch, 6 matched
    (job_dir,) = (tmp_path / "home" / "jobs").iterdir()
    store = JobStore(job_dir / "job.sqlite")
    try:
        totals = store.totals()
    finally:
        store.close()
    assert totals["input_tokens"] == sum(u["promptTokenCount"] for u in generated)
    assert totals["output_tokens"] == sum(u["candidatesTokenCount"] + u["thoughtsTokenCount"] for u in generated)


def test_cli_file_mode_with_embeddings_tools_and_filters(start: Start, tmp_path: Path) -> None:
    fake, root = start()
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    rows = [
        gemini_line("plain", "just text"),
        gemini_line("blocked", "BLOCK me"),
        gemini_line("tool", "TOOL please", tools=[tool]),
        {
            "custom_id": "emb",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "gemini-embedding-001", "input": ["p", "q"]},
        },
        gemini_line("has#hash", "ids with a hash go under another id"),
    ]
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(jsonl(rows))

    proc = run_cli(tmp_path, inp, root, env=cli_env(tmp_path, LLMBATCH_GEMINI_INLINE_MAX_BYTES="0"))
    assert proc.returncode == 0, proc.stderr
    out = {r["custom_id"]: r for r in read_lines(tmp_path / "input.results.jsonl")}
    assert list(out) == [r["custom_id"] for r in rows]
    assert text_of(out["plain"]) == "just text"
    assert out["blocked"]["response"]["body"]["choices"][0]["finish_reason"] == "content_filter"
    call = out["tool"]["response"]["body"]["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["name"] == "lookup"
    assert [d["embedding"] for d in out["emb"]["response"]["body"]["data"]] == [
        embedding_of("p", 4),
        embedding_of("q", 4),
    ]
    assert text_of(out["has#hash"]) == "ids with a hash go under another id"
    assert all(b.source == "file" for b in fake.all_batches()) and len(fake.all_batches()) == 2
    assert not [f for f in fake.files.values() if f.source == "UPLOADED"], "uploads are deleted once collected"
    assert "has#hash" not in fake.sent_keys()


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing_and_pays_nothing_twice(start: Start, tmp_path: Path) -> None:
    """Killed and restarted many times (switching between inline and file input on each start),
    the job still ends with every row once, in order, and one remote batch per planned chunk."""
    fake, root = start(pending_polls=2, running_polls=3, create_delay=0.1)
    n = 400
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(jsonl([gemini_line(i) for i in range(n)]))
    cmd = run_cmd(inp, root, "--batch-size", "20", "--max-in-flight", "2")

    def env(attempt: int) -> dict[str, str]:
        return cli_env(tmp_path, LLMBATCH_GEMINI_INLINE_MAX_BYTES="0" if attempt % 2 else "")

    kills = kill_then_finish(cmd, env, attempts=10, seed=4321, pause=(1.0, 2.2))

    out = read_lines(tmp_path / "input.results.jsonl")
    assert [r["custom_id"] for r in out] == [f"row-{i}" for i in range(n)]
    assert [text_of(r) for r in out] == [f"hello {i}" for i in range(n)]
    names = [b.display_name for b in fake.all_batches()]
    assert len(names) == len(set(names)), "a chunk got two remote batches"
    assert set(names) == chunk_tags(tmp_path)
    sent = fake.sent_keys()
    assert len(sent) == n and set(sent) == {f"row-{i}" for i in range(n)}
    found = found_events(tmp_path, "%found%")
    print(f"{kills} kills; {len(fake.files)} files; reconciliations: {found}")


@pytest.mark.live
def test_live_tiny_job(tmp_path: Path) -> None:
    """Two rows through the real Gemini batch API (needs GEMINI_API_KEY or GOOGLE_API_KEY; --live)."""
    key = os.environ.get("GEMINI_API_KEY") or os.environ.get("GOOGLE_API_KEY")
    if not key:
        pytest.skip("set GEMINI_API_KEY to run the live Gemini test")
    rows = [
        chat_line(i, f"Reply with the single word: ok{i}", model="gemini-2.5-flash-lite", max_tokens=20)
        for i in range(2)
    ]
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(jsonl(rows))
    env = {**os.environ, "LLMBATCH_HOME": str(tmp_path / "home"), "GEMINI_API_KEY": key}
    cmd = [sys.executable, "-m", "llmbatch", "run", str(inp), "--provider", "gemini", "--poll-interval", "15"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr
    out = read_lines(tmp_path / "input.results.jsonl")
    assert [r["custom_id"] for r in out] == ["row-0", "row-1"]
    assert all(r["response"]["status_code"] == 200 and text_of(r) for r in out)


# -- a rolled-back job store (issue 13) -----------------------------------------------------


@pytest.mark.parametrize(
    ("stop_at", "inline"), [(2, True), (3, False)], ids=["two-running-inline", "one-collected-files"]
)
def test_a_store_rolled_back_adopts_the_batches_named_after_the_jobs_chunks(
    start: Start, tmp_path: Path, stop_at: int, inline: bool
) -> None:
    """A Gemini batch's display name is its chunk's tag. Its requests cannot be read back (an
    uploaded file cannot be downloaded, inline requests are not returned), so a lost batch still
    running holds back new batches until it ends, and is then adopted by its results' keys."""
    fake, root = start(pending_polls=2, running_polls=2, max_page_size=3)
    settings = JobSettings(provider="gemini", base_url=root, batch_size=10, max_in_flight=2,
                           poll_interval=0.01, max_poll_interval=0.01)  # fmt: skip

    def adapter() -> GeminiBatchProvider:
        return GeminiBatchProvider(api_key=KEY, base_url=root, inline_max_bytes=None if inline else -1)

    messages = check_store_rollback(tmp_path, settings, MODEL, adapter, lambda: len(fake.batches), stop_at)
    tags = Counter(b.display_name for b in fake.all_batches())
    assert len(tags) == 4 and set(tags.values()) == {1}, tags
    assert Counter(fake.sent_keys()) == dict.fromkeys((f"row-{i}" for i in range(40)), 1)
    assert sum("adopted batch" in m for m in messages) == stop_at
    assert any("holding back new batches until then" in m for m in messages)
    # One listing per run (every page of it: 3 a page here), not one per chunk.
    pages = [c for c in fake.calls if c[0] == "GET" and c[1].endswith("/batches")]
    assert len(pages) <= 2 * 2, pages
