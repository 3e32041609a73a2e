"""The `openai` engine inside a real batch server, forwarding to a second llmbatch server
running the echo engine as its upstream."""

from __future__ import annotations

import json

from conftest import chat_line, read_jsonl, run_batch


def test_batch_through_forwarding_engine(server_factory) -> None:  # type: ignore[no-untyped-def]
    upstream = server_factory("--echo-latency", "0.01")
    srv = server_factory("--engine", "openai", "--upstream-url", upstream.base_url, "--max-concurrency", "16")
    client = srv.client()
    final = run_batch(client, [chat_line(i) for i in range(120)])
    assert final.status == "completed"
    out = read_jsonl(client, final.output_file_id)
    assert [r["custom_id"] for r in out] == [f"row-{i}" for i in range(120)]
    for i, r in enumerate(out):
        assert r["response"]["status_code"] == 200
        assert r["response"]["body"]["choices"][0]["message"]["content"] == f"hello {i}"
    assert final.usage.input_tokens > 0 and final.usage.output_tokens > 0


def test_upstream_4xx_becomes_error_line_with_upstream_status_and_body(server_factory) -> None:  # type: ignore[no-untyped-def]
    upstream = server_factory()
    srv = server_factory("--engine", "openai", "--upstream-url", upstream.base_url)
    client = srv.client()
    bad = {"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "gpt-4o-mini"}}
    final = run_batch(client, [chat_line(0), bad, chat_line(2)])
    assert final.status == "completed"
    assert (final.request_counts.completed, final.request_counts.failed) == (2, 1)
    (err,) = read_jsonl(client, final.error_file_id)
    assert err["custom_id"] == "bad"
    assert err["response"]["status_code"] == 400
    assert err["response"]["body"]["error"]["param"] == "messages"  # the upstream's own error body


def test_upstream_5xx_retried_until_success(server_factory) -> None:  # type: ignore[no-untyped-def]
    upstream = server_factory("--echo-fail-rate", "0.3")
    srv = server_factory("--engine", "openai", "--upstream-url", upstream.base_url)
    client = srv.client()
    final = run_batch(client, [chat_line(i) for i in range(30)])
    assert final.status == "completed"
    assert final.request_counts.completed == 30, read_jsonl(client, final.error_file_id)
    metrics = srv.http().get("/metrics").text  # the batch server saw only successes
    assert 'status="200"} 30' in metrics
    upstream_metrics = upstream.http().get("/metrics").text
    assert 'status="500"}' in upstream_metrics  # failures did happen upstream, and were retried


def test_direct_api_through_forwarding_engine(server_factory) -> None:  # type: ignore[no-untyped-def]
    upstream = server_factory()
    srv = server_factory("--engine", "openai", "--upstream-url", upstream.base_url)
    client = srv.client()
    reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "ping"}])
    assert reply.choices[0].message.content == "ping"
    assert [m.id for m in client.models.list()] == ["echo"]
    emb = client.embeddings.create(model="m", input=["a", "b"])
    assert len(emb.data) == 2
    raw = srv.http().post("/v1/chat/completions", content=json.dumps({"model": "m"})).json()
    assert raw["error"]["param"] == "messages"


def test_unreachable_upstream_fails_rows_not_batch(server_factory) -> None:  # type: ignore[no-untyped-def]
    from conftest import free_port

    # One retry, not the default five: backing off through all five is ~8-15 s of waiting.
    url = f"http://127.0.0.1:{free_port()}/v1"
    srv = server_factory(
        "--engine", "openai", "--upstream-url", url, "--upstream-api-key", "k", "--upstream-max-retries", "1"
    )
    client = srv.client()
    final = run_batch(client, [chat_line(i) for i in range(3)])
    assert final.status == "completed"
    errs = read_jsonl(client, final.error_file_id)
    assert len(errs) == 3 and all(e["response"]["status_code"] == 502 for e in errs)
    assert all("unreachable after 2 attempts" in e["response"]["body"]["error"]["message"] for e in errs), errs
