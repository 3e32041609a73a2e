"""/metrics on a server with keys: a key is needed, and each key sees only its own batches;
/health stays public and says nothing about tenants."""

from __future__ import annotations

import re

from conftest import chat_line, jsonl, upload, wait_batch

A, B = "sk-tenant-a", "sk-tenant-b"


def batch_gauge(text: str) -> dict[str, int]:
    return {m[1]: int(m[2]) for m in re.finditer(r'llmbatch_batches\{status="(\w+)"\} (\d+)', text)}


def test_metrics_need_a_key_and_show_only_the_callers_batches(server_factory) -> None:  # type: ignore[no-untyped-def]
    srv = server_factory(keys=[A, B])
    client = srv.client(api_key=A)
    for _ in range(2):
        f = upload(client, jsonl([chat_line(1)]))
        b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert wait_batch(client, b.id).status == "completed"
    with srv.http(api_key="wrong") as http:
        http.headers.pop("Authorization")
        r = http.get("/metrics")
        assert r.status_code == 401 and "llmbatch_batches" not in r.text
        assert http.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        health = http.get("/health")
        assert health.status_code == 200
        assert set(health.json()) == {"status", "engine", "executor", "version", "uptime_seconds", "disk"}
    with srv.http(api_key=A) as http:
        assert batch_gauge(http.get("/metrics").text) == {"completed": 2}
    with srv.http(api_key=B) as http:
        r = http.get("/metrics")
        assert r.status_code == 200
        assert batch_gauge(r.text) == {}
        assert "llmbatch_requests_total" in r.text  # process-wide load, no tenant named
