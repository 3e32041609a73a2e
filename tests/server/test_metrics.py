"""/metrics through prometheus_client: without a key only process-level series; with a key the
server's load and the caller's own batches, never another key's; /health stays public."""

from __future__ import annotations

import re

from conftest import chat_line, jsonl, upload, wait_batch

A, B = "sk-tenant-a", "sk-tenant-b"


def series(text: str, name: str) -> dict[str, float]:
    """The samples of one metric: labels as written -> value."""
    return {m[1]: float(m[2]) for m in re.finditer(rf"^{name}\{{(.*)\}} (\S+)$", text, re.M)}


def test_metrics_show_process_series_to_all_and_batches_only_to_their_key(server_factory) -> None:  # type: ignore[no-untyped-def]
    srv = server_factory(keys=[A, B])
    client = srv.client(api_key=A)
    for _ in range(2):
        f = upload(client, jsonl([chat_line(1), chat_line(2)]))
        b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert wait_batch(client, b.id).status == "completed"
    with srv.http(api_key="wrong") as http:
        http.headers.pop("Authorization")
        r = http.get("/metrics")  # no key: what says nothing about any tenant or the load
        assert r.status_code == 200, r.text
        assert "process_resident_memory_bytes" in r.text and 'llmbatch_build_info{engine="echo"' in r.text
        for private in ("llmbatch_batches", "llmbatch_requests_total", "llmbatch_batch_", "llmbatch_queue_rows"):
            assert private not in r.text
        assert http.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        health = http.get("/health")
        assert health.status_code == 200
        assert set(health.json()) == {"status", "engine", "executor", "version", "uptime_seconds", "disk"}
    with srv.http(api_key=A) as http:
        text = http.get("/metrics").text
        assert series(text, "llmbatch_batches") == {'status="completed"': 2}
        moves = series(text, "llmbatch_batch_transitions_total")
        assert moves['from_status="none",to_status="validating"'] == 2
        assert moves['from_status="finalizing",to_status="completed"'] == 2
        assert series(text, "llmbatch_batch_rows_total") == {'outcome="completed"': 4, 'outcome="failed"': 0}
        assert series(text, "llmbatch_batch_tokens_total")['direction="input"'] > 0
        # The load, process-wide: engine calls and their latency, HTTP requests by route template.
        # (prometheus_client writes labels in alphabetical order)
        assert series(text, "llmbatch_requests_total") == {
            'endpoint="/v1/chat/completions",source="batch",status="200"': 4
        }
        latency = series(text, "llmbatch_engine_latency_seconds_count")
        assert latency == {'endpoint="/v1/chat/completions",source="batch"': 4}
        http_requests = series(text, "llmbatch_http_requests_total")
        assert http_requests['method="POST",route="/v1/batches",status="200"'] == 2
        assert any('route="/v1/batches/{batch_id}"' in k for k in http_requests)  # never a raw batch id
        assert "batch_" not in "".join(http_requests).replace("{batch_id}", "")
    with srv.http(api_key=B) as http:
        text = http.get("/metrics").text
        assert series(text, "llmbatch_batches") == {}
        assert series(text, "llmbatch_batch_rows_total") == {'outcome="completed"': 0, 'outcome="failed"': 0}
        assert series(text, "llmbatch_batch_transitions_total") == {}
        assert "llmbatch_requests_total" in text  # process-wide load, no tenant named
