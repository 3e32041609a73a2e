"""Offline per-row token estimates and their priced totals."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from tiktoken_reference import CL100K, O200K

from llmbatch.engines import CHAT, COMPLETIONS, EMBEDDINGS, MODERATIONS, RESPONSES
from llmbatch.pricing import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    DEFAULT_OUTPUT_TOKENS,
    IMAGE_TOKENS,
    IMAGE_TOKENS_LOW,
    REASONING_OUTPUT_FACTOR,
    Estimate,
    PriceTable,
    RowEstimate,
    cost,
    cost_at,
    estimate_row,
    is_reasoning_model,
)

# Counts by tiktoken itself: o200k_base for the gpt-4o-generation models most rows here name,
# cl100k_base (`ctok`, `cjtok`) for the others.


def ntok(text: str, enc: Any = O200K) -> int:
    return len(enc.encode_ordinary(text))


def jtok(value: Any, enc: Any = O200K) -> int:
    """Tokens of compact JSON, as the estimator serialises tools and unknown shapes."""
    return ntok(orjson.dumps(value).decode(), enc)


def ctok(text: str) -> int:
    return ntok(text, CL100K)


def cjtok(value: Any) -> int:
    return jtok(value, CL100K)


def chat_tokens(messages: list[tuple[str, str]], enc: Any = O200K) -> int:
    """OpenAI's rule for string contents: 3 per message + role + content, 3 to prime the reply."""
    return 3 + sum(3 + ntok(role, enc) + ntok(content, enc) for role, content in messages)


SYSTEM = "You are a terse assistant. Answer in one word."
# Counted differently by the two vocabularies, so a row counted with the wrong one fails.
USER = "What is the capital of France? Think carefully — naïve answers are wrong. 日本語で答えて。"


def chat_body(**extra: Any) -> dict[str, Any]:
    return {
        "model": "gpt-4o-mini",
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}],
        **extra,
    }


# -- chat --------------------------------------------------------------------------------------


def test_chat_text_messages() -> None:
    est = estimate_row(CHAT, chat_body(max_tokens=50))
    assert est.input_tokens == chat_tokens([("system", SYSTEM), ("user", USER)])
    assert (est.output_tokens, est.capped) == (50, True)


def test_the_user_text_tells_the_vocabularies_apart() -> None:
    assert ntok(USER, O200K) != ntok(USER, CL100K)


@pytest.mark.parametrize(
    ("model", "enc"),
    [("gpt-4o", O200K), ("gpt-4.1-mini", O200K), ("gpt-5", O200K), ("o3", O200K), ("openai/gpt-oss-120b", O200K),
     ("gpt-4-turbo", CL100K), ("gpt-3.5-turbo", CL100K), ("my-local-model", CL100K)],
)  # fmt: skip
def test_rows_count_in_their_models_vocabulary(model: str, enc: Any) -> None:
    est = estimate_row(CHAT, chat_body(model=model, max_tokens=5))
    assert est.input_tokens == chat_tokens([("system", SYSTEM), ("user", USER)], enc)


def test_chat_caps_and_n() -> None:
    assert estimate_row(CHAT, chat_body(max_tokens=100)).output_tokens == 100
    # max_completion_tokens wins over the legacy max_tokens.
    assert estimate_row(CHAT, chat_body(max_tokens=100, max_completion_tokens=30)).output_tokens == 30
    assert estimate_row(CHAT, chat_body(max_tokens=100, n=3)).output_tokens == 300
    # n does not multiply the prompt: it is sent once.
    assert estimate_row(CHAT, chat_body(n=3)).input_tokens == estimate_row(CHAT, chat_body()).input_tokens


