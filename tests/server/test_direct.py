"""The direct (non-batch) API on the shared echo server, through the official openai SDK."""

from __future__ import annotations

import math
import re

import httpx
import openai
import pytest

from conftest import chat_line, run_batch

ERROR_KEYS = {"message", "type", "param", "code"}


def assert_envelope(r: httpx.Response, status: int) -> dict[str, object]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == ERROR_KEYS
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def test_chat_echo(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": "the last user message ✓"},
        ],
    )
    assert reply.object == "chat.completion"
    assert reply.id.startswith("chatcmpl-")
    assert reply.model == "gpt-4o-mini"
    assert len(reply.choices) == 1
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "the last user message ✓"
    assert choice.finish_reason == "stop"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_content_parts(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="echo",
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "part one, "}, {"type": "text", "text": "two"}]}
        ],
    )
    assert reply.choices[0].message.content == "part one, two"


def test_chat_max_tokens_truncates(client: openai.OpenAI) -> None:
    text = "one two three four five six seven eight nine ten eleven twelve"
    for kwargs in ({"max_tokens": 3}, {"max_completion_tokens": 3}):
        reply = client.chat.completions.create(
            model="echo",
            messages=[{"role": "user", "content": text}],
            **kwargs,  # type: ignore[arg-type]
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "length"
        assert reply.usage is not None and reply.usage.completion_tokens == 3
        assert choice.message.content and choice.message.content != text
        assert text.startswith(choice.message.content)
    # a limit above the reply's length does not cut it
    reply = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": text}], max_tokens=500)
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == text


def test_completions(client: openai.OpenAI) -> None:
    out = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="complete this sentence")
    assert out.object == "text_completion"
    assert out.choices[0].text == "complete this sentence"
    assert out.choices[0].finish_reason == "stop"
    assert out.usage is not None and out.usage.prompt_tokens > 0 and out.usage.completion_tokens > 0
    several = client.completions.create(model="x", prompt=["a b", "c d e"], max_tokens=1)
    assert [c.text for c in several.choices] == ["a", "c"]
    assert all(c.finish_reason == "length" for c in several.choices)


def test_embeddings(client: openai.OpenAI) -> None:
    default = client.embeddings.create(model="text-embedding-3-small", input="embed me")  # SDK asks for base64
    floats = client.embeddings.create(model="text-embedding-3-small", input="embed me", encoding_format="float")
    v1, v2 = default.data[0].embedding, floats.data[0].embedding
    assert len(v1) == len(v2) > 0
    assert v1 == pytest.approx(v2, abs=1e-6)
    assert math.isclose(math.fsum(x * x for x in v2), 1.0, rel_tol=1e-4)
    assert default.usage.prompt_tokens > 0

    other = client.embeddings.create(model="text-embedding-3-small", input="something else", encoding_format="float")
    assert other.data[0].embedding != v2

    for dims in (8, 64, 1000):
        short = client.embeddings.create(model="m", input="embed me", dimensions=dims)
        assert len(short.data[0].embedding) == dims
        short_f = client.embeddings.create(model="m", input="embed me", dimensions=dims, encoding_format="float")
        assert short.data[0].embedding == pytest.approx(short_f.data[0].embedding, abs=1e-6)

    many = client.embeddings.create(model="m", input=["a", "b", "c"])
    assert [d.index for d in many.data] == [0, 1, 2]


def test_responses(client: openai.OpenAI) -> None:
    resp = client.responses.create(model="gpt-4o-mini", input="respond with this")
    assert resp.object == "response"
    assert resp.status == "completed"
    assert resp.output_text == "respond with this"
    assert resp.usage is not None and resp.usage.input_tokens > 0 and resp.usage.output_tokens > 0
    listed = client.responses.create(
        model="gpt-4o-mini",
        instructions="be nice",
        input=[{"role": "user", "content": "earlier"}, {"role": "user", "content": "latest"}],
    )
    assert listed.output_text == "latest"


def test_models(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert "echo" in ids
    m = client.models.retrieve("echo")
    assert m.id == "echo"
    assert m.object == "model"
    with pytest.raises(openai.NotFoundError) as exc:
        client.models.retrieve("no-such-model")
    assert exc.value.code == "model_not_found"


def test_moderations_not_served(client: openai.OpenAI, server) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.NotFoundError) as exc:
        client.moderations.create(input="hello")
    assert exc.value.code == "unsupported_endpoint"
    error = assert_envelope(server.http().post("/v1/moderations", json={"input": "hello"}), 404)
    assert error["code"] == "unsupported_endpoint"
    assert "/v1/moderations" in str(error["message"])


def test_invalid_body(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="echo", messages=[])
    assert exc.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}], max_tokens=0)
    assert exc.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model="m", input="")
    assert exc.value.param == "input"


