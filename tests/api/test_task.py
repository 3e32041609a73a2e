"""Tasks with structured outputs, end to end.

A real `llmbatch serve` runs its `openai` engine against a small fake model on 127.0.0.1 (an
OpenAI-compatible chat endpoint): it answers with the JSON the prompt asks for, breaks the
answer for prompts marked `BAD:` until it is told what was wrong, answers a score out of bounds
for prompts marked `BIG:` until told, and never gets `NEVER:` prompts right. The task's client
talks to the server over HTTP like any provider.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from fakes._serve import serve_app
from fastapi import FastAPI, Request
from pydantic import BaseModel, Field

from llmbatch.api import BatchConfig, Task


class Sentiment(BaseModel):
    label: Literal["positive", "negative"]
    score: int


def fake_model(seen: list[dict[str, Any]]) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict[str, Any]:
        body = await request.json()
        seen.append(body)
        first = body["messages"][0]["content"]
        told = "does not match" in body["messages"][-1]["content"]
        if first.startswith("NEVER:") or (first.startswith("BAD:") and not told):
            content = '{"label": "maybe"'
        elif first.startswith("BIG:") and not told:
            content = '{"label": "positive", "score": 1181903914809537}'
        else:
            content = first.split(":", 1)[1] if ":" in first[:6] else first
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        }

    return app


@pytest.fixture
def model_server(server_factory) -> Iterator[tuple[Any, list[dict[str, Any]]]]:  # type: ignore[no-untyped-def]
    seen: list[dict[str, Any]] = []
    with serve_app(fake_model(seen)) as root:
        yield server_factory("--engine", "openai", "--upstream-url", f"{root}/v1"), seen


def _task(
    server: Any, tmp_path: Path, inputs: list[dict[str, Any]], output: type[BaseModel] = Sentiment, **kwargs: Any
) -> Task[dict[str, Any]]:
    return Task(
        "sentiment",
        inputs,
        lambda r: {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": r["prompt"]}]},
        output=output,
        provider="openai",
        base_url=server.base_url,
        api_key="test",
        job_dir=tmp_path / "jobs",
        config=BatchConfig(size=50, send_delay=0.2, poll_interval=0.05),
        **kwargs,
    )


def _prompt(i: int, mark: str = "") -> str:
    label = "positive" if i % 2 else "negative"
    return mark + json.dumps({"label": label, "score": i})


def test_structured_outputs_reach_the_sink_in_order(model_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server, seen = model_server
    inputs = [{"id": i, "prompt": _prompt(i, "BAD:" if i % 5 == 0 else "")} for i in range(20)]
    inputs.append({"id": 20, "prompt": _prompt(20, "NEVER:")})
    sink = tmp_path / "labels.jsonl"
    task = _task(server, tmp_path, inputs, sink=sink, process=lambda r, s: {"id": r["id"], "label": s.label})
    report = task.run()

    assert (report.succeeded, report.failed) == (20, 1)
    records = [json.loads(line) for line in sink.read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(21))
    for r in records[:20]:
        assert r["output"] == {"id": r["index"], "label": "positive" if r["index"] % 2 else "negative"}
    assert records[20]["output"] is None and "did not match Sentiment after 3 tries" in records[20]["error"]
    # The schema went out as a strict JSON-schema response_format.
    fmt = seen[0]["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "Sentiment"
    assert fmt["json_schema"]["schema"]["properties"]["label"]["enum"] == ["positive", "negative"]
    # BAD rows were asked twice (the second time shown what was wrong); NEVER three times.
    asked = [b["messages"][0]["content"] for b in seen]
    assert asked.count(_prompt(0, "BAD:")) == 2 and asked.count(_prompt(20, "NEVER:")) == 3
    assert asked.count(_prompt(1)) == 1


def test_a_rerun_sends_nothing_again(model_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server, seen = model_server
    inputs = [{"id": i, "prompt": _prompt(i, "BAD:" if i == 3 else "")} for i in range(10)]
    first = _task(server, tmp_path, inputs).run()
    calls = len(seen)
    second = _task(server, tmp_path, inputs).run()
    assert len(seen) == calls  # every answer, retries included, came from the job store
    assert [r.output for r in first.rows] == [r.output for r in second.rows]
    assert all(isinstance(r.output, Sentiment) for r in second.rows)


def test_without_an_output_model_process_gets_the_completion(model_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server, _seen = model_server
    inputs = [{"prompt": f"plain text {i}"} for i in range(3)]
    task = _task(server, tmp_path, inputs, process=lambda r, c: c.choices[0].message.content)
    task.output = None
    report = task.run()
    assert [r.output for r in report.rows] == [f"plain text {i}" for i in range(3)]


def test_a_bad_request_builder_fails_its_row_only(model_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server, _seen = model_server
    inputs = [{"id": 0, "prompt": _prompt(1)}, {"id": 1}]  # the second has no prompt
    report = _task(server, tmp_path, inputs).run()
    assert report.rows[0].ok and report.rows[0].output == Sentiment(label="positive", score=1)
    assert not report.rows[1].ok and "KeyError" in (report.rows[1].error or "")


def test_dataframes(model_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pd = pytest.importorskip("pandas")
    server, _seen = model_server
    report = _task(server, tmp_path, [{"prompt": _prompt(i)} for i in range(4)]).run()
    df = report.to_pandas()
    assert isinstance(df, pd.DataFrame) and list(df["index"]) == [0, 1, 2, 3]


class Rated(BaseModel):
    label: Literal["positive", "negative"]
    score: int = Field(ge=0, le=10)


def test_an_answer_out_of_the_schemas_bounds_is_asked_again(model_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Bounds (pydantic ge/le, the schema's minimum/maximum) go out in the schema and are checked
    in every answer: an engine that does not enforce them (a fractional bound on llama.cpp, most
    open-model servers) gets the answer back with what was wrong, as a parse failure does."""
    server, seen = model_server
    inputs = [{"prompt": _prompt(3, "BIG:")}, {"prompt": _prompt(20)}]  # 20 is past le=10 every time
    report = _task(server, tmp_path, inputs, output=Rated).run()
    assert report.rows[0].output == Rated(label="positive", score=3)
    assert report.rows[1].output is None and "less than or equal to 10" in (report.rows[1].error or "")
    schema = seen[0]["response_format"]["json_schema"]["schema"]
    assert (schema["properties"]["score"]["minimum"], schema["properties"]["score"]["maximum"]) == (0, 10)
    asked = [b["messages"][0]["content"] for b in seen]
    assert asked.count(_prompt(3, "BIG:")) == 2 and asked.count(_prompt(20)) == 3