def test_chat_without_cap_uses_the_default_guess() -> None:
    est = estimate_row(CHAT, chat_body())
    assert (est.output_tokens, est.capped) == (DEFAULT_OUTPUT_TOKENS, False)
    assert estimate_row(CHAT, chat_body(), default_output_tokens=200).output_tokens == 200
    assert estimate_row(CHAT, chat_body(n=2), default_output_tokens=200).output_tokens == 400
    # Invalid caps count as absent rather than as a tiny ceiling.
    for bad in (0, -5, True, "100", 1.5):
        assert estimate_row(CHAT, chat_body(max_tokens=bad)).capped is False


@pytest.mark.parametrize(
    "model", ["o1", "o3-mini", "o4-mini-2025-04-16", "gpt-5", "gpt-5-nano", "gpt-5.1", "openai/o3"]
)
def test_reasoning_models_get_a_larger_default(model: str) -> None:
    assert is_reasoning_model(model)
    est = estimate_row(CHAT, chat_body(model=model))
    assert (est.output_tokens, est.capped) == (DEFAULT_OUTPUT_TOKENS * REASONING_OUTPUT_FACTOR, False)
    # A cap already includes reasoning tokens, so it stays the ceiling.
    assert estimate_row(CHAT, chat_body(model=model, max_completion_tokens=500)).output_tokens == 500


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4.1-mini", "o10", "text-embedding-3-small", None, 5])
def test_non_reasoning_models(model: Any) -> None:
    assert not is_reasoning_model(model)


def test_chat_text_parts_and_images() -> None:
    url = "data:image/png;base64," + "A" * 5000  # base64 must not be tokenised as text
    content = [
        {"type": "text", "text": "Describe both images."},
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/b.png", "detail": "high"}},
        {"type": "text", "text": "Be brief."},
    ]
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": content}], "max_tokens": 10}
    expected = 3 + 3 + ntok("user") + ntok("Describe both images.") + ntok("Be brief.")
    expected += IMAGE_TOKENS + IMAGE_TOKENS_LOW + IMAGE_TOKENS
    assert estimate_row(CHAT, body).input_tokens == expected


def test_chat_audio_and_file_parts_count_nothing() -> None:
    content = [
        {"type": "text", "text": "Transcribe."},
        {"type": "input_audio", "input_audio": {"data": "U" * 4000, "format": "wav"}},
        {"type": "file", "file": {"file_data": "F" * 4000, "filename": "a.pdf"}},
    ]
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": content}]}
    assert estimate_row(CHAT, body).input_tokens == 3 + 3 + ntok("user") + ntok("Transcribe.")


def test_chat_tools_and_response_format_count_as_json() -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ]
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}}}
    functions = [{"name": "legacy", "parameters": {"type": "object"}}]
    base = estimate_row(CHAT, chat_body()).input_tokens
    body = chat_body(tools=tools, response_format=fmt, functions=functions)
    assert estimate_row(CHAT, body).input_tokens == base + jtok(tools) + jtok(fmt) + jtok(functions)
    # Counted from a cache the second time; same answer.
    assert estimate_row(CHAT, body).input_tokens == base + jtok(tools) + jtok(fmt) + jtok(functions)