# -- streaming (stream: true): server-sent events as OpenAI sends them --------------------------


def test_chat_streams_as_openai_chunks_with_usage_last(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "stream this back ✓"}]
    whole = client.chat.completions.create(model="gpt-4o-mini", messages=messages, n=2)
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini", messages=messages, n=2, stream=True, stream_options={"include_usage": True}
        )
    )
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    *answer, last = chunks
    assert last.choices == [] and last.usage == whole.usage  # the usage chunk comes last, with no choices
    assert all(c.usage is None for c in answer)
    for index in (0, 1):
        deltas = [ch.delta for c in answer for ch in c.choices if ch.index == index]
        assert deltas[0].role == "assistant"
        assert "".join(d.content or "" for d in deltas) == "stream this back ✓"
        finishes = [ch.finish_reason for c in answer for ch in c.choices if ch.index == index]
        assert finishes[-1] == "stop" and not any(finishes[:-1])
    # Without stream_options no usage chunk; the stream ends with [DONE] (the SDK stops on it).
    r = client.chat.completions.with_raw_response.create(model="m", messages=messages, stream=True)
    raw = r.http_response.read().decode()
    assert r.http_response.headers["content-type"].startswith("text/event-stream")
    assert raw.endswith("data: [DONE]\n\n") and '"usage"' not in raw


def test_completions_and_responses_stream(client: openai.OpenAI) -> None:
    chunks = list(client.completions.create(model="m", prompt="one two three", stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "one two three"
    assert chunks[-1].choices[0].finish_reason == "stop" and {c.object for c in chunks} == {"text_completion"}
    events = list(client.responses.create(model="m", instructions="be brief", input="respond, streamed", stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "respond, streamed"
    final = events[-1].response
    assert final.output_text == "respond, streamed" and final.usage.output_tokens > 0
    cut = list(client.responses.create(model="m", input="a b c d e f", max_output_tokens=2, stream=True))
    assert cut[-1].type == "response.incomplete" and cut[-1].response.incomplete_details.reason == "max_output_tokens"


def test_a_stream_refused_before_it_starts_is_an_ordinary_error(client: openai.OpenAI, server) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="m", messages=[], stream=True)
    assert exc.value.param == "messages"
    http = server.http()
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    for extra, param in (
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options"),
    ):
        error = assert_envelope(http.post("/v1/chat/completions", json={**body, **extra}), 400)
        assert error["param"] == param


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"])
@pytest.mark.parametrize("content", [b"{not json", b"", b"[1, 2]", b"\xff"], ids=["broken", "empty", "array", "binary"])
def test_malformed_json_body(server, path: str, content: bytes) -> None:  # type: ignore[no-untyped-def]
    r = server.http().post(path, content=content, headers={"content-type": "application/json"})
    error = assert_envelope(r, 400)
    assert error["type"] == "invalid_request_error"


def test_unknown_url(server) -> None:  # type: ignore[no-untyped-def]
    http = server.http()
    for method, path in (("GET", "/v1/nope"), ("POST", "/v1/chat/complete"), ("GET", "/nothing/here")):
        error = assert_envelope(http.request(method, path), 404)
        assert path in str(error["message"])


def test_metrics(client: openai.OpenAI, server) -> None:  # type: ignore[no-untyped-def]
    client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "count me"}])
    b = run_batch(client, [chat_line(i) for i in range(2)])
    assert b.status == "completed"
    r = httpx.get(f"http://127.0.0.1:{server.port}/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert "# TYPE llmbatch_requests_total counter" in text
    assert "# TYPE llmbatch_batches gauge" in text

    def value(pattern: str) -> int:
        m = re.search(pattern, text, re.M)
        assert m, f"no line matching {pattern!r} in:\n{text}"
        return int(float(m.group(1)))

    # prometheus_client writes labels in alphabetical order, values as floats
    direct = r'^llmbatch_requests_total\{endpoint="/v1/chat/completions",source="direct",status="200"\} ([\d.]+)$'
    batch = r'^llmbatch_requests_total\{endpoint="/v1/chat/completions",source="batch",status="200"\} ([\d.]+)$'
    assert value(direct) >= 1
    assert value(batch) >= 2
    assert value(r'^llmbatch_batches\{status="completed"\} ([\d.]+)$') >= 1

    # counters go up with traffic
    before = value(direct)
    client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "once more"}])
    text = httpx.get(f"http://127.0.0.1:{server.port}/metrics").text
    assert value(direct) == before + 1
    # a streamed answer is counted as well, once it has been sent
    for _ in client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "s"}], stream=True):
        pass
    text = httpx.get(f"http://127.0.0.1:{server.port}/metrics").text
    assert value(direct) == before + 2
