"""The Anthropic adapter: translation both ways, the adapter against an HTTP fake, and `llmbatch run` end to end.

The fake (`tests/fakes/anthropic.py`) is served on 127.0.0.1 by uvicorn, and the adapter reaches
it through the official `anthropic` SDK over real HTTP; the CLI tests run `python -m llmbatch`
as subprocesses against the same fake, served from the test process so it survives kills.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes._serve import serve_app
from fakes.anthropic import FakeAnthropic, anthropic_fake
from provider_cli import CLI, check_killed_job, check_store_rollback, job_db, read_lines, run_live_tiny_job

from conftest import chat_line, jsonl, kill_then_finish
from llmbatch._exceptions import ConfigError, ProviderError
from llmbatch.jobs import JobRunner, JobSession, JobSettings
from llmbatch.providers import RemoteStatus, create_provider
from llmbatch.providers._anthropic import JOURNAL, AnthropicBatchProvider, _read_journal
from llmbatch.providers._anthropic_translate import (
    DEFAULT_MAX_TOKENS,
    Untranslatable,
    openai_line,
    to_messages_params,
    translate_request,
)

MODEL = "claude-haiku-4-5"
CHAT = "/v1/chat/completions"
PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()
PDF = "data:application/pdf;base64," + base64.b64encode(b"%PDF-1.4 fake").decode()
WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
EPHEMERAL = {"type": "ephemeral"}
PARIS = '{"city": "Paris"}'
IMAGE_PART = {"type": "image_url", "image_url": {"url": PNG}}
BAD_ARGS = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}


def text_block(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


def body(*messages: dict[str, Any], **params: Any) -> dict[str, Any]:
    return {"model": params.pop("model", MODEL), "messages": list(messages) or [user("hi")], **params}


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


# -- translation: requests -------------------------------------------------------------------


def test_translates_a_full_conversation() -> None:
    params = to_messages_params(
        body(
            {"role": "system", "content": "You are terse."},
            {"role": "developer", "content": [{"type": "text", "text": "Cite sources.", "cache_control": EPHEMERAL}]},
            user([
                {"type": "text", "text": "What is in these?"},
                {"type": "image_url", "image_url": {"url": PNG}},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg", "detail": "high"}},
                {"type": "file", "file": {"file_data": PDF, "filename": "paper.pdf"}},
            ]),
            user("And the weather in Paris?"),
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": PARIS}}
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            user("Thanks"),
            max_completion_tokens=300,
            max_tokens=300,
            temperature=0.2,
            top_p=1,
            stop=["END", "##"],
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "weather"}},
            parallel_tool_calls=False,
            user="u-42",
            reasoning_effort="high",
            n=1,
            stream=False,
            logprobs=False,
            presence_penalty=0,
            service_tier="auto",
            seed=None,
        )
    )  # fmt: skip
    assert params == {
        "model": MODEL,
        "system": [
            {"type": "text", "text": "You are terse."},
            {"type": "text", "text": "Cite sources.", "cache_control": {"type": "ephemeral"}},
        ],
        "messages": [
            {
                "role": "user",  # two user turns merged: Anthropic wants the roles to alternate
                "content": [
                    {"type": "text", "text": "What is in these?"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": PNG.split(",")[1]},
                    },
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}},
                    {
                        "type": "document",
                        "source": {"type": "base64", "media_type": "application/pdf", "data": PDF.split(",")[1]},
                        "title": "paper.pdf",
                    },
                    {"type": "text", "text": "And the weather in Paris?"},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": [{"type": "text", "text": "sunny"}]},
                    {"type": "text", "text": "Thanks"},
                ],
            },
        ],
        "max_tokens": 300,
        "temperature": 0.2,  # top_p=1 is the default: left out, as Anthropic refuses both together
        "stop_sequences": ["END", "##"],
        "tools": [
            {
                "name": "weather",
                "input_schema": WEATHER["function"]["parameters"],
                "description": "The weather in a city",
            }
        ],
        "tool_choice": {"type": "tool", "name": "weather", "disable_parallel_tool_use": True},
        "metadata": {"user_id": "u-42"},
        "output_config": {"effort": "high"},
    }


def test_translates_defaults_and_small_forms() -> None:
    p = to_messages_params(body(stop="STOP", top_p=0.5))
    assert p["max_tokens"] == DEFAULT_MAX_TOKENS
    assert p["stop_sequences"] == ["STOP"] and p["top_p"] == 0.5 and "temperature" not in p
    assert p["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert "system" not in p and "tool_choice" not in p
    assert to_messages_params(body(tools=[WEATHER], tool_choice="required"))["tool_choice"] == {"type": "any"}
    assert to_messages_params(body(tools=[WEATHER], tool_choice="none"))["tool_choice"] == {"type": "none"}
    assert to_messages_params(body(tools=[WEATHER], parallel_tool_calls=False))["tool_choice"] == {
        "type": "auto",
        "disable_parallel_tool_use": True,
    }
    assert "tool_choice" not in to_messages_params(body(tools=[WEATHER], parallel_tool_calls=True))
    assert "tool_choice" not in to_messages_params(body(parallel_tool_calls=False, tool_choice="auto"))
    # Models that refuse sampling parameters: the defaults are left out, not refused.
    p = to_messages_params(body(model="claude-sonnet-5", temperature=1, top_p=1))
    assert "temperature" not in p and "top_p" not in p
    assert to_messages_params(body(safety_identifier="s-1", user="s-1"))["metadata"] == {"user_id": "s-1"}
    p = to_messages_params(body(temperature=1, top_p=0.5))  # temperature 1 is the default: top_p is what was asked
    assert p["top_p"] == 0.5 and "temperature" not in p
    assert to_messages_params(body(temperature=1))["temperature"] == 1
    assert to_messages_params(body(max_tokens=7))["max_tokens"] == 7
    assert to_messages_params(body(response_format={"type": "text"})).get("output_config") is None


def test_json_schema_becomes_a_structured_output_format() -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
        "required": ["name", "age"],
    }
    p = to_messages_params(
        body(
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
        )
    )
    fmt = p["output_config"]["format"]
    assert fmt["type"] == "json_schema"
    assert fmt["schema"]["additionalProperties"] is False
    assert fmt["schema"]["required"] == ["name", "age"]
    # A constraint Anthropic does not enforce moves into the description (the SDK's transform_schema).
    assert "minimum" not in fmt["schema"]["properties"]["age"]
    assert "minimum: 0" in fmt["schema"]["properties"]["age"]["description"]


REFUSED = [
    ({"n": 2}, "n=2"),
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": -1}, "frequency_penalty"),
    ({"seed": 7}, "seed"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"verbosity": "low"}, "verbosity"),
    ({"prompt_cache_key": "k"}, "prompt_cache_key"),
    ({"metadata": {"team": "a"}}, "metadata"),
    ({"store": True}, "store"),
    ({"service_tier": "flex"}, "service_tier"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10, "max_completion_tokens": 20}, "max_completion_tokens and max_tokens differ"),
    ({"temperature": 1.5}, "temperature=1.5: Anthropic's range is 0 to 1"),
    ({"temperature": 0.3, "top_p": 0.9}, "temperature and top_p"),
    ({"model": "claude-opus-4-7", "temperature": 0.3}, "claude-opus-4-7 takes no sampling parameters"),
    ({"model": "claude-fable-5", "top_p": 0.9}, "takes no sampling parameters"),
    ({"stop": "\n"}, "whitespace-only"),
    ({"response_format": {"type": "json_object"}}, "json_object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"reasoning_effort": "minimal"}, "reasoning_effort"),
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "only function tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "allowed_tools"}}, "tool_choice"),
    ({"tool_choice": "required"}, "no tools"),
    ({"user": "a", "safety_identifier": "b"}, "user and safety_identifier"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "system", "content": "only this"}]}, "besides the system prompt"),
    ({"messages": [user([{"type": "image_url", "image_url": {"url": PNG, "detail": "low"}}])]}, "detail='low'"),
    ({"messages": [user([{"type": "image_url", "image_url": {"url": "data:image/svg+xml;base64,PHN2Zz4="}}])]}, "svg"),
    ({"messages": [user([{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}])]}, "http(s)"),
    ({"messages": [user([{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}])]}, "input_audio"),
    ({"messages": [user([{"type": "file", "file": {"file_id": "file-1"}}])]}, "file_id"),
    ({"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "name"),
    ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "role='function'"),
    ({"messages": [{"role": "system", "content": [IMAGE_PART]}, user("x")]}, "text parts"),
    ({"messages": [user("x"), {"role": "assistant", "content": ""}]}, "assistant message needs content"),
    ({"messages": [user("x"), {"role": "assistant", "tool_calls": [BAD_ARGS]}]}, "arguments"),
    ({"messages": [user([{"type": "text", "text": "x", "cache_control": {"type": "forever"}}])]}, "cache_control"),
]  # fmt: skip


@pytest.mark.parametrize(("params", "reason"), REFUSED, ids=[r for _p, r in REFUSED])
def test_refuses_what_it_cannot_translate_naming_it(params: dict[str, Any], reason: str) -> None:
    params = dict(params)
    b = body(**params) if "messages" not in params else {"model": params.pop("model", MODEL), **params}
    reasons = AnthropicBatchProvider.check_request("/v1/chat/completions", b)
    assert reasons, f"{params} was accepted"
    assert any(reason in r for r in reasons), reasons
    with pytest.raises(Untranslatable):
        to_messages_params(b)


def test_refuses_other_endpoints() -> None:
    (reason,) = AnthropicBatchProvider.check_request("/v1/embeddings", {"model": "m", "input": "x"})
    assert "/v1/embeddings" in reason
    assert AnthropicBatchProvider.check_request("/v1/chat/completions", body()) == []
    assert translate_request(body(n=3, seed=1))[1] == ["n=3: Anthropic returns one choice per request",
                                                        "seed=1: Anthropic has no sampling seed"]  # fmt: skip


# -- translation: results --------------------------------------------------------------------


def message(content: list[dict[str, Any]], stop_reason: str = "end_turn", **usage: int) -> dict[str, Any]:
    u = {"input_tokens": 10, "output_tokens": 4, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": MODEL, "content": content,
            "stop_reason": stop_reason, "stop_sequence": None, "usage": {**u, **usage}}  # fmt: skip


def test_results_become_openai_lines() -> None:
    ok = {"type": "succeeded", "message": message(
        [{"type": "thinking", "thinking": "hm", "signature": "s"}, text_block("Hel"), text_block("lo")],
        cache_read_input_tokens=100, cache_creation_input_tokens=5, output_tokens_details={"thinking_tokens": 2},
    )}  # fmt: skip
    line = openai_line({"custom_id": "a", "result": ok}, created=123)
    assert line["custom_id"] == "a" and line["error"] is None and line["native"] == ok
    assert line["response"]["status_code"] == 200
    b = line["response"]["body"]
    assert b["object"] == "chat.completion" and b["created"] == 123 and b["model"] == MODEL
    assert b["choices"][0]["message"]["content"] == "Hello"
    assert b["choices"][0]["finish_reason"] == "stop"
    assert b["usage"] == {
        "prompt_tokens": 115,  # input + cache reads + cache writes
        "completion_tokens": 4,
        "total_tokens": 119,
        "prompt_tokens_details": {"cached_tokens": 100},
        "completion_tokens_details": {"reasoning_tokens": 2},
    }

    tool = {"type": "succeeded", "message": message(
        [{"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "P"}}], "tool_use")}  # fmt: skip
    m = openai_line({"custom_id": "t", "result": tool})["response"]["body"]["choices"][0]
    assert m["finish_reason"] == "tool_calls" and m["message"]["content"] is None
    (call,) = m["message"]["tool_calls"]
    assert call["id"] == "toolu_1" and call["function"]["name"] == "weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "P"}

    for stop_reason, finish in (("max_tokens", "length"), ("stop_sequence", "stop"), ("refusal", "content_filter")):
        r = {"type": "succeeded", "message": message([{"type": "text", "text": "x"}], stop_reason)}
        choice = openai_line({"custom_id": "s", "result": r})["response"]["body"]["choices"][0]
        assert choice["finish_reason"] == finish
        assert (choice["message"]["refusal"] is not None) == (stop_reason == "refusal")


@pytest.mark.parametrize(
    ("kind", "status"),
    [("invalid_request_error", 400), ("rate_limit_error", 429), ("overloaded_error", 529), ("api_error", 500),
     ("billing_error", 402), ("conflict_error", 409), ("brand_new_error", 500)],
)  # fmt: skip
def test_errored_results_carry_an_http_status(kind: str, status: int) -> None:
    r = {"type": "errored", "error": {"type": "error", "error": {"type": kind, "message": "nope"}}}
    line = openai_line({"custom_id": "e", "result": r})
    assert line["response"]["status_code"] == status
    assert line["response"]["body"]["error"] == {"message": "nope", "type": kind, "param": None, "code": None}
    assert line["native"] == r


def test_requests_that_never_ran_are_not_run_lines() -> None:
    for kind, code in (("canceled", "batch_cancelled"), ("expired", "batch_expired")):
        line = openai_line({"custom_id": "x", "result": {"type": kind}})
        assert line["response"] is None and line["error"]["code"] == code and line["native"] == {"type": kind}


# -- the adapter against the fake ------------------------------------------------------------


def test_measured_sizes_add_up_to_the_create_body(tmp_path: Path) -> None:
    """What ingest measures of each row (the chunk planner's bytes) plus the envelope is the
    create request's body to the byte, so a chunk planned within 256 MB is a body within it."""
    rows = [
        chat_line("a", "hello", model=MODEL),
        chat_line("b", "weather in Paris?", model=MODEL, tools=[WEATHER], temperature=0.5),
        chat_line("c", "in blocks", model=MODEL, max_tokens=50),
    ]
    rows[2]["body"]["messages"] = [{"role": "system", "content": "Be terse."}, user([text_block("x" * 300)])]
    measured = [AnthropicBatchProvider.check_and_measure(r["custom_id"], CHAT, r["body"]) for r in rows]
    assert all(reasons == [] and size for reasons, size in measured)
    assert AnthropicBatchProvider.check_and_measure("d", CHAT, body(n=2)) == (translate_request(body(n=2))[1], None)

    async def main() -> str:
        p = provider("http://127.0.0.1:9")  # uploading translates on this machine: nothing is sent
        try:
            return await upload(p, tmp_path, "t-c00001", rows)
        finally:
            await p.aclose()

    created = Path(asyncio.run(main()).removeprefix("local:"))
    total = AnthropicBatchProvider.wire_envelope + sum(size or 0 for _r, size in measured)
    assert created.stat().st_size == total


@pytest.fixture
def served() -> Iterator[tuple[str, FakeAnthropic]]:
    app, fake = anthropic_fake(end_after_polls=2)
    with serve_app(app) as url:
        yield url, fake


def provider(url: str, **kw: Any) -> AnthropicBatchProvider:
    """The adapter as the runner makes it, without SDK retries (a repeated call would hide a bug here)."""
    p = create_provider("anthropic", api_key=kw.pop("api_key", "test"), base_url=url, max_retries=0, **kw)
    assert isinstance(p, AnthropicBatchProvider)
    return p


def write_chunk(folder: Path, tag: str, rows: list[dict[str, Any]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{tag}.jsonl"
    path.write_bytes(jsonl(rows))
    return path


def rows_of(n: int, prefix: str = "r", model: str = MODEL, **texts: str) -> list[dict[str, Any]]:
    return [chat_line(f"{prefix}{i}", texts.get(f"{prefix}{i}"), model=model) for i in range(n)]


async def upload(p: AnthropicBatchProvider, folder: Path, tag: str, rows: list[dict[str, Any]]) -> str:
    return await p.upload(tag, write_chunk(folder, tag, rows))


async def submit(p: AnthropicBatchProvider, folder: Path, tag: str, rows: list[dict[str, Any]]) -> tuple[str, Any]:
    fid = await upload(p, folder, tag, rows)
    return fid, await p.create_batch(tag, "job", fid, "/v1/chat/completions")


def create_behind_its_back(url: str, fid: str) -> str:
    """Creates the batch as create_batch would, without the adapter hearing the answer (a crash)."""
    headers = {"x-api-key": "test", "anthropic-version": "2023-06-01"}
    r = httpx.post(f"{url}/v1/messages/batches", content=Path(fid[len("local:") :]).read_bytes(), headers=headers)
    r.raise_for_status()
    return r.json()["id"]


def test_batch_lifecycle_and_results(served: tuple[str, FakeAnthropic], tmp_path: Path) -> None:
    url, fake = served
    tool_row = chat_line("tools", "weather please", model=MODEL, tools=[WEATHER], tool_choice="required")
    conversation = {
        **chat_line("conv", model=MODEL),
        "body": body(
            {"role": "system", "content": "sys"},
            user("call it"),
            {"role": "assistant", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "rain"},
            user("one two three four five"),
            tools=[WEATHER], tool_choice="none", max_tokens=3,
        ),
    }  # fmt: skip
    schema = {"type": "object", "properties": {"echo": {"type": "string"}}, "required": ["echo"]}
    structured_output = {"type": "json_schema", "json_schema": {"name": "e", "schema": schema}}
    json_row = chat_line("json", "as json", model=MODEL, response_format=structured_output)
    rows = rows_of(6, r1="boom FAIL400", r2="slow FAIL429", r3="late EXPIRE") + [tool_row, conversation, json_row]
    dest = tmp_path / "out.jsonl"

    p = provider(url)

    async def scenario() -> list[Any]:
        fid, created = await submit(p, tmp_path / "chunks", "job-c00001", rows)
        polled = [await p.get_batch(created.id), await p.get_batch(created.id)]
        await p.download(created.id, dest)
        return [fid, created, *polled]

    fid, created, first, ended = asyncio.run(_closing(p, scenario))
    assert fid.startswith("local:")
    assert not Path(fid[len("local:") :]).exists(), "the translated file is dropped once the batch exists"
    journal = read_lines(tmp_path / "chunks" / JOURNAL)
    assert journal == [{"tag": "job-c00001", "batch_id": created.id}]
    assert (created.status, created.total, created.output_file_id) == (RemoteStatus.IN_PROGRESS, 9, None)
    assert (first.status, first.completed, first.output_file_id) == (RemoteStatus.IN_PROGRESS, 0, None)
    assert (ended.status, ended.output_file_id, ended.total, ended.completed, ended.failed) == (
        RemoteStatus.COMPLETED, created.id, 9, 6, 3,
    )  # fmt: skip
    assert ended.created_at == pytest.approx(time.time(), abs=30)

    lines = read_lines(dest)
    by_id = {line["custom_id"]: line for line in lines}
    assert set(by_id) == {r["custom_id"] for r in rows} and len(lines) == len(rows)
    assert not dest.with_name(dest.name + ".part").exists()
    for cid in ("r0", "r4", "r5"):
        assert by_id[cid]["response"]["status_code"] == 200
        assert by_id[cid]["response"]["body"]["choices"][0]["message"]["content"] == f"hello {cid}"
        assert by_id[cid]["native"]["type"] == "succeeded"
    assert by_id["r1"]["response"]["status_code"] == 400
    assert by_id["r2"]["response"]["status_code"] == 429
    assert by_id["r3"]["error"]["code"] == "batch_expired"
    tools = by_id["tools"]["response"]["body"]["choices"][0]
    assert tools["finish_reason"] == "tool_calls" and tools["message"]["tool_calls"][0]["function"]["name"] == "weather"
    conv = by_id["conv"]["response"]
    assert conv["status_code"] == 200, conv  # the fake's validator accepted the translated conversation
    assert conv["body"]["choices"][0]["message"]["content"] == "one two three"
    assert conv["body"]["choices"][0]["finish_reason"] == "length"
    assert conv["body"]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    structured = by_id["json"]["response"]
    assert structured["status_code"] == 200, structured
    assert json.loads(structured["body"]["choices"][0]["message"]["content"]) == {"echo": "as json"}
    # Results come back shuffled and are still matched.
    assert [line["custom_id"] for line in lines] != [r["custom_id"] for r in rows]
    assert [m for m, _path in fake.calls] == ["POST", "GET", "GET", "GET", "GET"]


async def _closing(p: AnthropicBatchProvider, scenario: Any) -> Any:
    try:
        return await scenario()
    finally:
        await p.aclose()


def test_cancel_and_expire(served: tuple[str, FakeAnthropic], tmp_path: Path) -> None:
    url, fake = served
    fake.cancel_completes = 2
    p = provider(url)

    async def scenario() -> None:
        _fid, b = await submit(p, tmp_path / "chunks", "job-c00001", rows_of(5))
        assert (await p.cancel(b.id)).status is RemoteStatus.CANCELLING
        b = await p.get_batch(b.id)
        assert b.status is RemoteStatus.CANCELLED and (b.completed, b.failed) == (2, 3)
        await p.download(b.id, tmp_path / "c.jsonl")

        _fid, b = await submit(p, tmp_path / "chunks", "job-c00002", rows_of(3, "e"))
        fake.expire(b.id)
        b = await p.get_batch(b.id)
        assert b.status is RemoteStatus.COMPLETED and b.failed == 3  # expired rows come back for a retry
        await p.download(b.id, tmp_path / "e.jsonl")

    asyncio.run(_closing(p, scenario))
    codes = sorted((line["error"] or {}).get("code", "ok") for line in read_lines(tmp_path / "c.jsonl"))
    assert codes == ["batch_cancelled"] * 3 + ["ok"] * 2
    assert {line["error"]["code"] for line in read_lines(tmp_path / "e.jsonl")} == {"batch_expired"}


def test_keys_urls_and_http_errors(served: tuple[str, FakeAnthropic], tmp_path: Path, monkeypatch: Any) -> None:
    url, fake = served
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="set ANTHROPIC_API_KEY or pass --api-key"):
        AnthropicBatchProvider(base_url=url)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", url)
    p = AnthropicBatchProvider(max_retries=0)
    assert p.base_url == url
    # The fake holds to the real API's headers, and takes the beta client's `?beta=true`.
    ok_headers = {"x-api-key": "test", "anthropic-version": "2023-06-01"}
    assert httpx.get(f"{url}/v1/messages/batches?beta=true", headers=ok_headers).status_code == 200
    refused = httpx.get(f"{url}/v1/messages/batches", headers={"x-api-key": "test"})
    assert refused.status_code == 400 and refused.json()["type"] == "error"
    bad = provider(url, api_key="wrong")

    async def scenario() -> None:
        with pytest.raises(ProviderError) as err:
            await p.get_batch("msgbatch_nope")
        assert err.value.status == 404 and not err.value.retryable
        fid = await upload(bad, tmp_path, "t", rows_of(1))
        with pytest.raises(ProviderError) as err:
            await bad.create_batch("t", "job", fid, "/v1/chat/completions")
        assert err.value.status == 401 and not err.value.retryable
        with pytest.raises(ConfigError, match="24h"):
            await bad.create_batch("t", "job", fid, "/v1/chat/completions", "48h")
        # A chunk with a repeated custom_id (the runner never makes one): the API refuses the whole batch.
        fid = await upload(p, tmp_path, "dup", rows_of(2) + rows_of(1))
        with pytest.raises(ProviderError, match="not unique") as err:
            await p.create_batch("dup", "job", fid, "/v1/chat/completions")
        assert err.value.status == 400
        await bad.aclose()

    asyncio.run(_closing(p, scenario))
    assert fake.creates == 0


# -- finding a batch after a crash ----------------------------------------------------------


def test_find_batch_journal_and_single_processing_candidate(served: tuple[str, FakeAnthropic], tmp_path: Path) -> None:
    url, fake = served
    p = provider(url)
    since = int(time.time()) - 300
    chunks = tmp_path / "chunks"

    async def scenario() -> None:
        # Recorded in the journal: found without listing anything.
        fid, b = await submit(p, chunks, "job-c00001", rows_of(4, "a"))
        calls = len(fake.calls)
        assert (await p.find_batch("job-c00001", since, fid)).id == b.id  # type: ignore[union-attr]
        assert not any(path.startswith("/v1/messages/batches?") for _m, path in fake.calls[calls:])

        # Created, answer lost: the one processing batch of its size is adopted, and journalled.
        fid = await upload(p, chunks, "job-c00002", rows_of(4, "b"))
        lost = create_behind_its_back(url, fid)
        fake.add_batch(["x1", "x2", "x3"])  # another size: never a candidate
        found = await p.find_batch("job-c00002", since, fid)
        assert found is not None and found.id == lost and found.status is RemoteStatus.IN_PROGRESS
        assert not (chunks / "job-c00002.anthropic.jsonl").exists()
        # The first chunk's batch (same size, also processing) was no candidate: the journal names it.
        assert (chunks / JOURNAL).read_text().count(lost) == 1
        assert (await p.find_batch("job-c00002", since, fid)).id == lost  # type: ignore[union-attr]

    asyncio.run(_closing(p, scenario))
    assert fake.creates == 2


def test_find_batch_none_when_nothing_matches(served: tuple[str, FakeAnthropic], tmp_path: Path) -> None:
    url, fake = served
    p = provider(url)

    async def scenario() -> Any:
        fid = await upload(p, tmp_path, "job-c00001", rows_of(3))
        fake.add_batch(["a", "b", "c"], created_at=time.time() - 4000)  # same size, before the chunk's intent
        fake.add_batch(["a", "b", "c"], ended=True)  # same size, ended, not ours: read and ruled out
        fake.add_batch(["a", "b"])
        return await p.find_batch("job-c00001", int(time.time()) - 300, fid)

    assert asyncio.run(_closing(p, scenario)) is None
    assert any(path.endswith("/results") for _m, path in fake.calls), "the ended candidate was read"


def test_find_batch_verifies_an_ended_candidate(served: tuple[str, FakeAnthropic], tmp_path: Path) -> None:
    url, fake = served
    p = provider(url)

    async def scenario() -> Any:
        fid = await upload(p, tmp_path, "job-c00001", rows_of(3))
        ours = create_behind_its_back(url, fid)
        fake.batches[ours].polls = 5
        await p.get_batch(ours)  # ended now
        fake.add_batch(["a", "b", "c"])  # a stranger's processing batch of the same size, newer
        found = await p.find_batch("job-c00001", int(time.time()) - 300, fid)
        return ours, found

    ours, found = asyncio.run(_closing(p, scenario))
    assert found is not None and found.id == ours and found.status is RemoteStatus.COMPLETED


def test_find_batch_refuses_to_guess(served: tuple[str, FakeAnthropic], tmp_path: Path) -> None:
    url, fake = served
    p = provider(url)
    since = int(time.time()) - 300

    async def scenario() -> None:
        # Two processing batches of the chunk's size: either could be its own.
        fid = await upload(p, tmp_path / "one", "job-c00001", rows_of(3))
        fake.add_batch(["a", "b", "c"])
        fake.add_batch(["d", "e", "f"])
        with pytest.raises(ProviderError, match="cannot tell yet") as err:
            await p.find_batch("job-c00001", since, fid)
        assert err.value.retryable

        # One, but another chunk of the job waits for a batch of that size too.
        fid = await upload(p, tmp_path / "two", "job-c00001", rows_of(4, "a"))
        await upload(p, tmp_path / "two", "job-c00002", rows_of(4, "b"))
        create_behind_its_back(url, fid)
        with pytest.raises(ProviderError, match="1 other chunks") as err:
            await p.find_batch("job-c00001", since, fid)
        assert err.value.retryable

    asyncio.run(_closing(p, scenario))


def test_find_batch_pages_through_the_list(tmp_path: Path) -> None:
    app, fake = anthropic_fake(page_cap=3)
    with serve_app(app) as url:
        p = provider(url)

        async def scenario() -> Any:
            fid = await upload(p, tmp_path, "job-c00001", rows_of(2))
            ours = create_behind_its_back(url, fid)
            for i in range(8):  # newer batches of other sizes push ours to the third page
                fake.add_batch([f"x{j}" for j in range(i + 3)], created_at=time.time() + 1 + i)
            return ours, await p.find_batch("job-c00001", int(time.time()) - 300, fid)

        ours, found = asyncio.run(_closing(p, scenario))
    assert found is not None and found.id == ours
    lists = [path for _m, path in fake.calls if path.startswith("/v1/messages/batches?")]
    assert len(lists) == 3 and all("after_id=" in q for q in lists[1:]), lists


def results_reads(fake: FakeAnthropic) -> Counter[str]:
    """How many times each batch's results were asked for."""
    return Counter(path.split("/")[-2] for _m, path in fake.calls if path.endswith("/results"))


def test_an_ambiguous_lookup_waits_alone_and_reads_results_once(tmp_path: Path) -> None:
    """Chunk 1's create went unanswered and a stranger made a batch of the same size meanwhile:
    which one is the chunk's cannot be told until they end. Chunks 2 and 3 go on meanwhile, the
    line saying so is printed once, and once both end the chunk's batch (the one created nearest
    its create) is recognised by reading its results, which are then not downloaded again; the
    stranger's results are never read."""
    app, fake = anthropic_fake(end_after_polls=1)
    inp = tmp_path / "in.jsonl"
    rows = [chat_line(i, model=MODEL) for i in range(30)]
    inp.write_bytes(jsonl(rows))
    messages: list[str] = []
    with serve_app(app) as url:
        settings = JobSettings(provider="anthropic", base_url=url, batch_size=10, poll_interval=0.01,
                               max_poll_interval=0.01)  # fmt: skip
        session, _ = JobSession.open([inp], settings, tmp_path / "jobs", api_key="test", say=messages.append)
        prepared = session.prepare(settings)
        store = session.store
        p = provider(url)
        runner = JobRunner(store, session.dir, prepared.settings, p, prices=prepared.prices, say=messages.append)

        async def scenario() -> Any:
            runner.plan()
            c1 = store.chunks(("planned",))[0]
            store.move_chunk(c1.id, "uploading", ("planned",), intent_at=int(time.time()))
            fid = await p.upload(c1.tag, runner.write_chunk_file(c1))
            store.move_chunk(c1.id, "uploaded", ("uploading",), file_id=fid)
            store.move_chunk(c1.id, "creating", ("uploaded",), intent_at=int(time.time()))
            ours = create_behind_its_back(url, fid)
            stranger = fake.add_batch([f"s{i}" for i in range(10)], created_at=time.time() + 2).id
            task = asyncio.create_task(runner.run())
            deadline = time.monotonic() + 10
            while len(store.chunks(("collected",))) < 2:
                assert not task.done(), task.result()
                assert time.monotonic() < deadline, f"other chunks held back: {messages[-1]}"
                await asyncio.sleep(0.01)
            assert store.chunk_of_tag(c1.tag).state == "creating"  # type: ignore[union-attr]
            await asyncio.sleep(0.2)  # a few more rounds of looking
            with fake.lock:
                fake._end(fake.batches[ours])
                fake._end(fake.batches[stranger])
            outcome = await asyncio.wait_for(task, 20)
            await p.aclose()
            return ours, stranger, outcome

        ours, stranger, outcome = asyncio.run(scenario())
        session.close()
    assert outcome.code == 0, (outcome.summary, messages)
    out = read_lines(tmp_path / "in.results.jsonl")
    assert [r["custom_id"] for r in out] == [r["custom_id"] for r in rows]
    assert sum("cannot tell yet" in m for m in messages) == 1, messages
    reads = results_reads(fake)
    assert reads[ours] == 1 and stranger not in reads, reads
    assert fake.creates == 3


# -- the direct API ------------------------------------------------------------------------


def test_direct(served: tuple[str, FakeAnthropic]) -> None:
    url, fake = served
    p = provider(url)

    async def scenario() -> list[tuple[int, Any]]:
        return [
            await p.direct("/v1/chat/completions", body(user("hi there"), temperature=0.5)),
            await p.direct("/v1/chat/completions", body(user("q FAIL429"))),
            await p.direct("/v1/chat/completions", body(user("q FAIL429"))),
            await p.direct("/v1/chat/completions", body(user("bad FAIL400"))),
            await p.direct("/v1/chat/completions", body(user("x"), tools=[WEATHER])),
            await p.direct("/v1/chat/completions", body(n=2)),
        ]

    (s1, b1), (s2, b2), (s3, _b3), (s4, b4), (s5, b5), (s6, b6) = asyncio.run(_closing(p, scenario))
    assert s1 == 200 and b1["choices"][0]["message"]["content"] == "hi there"
    assert fake.direct_requests[0]["temperature"] == 0.5
    assert fake.direct_requests[0]["max_tokens"] == DEFAULT_MAX_TOKENS
    assert (s2, b2["error"]["type"], s3) == (429, "rate_limit_error", 200)
    assert s4 == 400 and "FAIL400" in b4["error"]["message"]
    assert s5 == 200 and b5["choices"][0]["finish_reason"] == "tool_calls"
    assert s6 == 400 and "n=2" in b6["error"]["message"]
    assert len(fake.direct_requests) == 5  # the untranslatable one was never sent


# -- llmbatch run end to end ---------------------------------------------------------------


def cli_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "OPENAI_"))}
    env.update(LLMBATCH_HOME=str(tmp_path / "home"), ANTHROPIC_API_KEY="test", NO_PROXY="127.0.0.1,localhost")
    return env