def test_chat_tool_calls_and_names() -> None:
    calls = [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]
    messages = [
        {"role": "user", "content": "hi", "name": "alice"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
    ]
    expected = 3
    expected += 3 + ntok("user") + ntok("hi") + ntok("alice") + 1
    expected += 3 + ntok("assistant") + jtok(calls)
    expected += 3 + ntok("tool") + ntok("42") + ntok("call_1")
    assert estimate_row(CHAT, {"model": "gpt-4o", "messages": messages}).input_tokens == expected


# -- completions -------------------------------------------------------------------------------


def test_completions_prompt_shapes() -> None:
    text = "Once upon a time"
    assert estimate_row(COMPLETIONS, {"model": "m", "prompt": text}).input_tokens == ctok(text)
    assert estimate_row(COMPLETIONS, {"model": "m", "prompt": [text, "The end"]}).input_tokens == ctok(text) + ctok(
        "The end"
    )
    assert estimate_row(COMPLETIONS, {"model": "m", "prompt": [1, 2, 3, 4]}).input_tokens == 4
    assert estimate_row(COMPLETIONS, {"model": "m", "prompt": [[1, 2], [3, 4, 5]]}).input_tokens == 5
    assert estimate_row(COMPLETIONS, {"model": "m", "prompt": text, "suffix": "!"}).input_tokens == ctok(text) + ctok(
        "!"
    )


def test_completions_output_ceiling() -> None:
    est = estimate_row(COMPLETIONS, {"model": "m", "prompt": "x"})
    assert (est.output_tokens, est.capped) == (COMPLETIONS_DEFAULT_MAX_TOKENS, True)
    assert estimate_row(COMPLETIONS, {"model": "m", "prompt": "x", "max_tokens": 100}).output_tokens == 100
    assert estimate_row(COMPLETIONS, {"model": "m", "prompt": "x", "max_tokens": 100, "n": 3}).output_tokens == 300
    # Each prompt of a list gets its own n completions; best_of bills that many.
    assert estimate_row(COMPLETIONS, {"model": "m", "prompt": ["a", "b"], "max_tokens": 10, "n": 2}).output_tokens == 40
    assert (
        estimate_row(COMPLETIONS, {"model": "m", "prompt": "a", "max_tokens": 10, "n": 2, "best_of": 5}).output_tokens
        == 50
    )


# -- embeddings and moderations ----------------------------------------------------------------


def test_embeddings_input_shapes() -> None:
    texts = ["first text", "second, longer text with more tokens"]
    for value, expected in [
        (texts[0], ctok(texts[0])),
        (texts, ctok(texts[0]) + ctok(texts[1])),
        ([5, 6, 7], 3),
        ([[5, 6], [7]], 3),
    ]:
        est = estimate_row(EMBEDDINGS, {"model": "text-embedding-3-small", "input": value})
        assert est == RowEstimate(expected, 0, True)


def test_moderations() -> None:
    est = estimate_row(MODERATIONS, {"model": "omni-moderation-latest", "input": "some text"})
    assert est == RowEstimate(ctok("some text"), 0, True)
    parts = [{"type": "text", "text": "hello"}, {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]
    assert estimate_row(MODERATIONS, {"model": "m", "input": parts}).input_tokens == ctok("hello") + IMAGE_TOKENS


# -- responses ---------------------------------------------------------------------------------


def test_responses_string_input_and_instructions() -> None:
    body = {"model": "gpt-4.1", "input": USER, "instructions": SYSTEM, "max_output_tokens": 64}
    est = estimate_row(RESPONSES, body)
    assert est.input_tokens == chat_tokens([("system", SYSTEM), ("user", USER)])
    assert (est.output_tokens, est.capped) == (64, True)


def test_responses_items_images_tools_and_defaults() -> None:
    tools = [{"type": "function", "name": "f", "parameters": {"type": "object"}}]
    fmt = {"type": "json_schema", "name": "a", "schema": {"type": "object"}}
    body = {
        "model": "o4-mini",
        "input": [
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is this?"},
                    {"type": "input_image", "image_url": "https://x/y.png", "detail": "low"},
                    {"type": "input_image", "image_url": "https://x/z.png", "detail": "auto"},
                ],
            }
        ],
        "tools": tools,
        "text": {"format": fmt},
    }
    est = estimate_row(RESPONSES, body)
    expected = 3 + 3 + ntok("user") + ntok("What is this?") + IMAGE_TOKENS_LOW + IMAGE_TOKENS + jtok(tools) + jtok(fmt)
    assert est.input_tokens == expected
    assert (est.output_tokens, est.capped) == (DEFAULT_OUTPUT_TOKENS * REASONING_OUTPUT_FACTOR, False)


# -- odd input ---------------------------------------------------------------------------------


