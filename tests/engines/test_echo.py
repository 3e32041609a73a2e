"""The echo engine; its token counts checked against tiktoken itself."""

from __future__ import annotations

import asyncio
import base64
import math
import struct
import time
from typing import Any

import openai
import pytest
from tiktoken_reference import CL100K, O200K

from llmbatch.engines import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    MODERATIONS,
    RESPONSES,
    EchoOptions,
    EngineRequest,
    EngineResponse,
    create_engine,
)
from llmbatch.engines._echo import EchoEngine

# By tiktoken itself: `chat()` rows name gpt-4o-mini (o200k_base); the other tests' model "m" is
# unknown, so cl100k_base.
ENC = CL100K


def ntok(text: str, enc: Any = CL100K) -> int:
    return len(enc.encode_ordinary(text))


def otok(text: str) -> int:
    return ntok(text, O200K)


def chat_prompt_tokens(messages: list[dict[str, Any]], enc: Any = O200K) -> int:
    """OpenAI's cookbook rule for chat prompts (string contents)."""
    total = 3
    for m in messages:
        total += 3
        for key, value in m.items():
            total += ntok(value, enc)
            if key == "name":
                total += 1
    return total


def make_engine(**kw: Any) -> EchoEngine:
    return EchoEngine(EchoOptions(**kw))


def call(engine: EchoEngine, endpoint: str, body: dict[str, Any], custom_id: str | None = None) -> EngineResponse:
    return asyncio.run(engine.handle(EngineRequest(endpoint, body, custom_id)))


def ok(endpoint: str, body: dict[str, Any], **kw: Any) -> dict[str, Any]:
    resp = call(make_engine(**kw), endpoint, body)
    assert resp.status_code == 200, resp.body
    assert isinstance(resp.body, dict)
    return resp.body


