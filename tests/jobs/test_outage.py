"""Outages longer than the SDK's own retries, and answers lost after the provider acted.

A flaky proxy between `llmbatch run` and a real `llmbatch serve` refuses uploads and batch
creations for a while (the provider never saw them) and loses the answers of others (the
provider acted, the client never heard). The run must ride the outage out, find what the
lost calls created instead of creating it again, and finish with one upload and one batch
per chunk.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from fakes._serve import serve_app
from fakes.flaky_proxy import make_proxy
from test_run_cli import POLL, assert_all_echoed, llmbatch, read_lines, remote_batches, write_input

from conftest import chat_line


def test_outage_and_lost_answers_on_upload_and_create(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = server_factory()
    app, proxy = make_proxy(f"http://127.0.0.1:{server.port}")
    # More failures in a row than the SDK retries (5), so the runner's own retry path is taken.
    proxy.plans[("POST", "/v1/files")] = ["lose"] + ["fail"] * 7 + ["pass", "lose"]
    proxy.plans[("POST", "/v1/batches")] = ["fail"] * 7 + ["lose", "pass", "lose"]
    rows = [chat_line(i, f"outage {i}") for i in range(90)]
    inp = write_input(tmp_path, rows)
    with serve_app(app) as root:
        proc = llmbatch(
            tmp_path, "run", str(inp), "--provider", "openai", "--base-url", f"{root}/v1", *POLL, "--keep-uploads",
            "--batch-size", "30", "--max-in-flight", "1",
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "will try again" in proc.stderr
    assert_all_echoed(read_lines(tmp_path / "input.results.jsonl"), rows)

    seen = Counter(outcome for method, path, outcome in proxy.log if method == "POST")
    assert seen["fail"] == 14 and seen["lose"] == 4  # every injected fault was hit
    # One batch per chunk, and every lost upload was found again rather than sent twice.
    batches = remote_batches(server)
    tags = [b.metadata["llmbatch_chunk"] for b in batches]
    assert len(tags) == 3 and len(set(tags)) == 3
    with server.client() as c:
        uploads = [f for f in c.files.list(purpose="batch")]
    assert len(uploads) == 3
    assert sorted(f.id for f in uploads) == sorted(b.input_file_id for b in batches)