def test_unknown_endpoint_counts_the_body_json() -> None:
    body = {"model": "m", "query": "find me", "max_tokens": 20}
    assert estimate_row("/v1/something", body) == RowEstimate(cjtok(body), 20, True)
    body = {"model": "m", "query": "find me"}
    assert estimate_row("/v1/something", body) == RowEstimate(cjtok(body), DEFAULT_OUTPUT_TOKENS, False)


def test_endpoint_without_version_prefix() -> None:
    assert estimate_row("/chat/completions", chat_body(max_tokens=5)) == estimate_row(CHAT, chat_body(max_tokens=5))


def test_malformed_bodies_do_not_raise() -> None:
    weird: list[Any] = [
        {"model": "m", "messages": "not a list"},
        {"model": "m", "messages": [1, "text", None, {"role": 5, "content": {"x": 1}}]},
        {
            "model": "m",
            "messages": [{"role": "user", "content": [3, "s", {"type": "text", "text": 9}, {"type": "odd"}]}],
        },
        {"model": "m"},
    ]
    for body in weird:
        est = estimate_row(CHAT, body)
        assert est.input_tokens >= 3
    assert estimate_row(EMBEDDINGS, {"model": "m", "input": {"weird": True}}).input_tokens == cjtok({"weird": True})
    assert estimate_row(COMPLETIONS, {"model": "m", "prompt": None}).input_tokens == 0
    assert estimate_row(CHAT, ["not", "a", "dict"]).input_tokens > 0  # type: ignore[arg-type]


# -- totals and cost ---------------------------------------------------------------------------


def test_estimate_totals_and_per_model() -> None:
    est = Estimate()
    est.add("gpt-4o-mini", RowEstimate(100, 50))
    est.add("gpt-4o-mini", RowEstimate(200, 50))
    est.add("o3", RowEstimate(10, 4096, capped=False))
    assert (est.rows, est.input_tokens, est.output_tokens, est.uncapped_rows) == (3, 310, 4196, 1)
    assert est.by_model == {"gpt-4o-mini": (2, 300, 100), "o3": (1, 10, 4096)}

    other = Estimate()
    other.add("o3", RowEstimate(5, 5))
    est.merge(other)
    assert est.by_model["o3"] == (2, 15, 4101) and est.rows == 4


def test_rows_with_long_prompts_are_priced_apart() -> None:
    """Per model, the rows over 200k prompt tokens pay the long-prompt rates and the rest the
    base ones; the same from the job store's sums (`from_totals`) as from row by row."""
    table = PriceTable.load()
    rows = [RowEstimate(150_000, 1_000), RowEstimate(250_000, 2_000), RowEstimate(1_000, 10)]
    est = Estimate()
    for row in rows:
        est.add("gemini-2.5-pro", row)
    est.add("gpt-4.1", RowEstimate(300_000, 5))  # no long-prompt rates: priced as usual
    assert est.long_by_model == {"gemini-2.5-pro": (1, 250_000, 2_000), "gpt-4.1": (1, 300_000, 5)}
    est.cost(table)
    pro = table.lookup("gemini-2.5-pro")
    assert pro is not None
    by_row = sum(cost(pro, r.input_tokens, r.output_tokens) for r in rows)
    assert est.model_costs["gemini-2.5-pro"][0] == pytest.approx(by_row)
    assert est.model_costs["gemini-2.5-pro"][0] > cost_at(pro.rates(batch=True), 401_000, 3_010)  # > all at base rates
    assert est.long_priced == {"gemini-2.5-pro"}
    text = "\n".join(est.summary_lines())
    assert "gemini-2.5-pro: 3 rows, 401,000 in, 3,010 out (1 with prompts over 200,000 tokens" in text
    assert "gpt-4.1: 1 row, 300,000 in, 5 out;" in text

    same = Estimate.from_totals(
        [("gemini-2.5-pro", 3, 401_000, 3_010, 0, 1, 250_000, 2_000), ("gpt-4.1", 1, 300_000, 5, 0, 1, 300_000, 5)]
    )
    same.cost(table)
    assert (same.cost_batch, same.cost_direct) == pytest.approx((est.cost_batch, est.cost_direct))


