"""Errors stay small whatever the caller sends: a batch embeds a short list of its validation
errors (with the count of the rest), and user strings echoed in messages are clipped."""

from __future__ import annotations

import json

import openai

from conftest import chat_line, jsonl, upload, wait_batch

CHAT = "/v1/chat/completions"
BIG = 20_000


def test_a_file_of_huge_distinct_models_gives_a_small_batch_object(server) -> None:  # type: ignore[no-untyped-def]
    client: openai.OpenAI = server.client()
    rows = [chat_line(i, model=f"m{i}-" + "x" * BIG) for i in range(60)]
    f = upload(client, jsonl(rows))
    b = wait_batch(client, client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h").id)
    assert b.status == "failed"
    with server.http() as http:
        one = http.get(f"/v1/batches/{b.id}")
        listed = http.get("/v1/batches", params={"limit": 100})
    assert one.status_code == 200 and listed.status_code == 200
    assert len(one.content) < 20_000, len(one.content)
    data = one.json()["errors"]["data"]
    assert len(data) <= 21
    mismatched = [e for e in data if e["code"] == "mismatched_model"]
    assert mismatched and all(len(e["message"]) < 1000 for e in mismatched)
    assert f"{len('m1-') + BIG} characters" in mismatched[0]["message"]  # says how long the name was
    # The rest are counted, not listed: 59 mismatched rows in all.
    assert data[-1]["code"] == "too_many_errors"
    assert data[-1]["message"].startswith(f"{59 - len(mismatched)} more errors")
    assert len(listed.content) < 100 * 20_000


def test_long_custom_id_and_url_are_clipped(client: openai.OpenAI) -> None:
    row = chat_line("c" * BIG)
    row["url"] = "/v1/" + "u" * BIG
    row["method"] = "P" * BIG
    f = upload(client, jsonl([row, row]))
    b = wait_batch(client, client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h").id)
    assert b.status == "failed" and b.errors is not None
    codes = {e.code for e in b.errors.data}
    assert {"duplicate_custom_id", "mismatched_url", "invalid_method"} <= codes
    assert all(len(e.message or "") < 1000 for e in b.errors.data), [len(e.message or "") for e in b.errors.data]


def test_404_for_an_absurdly_long_id_does_not_echo_it(server) -> None:  # type: ignore[no-untyped-def]
    long_id = "batch_" + "z" * 6000
    with server.http() as http:
        for path in (f"/v1/batches/{long_id}", f"/v1/files/{long_id}", f"/v1/models/{long_id}", f"/v1/nope/{long_id}"):
            r = http.get(path)
            assert r.status_code == 404, (path[:20], r.status_code)
            message = r.json()["error"]["message"]
            assert len(message) < 500, (path[:20], len(message))
            assert "characters" in message
        r = http.post("/v1/batches", json={"input_file_id": long_id, "endpoint": CHAT, "completion_window": "24h"})
        assert r.status_code == 404 and len(r.json()["error"]["message"]) < 500
        r = http.post("/v1/batches", json={"input_file_id": "f", "endpoint": "e" * BIG, "completion_window": "24h"})
        assert r.status_code == 400 and len(r.json()["error"]["message"]) < 1000
        r = http.post(CHAT, json={"model": "", "messages": [{"role": "user", "content": "hi"}]})
        assert len(json.dumps(r.json())) < 2000
