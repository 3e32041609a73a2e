"""kill -9 the server while batches run: after a restart every batch finishes, nothing is lost,
and rows already finished are not run again."""

from __future__ import annotations

import random
import re
import time

import httpx
import pytest

from conftest import TERMINAL, chat_line, jsonl, read_jsonl, upload, wait_batch


def upstream_chat_requests(upstream) -> int:  # type: ignore[no-untyped-def]
    """How many chat requests the upstream echo server has answered (its /metrics)."""
    text = httpx.get(f"http://127.0.0.1:{upstream.port}/metrics").text
    return sum(
        int(n)
        for n in re.findall(
            # prometheus_client writes labels in alphabetical order: endpoint, source, status
            r'llmbatch_requests_total\{endpoint="/v1/chat/completions",source="direct",[^}]*\} (\d+)',
            text,
        )
    )


@pytest.mark.slow
def test_kill_9_during_batch_resumes_without_loss_or_rerun(server_factory) -> None:  # type: ignore[no-untyped-def]
    rows, concurrency, kills = 600, 8, 3
    upstream = server_factory("--echo-latency", "0.01")
    batch_server = server_factory(
        "--engine", "openai", "--upstream-url", upstream.base_url, "--max-concurrency", str(concurrency)
    )
    client = batch_server.client()
    f = upload(client, jsonl([chat_line(i) for i in range(rows)]))
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")

    rng = random.Random(7)
    progress = []
    for k in range(kills):
        # Kill once some more rows have finished, at a random moment after that.
        target = (k + 1) * rows // (kills + 2)
        deadline = time.monotonic() + 60
        while client.batches.retrieve(batch.id).request_counts.completed < target:
            assert time.monotonic() < deadline, batch_server.log()
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.1))
        batch_server.kill()
        progress.append(target)
        batch_server.start()
        client = batch_server.client()

    final = wait_batch(client, batch.id, timeout=120)
    assert final.status == "completed", final
    out = read_jsonl(client, final.output_file_id)
    errors = read_jsonl(client, final.error_file_id)
    assert errors == []
    assert [r["custom_id"] for r in out] == [f"row-{i}" for i in range(rows)]  # each row once, in input order
    assert all(r["response"]["body"]["choices"][0]["message"]["content"] == f"hello {i}" for i, r in enumerate(out))
    assert final.request_counts.total == final.request_counts.completed == rows

    # Only rows in flight at each kill may have run twice: at most `concurrency` per kill.
    answered = upstream_chat_requests(upstream)
    assert rows <= answered <= rows + kills * concurrency, (answered, progress)


@pytest.mark.slow
def test_kill_9_while_validating_and_queued(server_factory) -> None:  # type: ignore[no-untyped-def]
    """Batches that were validating or waiting for a slot when the server died still finish."""
    srv = server_factory("--max-active-batches", "1", "--echo-latency", "0.005", "--max-concurrency", "4")
    client = srv.client()
    ids = []
    for n in range(3):
        f = upload(client, jsonl([chat_line(f"b{n}-{i}") for i in range(100)]))
        ids.append(
            client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h").id
        )
    srv.kill()
    srv.start()
    client = srv.client()
    for batch_id in ids:
        final = wait_batch(client, batch_id, timeout=60)
        assert final.status == "completed", final
        out = read_jsonl(client, final.output_file_id)
        assert len(out) == 100 and len({r["custom_id"] for r in out}) == 100


def test_startup_is_fast_and_restart_keeps_finished_batches(server_factory) -> None:  # type: ignore[no-untyped-def]
    srv = server_factory(start=False)
    # A guard against start-up doing heavy work (loading a model, reading every file), not the
    # figure itself: tests run in parallel, so a tight bound here would measure the machine's load.
    assert srv.start() < 10.0, "the server must be ready to serve within seconds"
    client = srv.client()
    f = upload(client, jsonl([chat_line(i) for i in range(10)]))
    b = wait_batch(
        client, client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h").id
    )
    srv.stop()
    srv.start()
    again = srv.client().batches.retrieve(b.id)
    assert again.status == "completed" and again.output_file_id == b.output_file_id
    assert len(read_jsonl(srv.client(), again.output_file_id)) == 10
    assert again.status in TERMINAL


@pytest.mark.slow
def test_kill_9_while_cancelling_still_ends_cancelled(server_factory) -> None:  # type: ignore[no-untyped-def]
    srv = server_factory("--echo-latency", "0.05", "--max-concurrency", "2")
    client = srv.client()
    f = upload(client, jsonl([chat_line(i) for i in range(200)]))
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    wait_batch(client, b.id, until=("in_progress",))
    while client.batches.retrieve(b.id).request_counts.completed < 4:
        time.sleep(0.02)
    assert client.batches.cancel(b.id).status in ("cancelling", "cancelled")
    srv.kill()
    srv.start()
    client = srv.client()
    final = wait_batch(client, b.id)
    assert final.status == "cancelled" and final.cancelled_at is not None
    out, errors = read_jsonl(client, final.output_file_id), read_jsonl(client, final.error_file_id)
    assert len(out) >= 4
    assert sorted(r["custom_id"] for r in out + errors) == sorted(f"row-{i}" for i in range(200))
    assert all(e["error"]["code"] == "batch_cancelled" for e in errors)