def test_estimate_cost_and_unpriced() -> None:
    table = PriceTable.load()
    est = Estimate()
    est.add("gpt-4o-mini-2024-07-18", RowEstimate(1_000_000, 1_000_000))
    est.add("gpt-4.1", RowEstimate(500_000, 250_000))
    est.add("mystery-model", RowEstimate(10, 10))
    est.cost(table)
    mini = 0.15 + 0.60
    gpt41 = 0.5 * 2.0 + 0.25 * 8.0
    assert est.cost_direct == pytest.approx(mini + gpt41)
    assert est.cost_batch == pytest.approx((mini + gpt41) / 2)
    assert est.model_costs["gpt-4.1"] == pytest.approx((gpt41 / 2, gpt41))
    assert est.unpriced_models == {"mystery-model"}
    assert est.prices_taken == table.taken

    # Pricing again (e.g. after --price-input/--price-output) replaces, never adds up.
    est.cost(table.with_override("mystery-model", input=1.0, output=1.0))
    assert est.unpriced_models == set()
    assert est.cost_direct == pytest.approx(mini + gpt41 + 20 / 1e6)


def test_estimate_cost_matches_cost_function() -> None:
    table = PriceTable.load()
    est = Estimate()
    rows = [estimate_row(CHAT, chat_body(max_tokens=40)) for _ in range(10)]
    for row in rows:
        est.add("gpt-4o-mini", row)
    est.cost(table)
    price = table.lookup("gpt-4o-mini")
    assert price is not None
    total_in = sum(r.input_tokens for r in rows)
    assert est.cost_batch == pytest.approx(cost(price, total_in, 400, batch=True))
    assert est.cost_direct == pytest.approx(cost(price, total_in, 400, batch=False))


def test_summary_lines() -> None:
    est = Estimate()
    est.add("gpt-4o", RowEstimate(1_000_000, 100_000))
    est.add("my-local-model", RowEstimate(1_000, 1_000, capped=False))
    unpriced = est.summary_lines()
    assert "2 rows" in unpriced[0] and "1,001,000 input tokens" in unpriced[0]
    assert not any("$" in line for line in unpriced)  # not priced yet

    est.cost(PriceTable.load())
    text = "\n".join(est.summary_lines())
    assert "gpt-4o: 1 row, 1,000,000 in, 100,000 out; batch $1.75 vs direct $3.50 (saves $1.75)" in text
    assert "batch $1.75 vs direct $3.50; batch saves $1.75 (50%)" in text
    assert "my-local-model: 1 row, 1,000 in, 1,000 out; UNPRICED" in text
    unpriced_line = next(line for line in est.summary_lines() if line.startswith("Unpriced"))
    assert "my-local-model" in unpriced_line
    assert "--price-file" in unpriced_line and "--price-input/--price-output" in unpriced_line
    assert any("1 of 2 rows set no output cap" in line for line in est.summary_lines())
    assert PriceTable.load().taken in text


def test_summary_small_amounts_are_not_shown_as_free() -> None:
    est = Estimate()
    est.add("gpt-4o-mini", RowEstimate(1000, 10))
    est.cost(PriceTable.load())
    assert "$0.0001" in "\n".join(est.summary_lines())


def test_echo_model_is_free() -> None:
    est = Estimate()
    est.add("echo", RowEstimate(10**9, 10**9))
    est.cost(PriceTable.load())
    assert (est.cost_batch, est.cost_direct, est.unpriced_models) == (0.0, 0.0, set())


def test_row_estimate_is_a_slotted_dataclass() -> None:
    row = RowEstimate(1, 2)
    assert not hasattr(row, "__dict__")
    assert json.loads(json.dumps([row.input_tokens, row.output_tokens, row.capped])) == [1, 2, True]