def chat(messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": messages, **extra}


# -- engine basics ---------------------------------------------------------------------------


def test_engine_registration_and_endpoints() -> None:
    engine = create_engine("echo", {"max_concurrency": 7})
    assert isinstance(engine, EchoEngine)
    assert engine.name == "echo"
    assert engine.max_concurrency == 7
    assert engine.endpoints == {CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES}
    assert MODERATIONS not in engine.endpoints
    assert engine.validate_model("anything-at-all") is None
    models = asyncio.run(engine.list_models())
    [model] = [openai.types.Model.model_validate(m) for m in models]
    assert (model.id, model.object, model.owned_by) == ("echo", "model", "llmbatch")
    # GET /v1/models must not change across restarts: a fresh engine reports the same time, a past one.
    assert asyncio.run(make_engine().list_models()) == models
    assert model.created <= time.time()


def test_unserved_endpoint_is_404() -> None:
    resp = call(make_engine(), MODERATIONS, {"model": "x", "input": "hi"})
    assert resp.status_code == 404
    assert resp.body["error"]["type"] == "invalid_request_error"


# -- chat --------------------------------------------------------------------------------------


def test_chat_echoes_last_user_message_and_counts_tokens() -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "Héllo, wörld! What's 2+2?", "name": "alice"},
    ]
    before = int(time.time())
    resp = call(make_engine(), CHAT, chat(messages))
    after = time.time()
    assert resp.status_code == 200
    body = resp.body
    openai.types.chat.ChatCompletion.model_validate(body)  # the SDK's own type parses it
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "gpt-4o-mini"  # any model is accepted and reported back
    assert before <= body["created"] <= after
    assert body["service_tier"] == "default"
    assert body["system_fingerprint"] == "fp_llmbatch_echo"
    [choice] = body["choices"]
    assert choice == {
        "index": 0,
        "message": {"role": "assistant", "content": "Héllo, wörld! What's 2+2?", "refusal": None, "annotations": []},
        "logprobs": None,
        "finish_reason": "stop",
    }
    prompt = chat_prompt_tokens(messages)
    completion = otok("Héllo, wörld! What's 2+2?")
    assert body["usage"] == {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
    assert resp.usage is not None
    assert (resp.usage.input_tokens, resp.usage.output_tokens) == (prompt, completion)
    assert (resp.usage.cached_tokens, resp.usage.reasoning_tokens) == (0, 0)


@pytest.mark.parametrize(("model", "enc"), [("gpt-4o", O200K), ("o3-mini", O200K), ("gpt-4", CL100K), ("m", CL100K)])
def test_usage_counts_in_the_models_vocabulary(model: str, enc: Any) -> None:
    text = "Ünïcödé and 日本語のテキスト, 42,195 emojis 😀👍🏽"
    assert ntok(text, O200K) != ntok(text, CL100K)
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": text}]
    usage = ok(CHAT, {"model": model, "messages": messages})["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (chat_prompt_tokens(messages, enc), ntok(text, enc))
    usage = ok(RESPONSES, {"model": model, "input": text, "instructions": "Be terse."})["usage"]
    assert (usage["input_tokens"], usage["output_tokens"]) == (chat_prompt_tokens(messages, enc), ntok(text, enc))
    usage = ok(EMBEDDINGS, {"model": model, "input": text})["usage"]
    assert usage["prompt_tokens"] == ntok(text, enc)


def test_chat_ids_are_unique() -> None:
    engine = make_engine()
    ids = {call(engine, CHAT, chat([{"role": "user", "content": "x"}])).body["id"] for _ in range(50)}
    assert len(ids) == 50


def test_chat_content_parts() -> None:
    content = [
        {"type": "text", "text": "Describe "},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        {"type": "text", "text": "this image."},
    ]
    body = ok(CHAT, chat([{"role": "user", "content": content}]))
    assert body["choices"][0]["message"]["content"] == "Describe this image."
    assert body["usage"]["completion_tokens"] == otok("Describe this image.")


def test_chat_without_user_message_replies_empty() -> None:
    body = ok(CHAT, chat([{"role": "system", "content": "only a system prompt"}]))
    assert body["choices"][0]["message"]["content"] == ""
    assert body["usage"]["completion_tokens"] == 0


def test_chat_max_tokens_truncates() -> None:
    text = "one two three four five six seven eight nine ten"
    tokens = O200K.encode_ordinary(text)
    for field in ("max_tokens", "max_completion_tokens"):
        body = ok(CHAT, chat([{"role": "user", "content": text}], **{field: 4}))
        choice = body["choices"][0]
        assert choice["message"]["content"] == O200K.decode(tokens[:4])
        assert choice["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 4
    # max_completion_tokens wins over max_tokens
    body = ok(CHAT, chat([{"role": "user", "content": text}], max_tokens=2, max_completion_tokens=5))
    assert body["choices"][0]["message"]["content"] == O200K.decode(tokens[:5])
    # a limit above the reply's length changes nothing
    body = ok(CHAT, chat([{"role": "user", "content": text}], max_tokens=1000))
    assert body["choices"][0]["message"]["content"] == text
    assert body["choices"][0]["finish_reason"] == "stop"


def test_chat_stop_strings() -> None:
    text = "alpha beta. gamma; delta"
    body = ok(CHAT, chat([{"role": "user", "content": text}], stop="."))
    assert body["choices"][0]["message"]["content"] == "alpha beta"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == otok("alpha beta")
    # the earliest of several stop strings wins
    body = ok(CHAT, chat([{"role": "user", "content": text}], stop=[";", " beta"]))
    assert body["choices"][0]["message"]["content"] == "alpha"
    # absent stop strings leave the reply alone
    body = ok(CHAT, chat([{"role": "user", "content": text}], stop=["zzz"]))
    assert body["choices"][0]["message"]["content"] == text
    # stop first, then the token limit
    body = ok(CHAT, chat([{"role": "user", "content": text}], stop=";", max_tokens=1))
    assert body["choices"][0]["message"]["content"] == "alpha"
    assert body["choices"][0]["finish_reason"] == "length"


def test_chat_n_choices() -> None:
    body = ok(CHAT, chat([{"role": "user", "content": "same answer"}], n=3))
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert {c["message"]["content"] for c in body["choices"]} == {"same answer"}
    assert body["usage"]["completion_tokens"] == 3 * otok("same answer")


# -- completions -------------------------------------------------------------------------------


def test_completions_string_prompt() -> None:
    prompt = "Once upon a time, in a land far away, there lived a dragon who loved tea."
    body = ok(COMPLETIONS, {"model": "gpt-3.5-turbo-instruct", "prompt": prompt})
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    assert body["model"] == "gpt-3.5-turbo-instruct"
    # no OpenAI-style default of 16 tokens: the whole prompt comes back
    assert body["choices"] == [{"text": prompt, "index": 0, "logprobs": None, "finish_reason": "stop"}]
    n = ntok(prompt)
    assert body["usage"] == {"prompt_tokens": n, "completion_tokens": n, "total_tokens": 2 * n}


def test_completions_list_prompts_n_and_limits() -> None:
    prompts = ["first prompt here", "second prompt is longer than the first"]
    body = ok(COMPLETIONS, {"model": "m", "prompt": prompts, "n": 2, "max_tokens": 2})
    texts = [c["text"] for c in body["choices"]]
    expected = [ENC.decode(ENC.encode_ordinary(p)[:2]) for p in prompts]
    assert texts == [expected[0], expected[0], expected[1], expected[1]]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert {c["finish_reason"] for c in body["choices"]} == {"length"}
    assert body["usage"]["prompt_tokens"] == sum(ntok(p) for p in prompts)
    assert body["usage"]["completion_tokens"] == 8

    body = ok(COMPLETIONS, {"model": "m", "prompt": "a, b, c", "stop": [","]})
    assert body["choices"][0]["text"] == "a"


def test_completions_token_prompts() -> None:
    tokens = ENC.encode_ordinary("hello there")
    body = ok(COMPLETIONS, {"model": "m", "prompt": tokens})
    assert body["choices"][0]["text"] == "hello there"
    assert body["usage"]["prompt_tokens"] == len(tokens)
    body = ok(COMPLETIONS, {"model": "m", "prompt": [tokens, ENC.encode_ordinary("bye")]})
    assert [c["text"] for c in body["choices"]] == ["hello there", "bye"]
    # ids are read in the model's vocabulary; ids outside it are a 400 naming it
    body = ok(COMPLETIONS, {"model": "gpt-4o", "prompt": O200K.encode_ordinary("hello there")})
    assert body["choices"][0]["text"] == "hello there"
    resp = call(make_engine(), COMPLETIONS, {"model": "m", "prompt": [O200K.n_vocab - 10]})
    assert resp.status_code == 400 and "cl100k_base" in resp.body["error"]["message"]


# -- embeddings --------------------------------------------------------------------------------


def embed(**body: Any) -> dict[str, Any]:
    return ok(EMBEDDINGS, {"model": "text-embedding-3-small", **body})


def test_embeddings_deterministic_unit_vectors() -> None:
    a = embed(input="the quick brown fox")
    b = embed(input=["the quick brown fox", "something else"])
    assert a["object"] == "list"
    assert a["model"] == "text-embedding-3-small"
    assert a["data"][0]["object"] == "embedding"
    assert a["data"][0]["index"] == 0
    va = a["data"][0]["embedding"]
    assert len(va) == 256
    assert all(isinstance(x, float) for x in va)
    assert math.isclose(math.fsum(x * x for x in va), 1.0, abs_tol=1e-5)
    assert b["data"][0]["embedding"] == va  # same text, same vector, across calls
    assert b["data"][1]["embedding"] != va
    assert [d["index"] for d in b["data"]] == [0, 1]
    assert a["usage"] == {"prompt_tokens": ntok("the quick brown fox"), "total_tokens": ntok("the quick brown fox")}


def test_embeddings_dimensions() -> None:
    v = embed(input="hello", dimensions=64)["data"][0]["embedding"]
    assert len(v) == 64
    assert math.isclose(math.fsum(x * x for x in v), 1.0, abs_tol=1e-5)


def test_embeddings_token_inputs() -> None:
    tokens = ENC.encode_ordinary("hello world")
    by_text = embed(input="hello world")["data"][0]["embedding"]
    body = embed(input=tokens)
    assert body["data"][0]["embedding"] == by_text
    assert body["usage"]["prompt_tokens"] == len(tokens)
    body = embed(input=[tokens, [15339]])
    assert len(body["data"]) == 2
    assert body["usage"]["prompt_tokens"] == len(tokens) + 1


def test_embeddings_base64_round_trip() -> None:
    floats = embed(input=["abc", "def"], dimensions=32)["data"]
    b64 = embed(input=["abc", "def"], dimensions=32, encoding_format="base64")["data"]
    for f, b in zip(floats, b64):
        raw = base64.b64decode(b["embedding"])
        assert len(raw) == 4 * 32
        decoded = list(struct.unpack("<32f", raw))
        assert decoded == f["embedding"]


# -- responses ---------------------------------------------------------------------------------


def test_responses_string_input() -> None:
    before = int(time.time())
    body = ok(RESPONSES, {"model": "gpt-4.1", "input": "Tell me a joke.", "instructions": "Be funny."})
    assert before <= body["created_at"] <= time.time()
    openai.types.responses.Response.model_validate(body)  # the SDK's own type parses it
    assert body["id"].startswith("resp_")
    assert body["object"] == "response"
    assert body["status"] == "completed"
    assert body["model"] == "gpt-4.1"
    assert body["error"] is None
    assert body["incomplete_details"] is None
    assert body["instructions"] == "Be funny."
    assert "output_text" not in body
    [item] = body["output"]
    assert item["type"] == "message"
    assert item["id"].startswith("msg_")
    assert item["status"] == "completed"
    assert item["role"] == "assistant"
    assert item["content"] == [{"type": "output_text", "text": "Tell me a joke.", "annotations": [], "logprobs": []}]
    assert body["parallel_tool_calls"] is True
    assert body["tool_choice"] == "auto"
    assert body["tools"] == []
    assert body["metadata"] == {}
    usage = body["usage"]
    assert usage["output_tokens"] == ntok("Tell me a joke.")
    # instructions count as input: more input tokens than the same request without them
    plain = ok(RESPONSES, {"model": "gpt-4.1", "input": "Tell me a joke."})
    assert usage["input_tokens"] > plain["usage"]["input_tokens"] + ntok("Be funny.") - 1
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert usage["input_tokens_details"]["cached_tokens"] == 0
    assert usage["output_tokens_details"] == {"reasoning_tokens": 0}


def test_responses_item_list_and_truncation() -> None:
    items = [
        {"role": "user", "content": "earlier question"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "earlier answer"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "one two three four five"}]},
    ]
    body = ok(RESPONSES, {"model": "m", "input": items})
    assert body["output"][0]["content"][0]["text"] == "one two three four five"
    body = ok(RESPONSES, {"model": "m", "input": items, "max_output_tokens": 2})
    assert body["status"] == "incomplete"
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["output"][0]["content"][0]["text"] == "one two"
    assert body["usage"]["output_tokens"] == 2


# -- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "body", "param"),
    [
        (CHAT, {"messages": [{"role": "user", "content": "x"}]}, "model"),
        (CHAT, {"model": 5, "messages": [{"role": "user", "content": "x"}]}, "model"),
        (CHAT, {"model": "m"}, "messages"),
        (CHAT, {"model": "m", "messages": []}, "messages"),
        (CHAT, {"model": "m", "messages": "hi"}, "messages"),
        (CHAT, {"model": "m", "messages": [{"content": "x"}]}, "messages[0].role"),
        (CHAT, {"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (
            CHAT,
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "messages[0].content[0].text",
        ),
        (CHAT, {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}, "stream"),
        (CHAT, {"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
        (CHAT, {"model": "m", "messages": [{"role": "user", "content": "x"}], "n": "2"}, "n"),
        (CHAT, {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        (CHAT, {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": True}, "max_tokens"),
        (
            CHAT,
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -3},
            "max_completion_tokens",
        ),
        (CHAT, {"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": 5}, "stop"),
        (COMPLETIONS, {"model": "m"}, "prompt"),
        (COMPLETIONS, {"model": "m", "prompt": []}, "prompt"),
        (COMPLETIONS, {"model": "m", "prompt": [10**9]}, "prompt"),
        (COMPLETIONS, {"model": "m", "prompt": "x", "max_tokens": 1.5}, "max_tokens"),
        (COMPLETIONS, {"model": "m", "prompt": "x", "stream": True}, "stream"),
        (EMBEDDINGS, {"model": "m"}, "input"),
        (EMBEDDINGS, {"model": "m", "input": ""}, "input"),
        (EMBEDDINGS, {"model": "m", "input": ["ok", ""]}, "input[1]"),
        (EMBEDDINGS, {"model": "m", "input": [1, "a"]}, "input"),
        (EMBEDDINGS, {"model": "m", "input": "x", "dimensions": 0}, "dimensions"),
        (EMBEDDINGS, {"model": "m", "input": "x", "encoding_format": "int8"}, "encoding_format"),
        (RESPONSES, {"model": "m"}, "input"),
        (RESPONSES, {"model": "m", "input": []}, "input"),
        (RESPONSES, {"model": "m", "input": "x", "stream": True}, "stream"),
        (RESPONSES, {"model": "m", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        (RESPONSES, {"model": "m", "input": ["x"]}, "input[0]"),
    ],
)
def test_validation_400(endpoint: str, body: dict[str, Any], param: str) -> None:
    resp = call(make_engine(), endpoint, body)
    assert resp.status_code == 400, resp.body
    assert resp.usage is None
    error = resp.body["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert isinstance(error["message"], str) and error["message"]


# -- injected failures and latency ---------------------------------------------------------------


def outcomes(engine: EchoEngine, ids: list[str]) -> list[int]:
    async def run() -> list[int]:
        body = chat([{"role": "user", "content": "hi"}])
        return [(await engine.handle(EngineRequest(CHAT, body, cid))).status_code for cid in ids]

    return asyncio.run(run())


def test_fail_rate_is_deterministic_and_about_right() -> None:
    ids = [f"row-{i}" for i in range(1000)]
    first = outcomes(make_engine(echo_fail_rate=0.5), ids)
    second = outcomes(make_engine(echo_fail_rate=0.5), ids)
    assert first == second
    failed = first.count(500)
    assert set(first) == {200, 500}
    assert 400 < failed < 600


def test_fail_rate_failure_body() -> None:
    resp = call(make_engine(echo_fail_rate=1.0), CHAT, chat([{"role": "user", "content": "x"}]), "a")
    assert resp.status_code == 500
    assert resp.body == {
        "error": {
            "message": "echo engine: injected failure (--echo-fail-rate)",
            "type": "server_error",
            "param": None,
            "code": "injected_failure",
        }
    }


def test_fail_rate_one_always_fails_and_zero_never() -> None:
    engine = make_engine(echo_fail_rate=1.0)
    assert set(outcomes(engine, ["same"] * 50 + [f"r{i}" for i in range(50)])) == {500}
    assert set(outcomes(make_engine(echo_fail_rate=0.0), [f"r{i}" for i in range(200)])) == {200}


def test_retried_failed_row_eventually_succeeds() -> None:
    engine = make_engine(echo_fail_rate=0.5)
    ids = [f"row-{i}" for i in range(200)]
    failed = [cid for cid, status in zip(ids, outcomes(engine, ids)) if status == 500]
    assert failed
    for cid in failed:
        statuses = outcomes(engine, [cid] * 60)
        assert 200 in statuses
        # each failure moves the row to a fresh draw; a success does not, so it sticks
        first_ok = statuses.index(200)
        assert set(statuses[first_ok:]) == {200}


def test_failure_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmbatch.engines import _echo

    monkeypatch.setattr(_echo, "_MAX_FAILURE_KEYS", 10)
    engine = make_engine(echo_fail_rate=1.0)
    outcomes(engine, [f"r{i}" for i in range(100)])
    assert len(engine._failures) == 10
    assert list(engine._failures) == [f"r{i}" for i in range(90, 100)]  # the oldest were dropped


def test_fail_rate_without_custom_id_keys_on_body() -> None:
    bodies = [chat([{"role": "user", "content": f"message {i}"}]) for i in range(300)]

    async def run(engine: EchoEngine) -> list[int]:
        return [(await engine.handle(EngineRequest(CHAT, b))).status_code for b in bodies]

    first = asyncio.run(run(make_engine(echo_fail_rate=0.5)))
    assert first == asyncio.run(run(make_engine(echo_fail_rate=0.5)))
    assert set(first) == {200, 500}


def test_latency() -> None:
    engine = make_engine(echo_latency=0.05)

    async def run() -> float:
        loop = asyncio.get_running_loop()
        t = loop.time()
        body = chat([{"role": "user", "content": "x"}])
        results = await asyncio.gather(*(engine.handle(EngineRequest(CHAT, body)) for _ in range(20)))
        assert all(r.ok for r in results)
        return loop.time() - t

    elapsed = asyncio.run(run())
    assert 0.05 <= elapsed < 1.0  # concurrent sleeps, not 20 x 0.05 in series


# -- the official openai SDK reads the answers -------------------------------------------------------


def test_openai_sdk_parses_answers() -> None:
    openai = pytest.importorskip("openai")
    import httpx
    import orjson

    engine = make_engine()

    def handler(request: httpx.Request) -> httpx.Response:
        endpoint = request.url.path
        resp = call(engine, endpoint, orjson.loads(request.content))
        return httpx.Response(
            resp.status_code, content=orjson.dumps(resp.body), headers={"content-type": "application/json"}
        )

    client = openai.OpenAI(
        api_key="unused",
        base_url="http://echo.invalid/v1",
        http_client=httpx.Client(transport=httpx.MockTransport(handler)),
        max_retries=0,
    )
    completion = client.chat.completions.create(model="any-model", messages=[{"role": "user", "content": "ping"}])
    assert completion.choices[0].message.content == "ping"
    assert completion.model == "any-model"

    # the SDK asks for base64 unless told otherwise and decodes it itself
    sdk_vector = client.embeddings.create(model="e", input="vector me").data[0].embedding
    assert sdk_vector == embed(input="vector me")["data"][0]["embedding"]

    response = client.responses.create(model="r", input="echo this")
    assert response.output_text == "echo this"

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=[])
    assert info.value.param == "messages"


def test_structured_output_answers_with_an_instance_of_the_schema(client) -> None:  # type: ignore[no-untyped-def]
    import json

    schema = {
        "type": "object",
        "properties": {
            "label": {"type": "string", "enum": ["spam", "ham"]},
            "why": {"type": "string"},
            "score": {"type": "integer", "minimum": 1},
            "tags": {"type": "array", "items": {"type": "string"}},
            "inner": {"$ref": "#/$defs/Inner"},
        },
        "$defs": {"Inner": {"type": "object", "properties": {"ok": {"type": "boolean"}}}},
    }
    r = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "buy now"}],
        response_format={"type": "json_schema", "json_schema": {"name": "S", "schema": schema}},
        max_tokens=3,  # a cap too small for the JSON is raised to fit: the answer must parse
    )
    assert json.loads(r.choices[0].message.content) == {
        "label": "spam", "why": "buy now", "score": 1, "tags": [], "inner": {"ok": False},
    }  # fmt: skip