def llmbatch_run(
    tmp_path: Path, inp: Path, url: str, *extra: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    cmd = [*CLI, "run", str(inp), "--provider", "anthropic", "--base-url", url, "--poll-interval", "0.05", *extra]
    return subprocess.run(cmd, env=cli_env(tmp_path), capture_output=True, text=True, timeout=timeout)


def assert_one_batch_per_chunk(tmp_path: Path, fake: FakeAnthropic) -> None:
    """Every chunk the job planned has exactly one batch on the fake, holding the chunk's rows, and
    every batch is a chunk's. (A retried row points at its last chunk only, hence the subset.)"""
    db = job_db(tmp_path)
    try:
        chunks = list(db.execute("SELECT id, tag, batch_id, rows FROM chunks"))
        sent: dict[int, set[str]] = {}
        for chunk_id, cid, remote in db.execute("SELECT chunk_id, custom_id, remote_id FROM rows"):
            sent.setdefault(chunk_id, set()).add(remote or cid)
    finally:
        db.close()
    remote = fake.custom_id_sets()
    assert len(remote) == len(chunks), f"{len(remote)} batches for {len(chunks)} chunks"
    assert {batch_id for _c, _t, batch_id, _n in chunks} == set(remote)
    for chunk_id, tag, batch_id, n in chunks:
        assert len(remote[batch_id]) == n and sent.get(chunk_id, set()) <= remote[batch_id], f"chunk {tag}"


def test_cli_runs_chunks_retries_and_maps_long_ids(tmp_path: Path) -> None:
    app, fake = anthropic_fake(end_after_polls=1)
    long_id = "row-with-a-custom-id-that-is-far-longer-than-the-sixty-four-characters-anthropic-allows"
    rows = [chat_line(i, model=MODEL) for i in range(250)]
    rows[17] = chat_line(17, "refuse me FAIL400", model=MODEL)
    rows[42] = chat_line(42, "rate limited FAIL429", model=MODEL)
    rows[99] = chat_line(long_id, "long id", model=MODEL)
    rows[123] = chat_line(123, "tool time", model=MODEL, tools=[WEATHER], parallel_tool_calls=False)
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(jsonl(rows))
    with serve_app(app) as url:
        proc = llmbatch_run(tmp_path, inp, url, "--batch-size", "60", "--max-in-flight", "3")
    assert proc.returncode == 1, proc.stderr

    out = read_lines(tmp_path / "input.results.jsonl")
    assert [r["custom_id"] for r in out] == [r["custom_id"] for r in rows]
    for rec, row in zip(out, rows):
        if row["custom_id"] in ("row-17", "row-123"):
            continue
        assert rec["response"]["status_code"] == 200, rec
        assert rec["response"]["body"]["choices"][0]["message"]["content"] == row["body"]["messages"][0]["content"]
        assert rec["native"]["type"] == "succeeded"
    assert out[17]["response"]["status_code"] == 400
    assert out[123]["response"]["body"]["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "weather"
    (err,) = read_lines(tmp_path / "input.errors.jsonl")
    assert err["custom_id"] == "row-17" and err["response"]["status_code"] == 400
    # Anthropic's results have no line id: each line gets one of its own (issue 15: they were null).
    ids = [r["id"] for r in out]
    assert all(i.startswith("batch_req_") for i in ids) and len(set(ids)) == len(rows) and err["id"] == ids[17]

    sent = [cid for ids in fake.custom_id_sets().values() for cid in ids]
    assert long_id not in sent and sum(cid.startswith("lb_") for cid in sent) == 1
    assert sent.count("row-42") == 2, "the rate-limited row is sent once more"
    assert len(fake.custom_id_sets()) == 6  # 5 chunks of at most 60 rows, and one for the retried row
    assert_one_batch_per_chunk(tmp_path, fake)


def test_cli_progress_says_anthropic_reports_none_until_a_batch_ends(tmp_path: Path) -> None:
    """Anthropic's counts stay 0 (all `processing`) until the batch ends: the progress line says
    the progress is unknown until then, instead of a 0 that looks hung."""
    app, _fake = anthropic_fake(end_after_polls=4)
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(jsonl([chat_line(i, model=MODEL) for i in range(3)]))
    with serve_app(app) as url:
        proc = llmbatch_run(tmp_path, inp, url)
    assert proc.returncode == 0, proc.stderr
    running = [line for line in proc.stderr.splitlines() if "1 in_progress" in line]
    assert running and all("progress unknown until the end" in line for line in running), proc.stderr


def test_cli_reports_unsupported_rows_at_ingest(tmp_path: Path) -> None:
    app, fake = anthropic_fake(end_after_polls=1)
    rows = [chat_line(i, model=MODEL) for i in range(4)]
    rows[1] = chat_line(1, model=MODEL, n=2)
    rows[2] = chat_line(2, model=MODEL, response_format={"type": "json_object"})
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(jsonl(rows))
    with serve_app(app) as url:
        proc = llmbatch_run(tmp_path, inp, url)
        assert proc.returncode == 2, proc.stderr
        assert "input.jsonl:2" in proc.stderr and "n=2" in proc.stderr
        assert "input.jsonl:3" in proc.stderr and "json_object" in proc.stderr
        assert fake.calls == [], "nothing is sent while rows are invalid"

        # --skip-invalid runs the rest; with --direct-below they go through the Messages API.
        proc = llmbatch_run(tmp_path, inp, url, "--skip-invalid", "--direct-below", "10")
    assert proc.returncode == 1, proc.stderr
    out = read_lines(tmp_path / "input.results.jsonl")
    assert [r["custom_id"] for r in out] == [r["custom_id"] for r in rows]
    assert [r["response"]["status_code"] for r in (out[0], out[3])] == [200, 200]
    errors = read_lines(tmp_path / "input.errors.jsonl")
    assert [e["custom_id"] for e in errors] == ["row-1", "row-2"]
    assert "input.jsonl:2" in errors[0]["error"]["message"]
    assert len(fake.direct_requests) == 2 and fake.creates == 0


def test_cli_model_override_reaches_batches_direct_calls_and_retries(tmp_path: Path) -> None:
    """Rows naming an OpenAI model run with `--model claude-sonnet-4-5`: the batch and the retry
    `--direct-below` sends directly both carry Claude's name (issue 15: direct calls sent the
    row's own `gpt-4o-mini`, which Anthropic answers with a 404). One run: the SDK's import
    makes each ~2.5 s; rows that go direct from the start are in test_gemini.py and
    test_runner_memory.py."""
    app, fake = anthropic_fake(end_after_polls=1)
    rows = [chat_line(i) for i in range(12)]  # model gpt-4o-mini
    rows[4] = chat_line(4, "rate limited FAIL429")  # in the batch, then again in its first direct call
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(jsonl(rows))
    model = "claude-sonnet-4-5"
    with serve_app(app) as url:
        # 12 rows in a batch; the failed one is then below --direct-below and goes direct.
        proc = llmbatch_run(tmp_path, inp, url, "--model", model, "--direct-below", "5", "--max-attempts", "4")
    assert proc.returncode == 0, proc.stderr
    assert "through the direct API" in proc.stderr
    out = read_lines(tmp_path / "input.results.jsonl")
    assert [r["response"]["status_code"] for r in out] == [200] * 12
    assert out[4]["response"]["body"]["model"] == model
    batched = [r["params"]["model"] for b in fake.batches.values() for r in b.requests]
    assert batched == [model] * 12 and len(fake.batches) == 1
    assert [p["model"] for p in fake.direct_requests] == [model] * 2  # row 4: a 429, then answered


def test_sigkill_at_random_moments_loses_nothing_and_pays_nothing_twice(tmp_path: Path) -> None:
    """Kills `llmbatch run` right after the fake made a batch (before the client can record it) and
    at random moments; afterwards every row is there once, in order, and each chunk has one batch."""
    app, fake = anthropic_fake(end_after_seconds=0.3, end_after_polls=None, create_latency=0.05)
    n = 400
    rows = [chat_line(i, model=MODEL) for i in range(n)]
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(jsonl(rows))
    with serve_app(app) as url:
        cmd = [*CLI, "run", str(inp), "--provider", "anthropic", "--batch-size", "40", "--max-in-flight", "3",
               "--poll-interval", "0.05", "--base-url", url]  # fmt: skip
        kills = kill_then_finish(cmd, cli_env(tmp_path), attempts=6, seed=7, fake=fake, min_kills=4)
    found = check_killed_job(tmp_path, n)
    assert_one_batch_per_chunk(tmp_path, fake)
    assert any(path.startswith("/v1/messages/batches?") for _m, path in fake.calls), (
        "no batch was looked for by listing"
    )
    print(f"{kills} kills; reconciliations: {found}")


def turns_line(i: int, text: str | None = None) -> dict[str, Any]:
    """A row of many short turns: Anthropic's translation (each message a content-block array,
    `max_tokens` added) is ~1.45x its compact OpenAI line, as long conversations grow in practice."""
    row = chat_line(i, model=MODEL)
    row["body"]["messages"] = [
        *({"role": "user" if k % 2 == 0 else "assistant", "content": f"turn {k}"} for k in range(8)),
        user(text or f"hello {i}"),
    ]
    return row


def compact_jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in rows)


def assert_each_row_once(tmp_path: Path, fake: FakeAnthropic, n: int) -> None:
    """Every row answered once, in order, and sent in exactly one batch."""
    out = read_lines(tmp_path / "input.results.jsonl")
    assert [r["custom_id"] for r in out] == [f"row-{i}" for i in range(n)]
    sent = Counter(cid for ids in fake.custom_id_sets().values() for cid in ids)
    assert set(sent.values()) == {1}


def test_cli_splits_chunks_the_api_refuses_as_too_large(tmp_path: Path) -> None:
    """An API that takes less than llmbatch plans for (a proxy's body limit, a lowered quota)
    answers 413: the refused chunk (nothing accepted) is split and sent again, never left stuck;
    a row too large on its own fails with the reason, and the rest run."""
    limit = 20_000
    app, fake = anthropic_fake(end_after_polls=1, max_body=limit)
    n = 200
    rows = [turns_line(i) for i in range(n)]
    rows[150] = turns_line(150, "big " * 6_000)  # ~24 KB once translated: no batch can hold it
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(compact_jsonl(rows))
    with serve_app(app) as url:
        proc = llmbatch_run(tmp_path, inp, url)
    assert proc.returncode == 1, proc.stderr  # one failed row
    assert "refused" in proc.stderr and "splitting" in proc.stderr, proc.stderr
    refused = [size for size in fake.create_sizes if size > limit]
    assert refused and len(fake.create_sizes) == len(fake.batches) + len(refused)
    out = read_lines(tmp_path / "input.results.jsonl")
    assert [r["custom_id"] for r in out] == [r["custom_id"] for r in rows]
    (err,) = read_lines(tmp_path / "input.errors.jsonl")
    assert err["custom_id"] == "row-150" and err["response"]["status_code"] == 413
    assert "too large" in err["response"]["body"]["error"]["message"]
    assert all(r["response"]["status_code"] == 200 for r in out if r["custom_id"] != "row-150")
    sent = Counter(cid for ids in fake.custom_id_sets().values() for cid in ids)
    assert set(sent.values()) == {1} and len(sent) == n - 1


def test_a_refused_chunk_is_replanned_on_its_translated_size(tmp_path: Path) -> None:
    """A chunk left in `uploading` (refused before anything left this machine, or killed there)
    is re-planned when the run is repeated with a smaller --max-bytes, instead of being sent as
    planned (and refused) again; and --max-bytes counts a batch as Anthropic receives it, ~1.45x
    the OpenAI lines here: with the API taking exactly that much, every batch fits the first
    time, and they are full."""
    limit = 20_000
    app, fake = anthropic_fake(end_after_polls=1, max_body=limit)
    n = 200
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(compact_jsonl([turns_line(i) for i in range(n)]))
    with serve_app(app) as url:
        dry = llmbatch_run(tmp_path, inp, url, "--dry-run")
        assert dry.returncode == 0, dry.stderr
        db = job_db(tmp_path)
        with db:
            db.execute("UPDATE chunks SET state='uploading', intent_at=strftime('%s','now')")
        db.close()
        proc = llmbatch_run(tmp_path, inp, url, "--max-bytes", str(limit))
    assert proc.returncode == 0, proc.stderr
    assert max(fake.create_sizes) <= limit, "a batch was sent larger than --max-bytes (and refused)"
    assert len(fake.create_sizes) == len(fake.batches) > 1  # none refused
    assert all(size > limit - 700 for size in fake.create_sizes[:-1])  # full: the next row (~650 bytes) did not fit
    assert_each_row_once(tmp_path, fake, n)
    db = job_db(tmp_path)
    states = Counter(state for (state,) in db.execute("SELECT state FROM chunks"))
    db.close()
    assert states == {"abandoned": 1, "collected": len(fake.batches)}


# -- a real job --------------------------------------------------------------------------------


@pytest.mark.live
def test_live_tiny_job(tmp_path: Path) -> None:
    """Two rows on Anthropic's real API (costs a fraction of a cent); needs ANTHROPIC_API_KEY."""
    key = os.environ.get("ANTHROPIC_API_KEY")
    if not key:
        pytest.skip("ANTHROPIC_API_KEY is not set")
    model = os.environ.get("LLMBATCH_LIVE_ANTHROPIC_MODEL", MODEL)
    env = {**cli_env(tmp_path), "ANTHROPIC_API_KEY": key}
    out = run_live_tiny_job("anthropic", tmp_path, model, 2, 10, env, 3600)
    assert all(r["response"]["body"]["usage"]["prompt_tokens"] > 0 for r in out)


# -- a rolled-back job store (issue 13) -----------------------------------------------------


@pytest.mark.parametrize("stop_at", [2, 4], ids=["two-processing", "two-collected"])
def test_a_store_rolled_back_adopts_the_batches_in_the_journal(tmp_path: Path, stop_at: int) -> None:
    """Anthropic batches carry no tag: the journal beside the store (left intact when only the
    store is rolled back) names them, and a lost batch's rows are read from its results once it
    ends; until then nothing more is sent. (The run is stopped once the journal names `stop_at`
    batches: a batch made but not yet journaled when the process dies is not recognised.)"""
    app, fake = anthropic_fake(end_after_polls=4)

    def journaled() -> int:
        return sum(len(_read_journal(p.parent)) for p in (tmp_path / "jobs").glob("*/chunks/" + JOURNAL))

    with serve_app(app) as url:
        settings = JobSettings(provider="anthropic", base_url=url, batch_size=10, max_in_flight=2,
                               poll_interval=0.01, max_poll_interval=0.01)  # fmt: skip
        messages = check_store_rollback(tmp_path, settings, MODEL, lambda: provider(url), journaled, stop_at)
    assert len(fake.batches) == 4, fake.custom_id_sets()
    sent = Counter(cid for ids in fake.custom_id_sets().values() for cid in ids)
    assert sent == dict.fromkeys((f"row-{i}" for i in range(40)), 1)
    assert sum("adopted batch" in m for m in messages) == stop_at
    listings = [c for c in fake.calls if c[0] == "GET" and c[1].split("?")[0] == "/v1/messages/batches"]
    assert len(listings) == 1, listings  # the first run's journal was empty: nothing to list
    # The audit reads an adopted batch's results once, and collecting it uses that copy (a batch
    # the first run collected was read then too, before its store was rolled back).
    reads = results_reads(fake)
    assert set(reads) == set(fake.batches) and max(reads.values()) == (1 if stop_at == 2 else 2), reads
