"""The Vertex AI adapter: requests and results, the adapter against a Cloud Storage + Vertex HTTP
fake through google-genai and google-cloud-storage, and `llmbatch run --provider vertex` end to
end, a kill -9 included.

The fake (`tests/fakes/vertex.py`) is served on 127.0.0.1; both SDKs reach it through
`--base-url`, with a service account key file (GOOGLE_APPLICATION_CREDENTIALS) whose token
exchange goes to the fake too, so google-auth runs for real and nothing leaves the machine (the
metadata server is pointed at a closed port).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes._serve import serve_app
from fakes.vertex import LOCATION, PROJECT, FakeVertex, service_account_file, vertex_fake
from provider_cli import (
    CLI,
    Lifecycle,
    assert_echoed_but_row_5,
    assert_one_remote_per_chunk,
    check_killed_job,
    job_query,
    lifecycle,
    model_run_cmd,
    read_lines,
    run_live_tiny_job,
)

from conftest import chat_line, jsonl, kill_then_finish
from llmbatch._exceptions import ConfigError
from llmbatch.providers import RemoteStatus, create_provider
from llmbatch.providers._vertex import VertexBatchProvider, input_line, label_value, translate_line

MODEL = "gemini-2.5-flash"
CHAT = "/v1/chat/completions"
GCS = "gs://llmbatch-test/runs/a"
JOB = "job_0123456789abcdef"
TAG = f"{JOB}-c00001"
#: Nothing of the machine's Google setup; the metadata server at a closed port.
GOOGLE_ENV = {
    "GOOGLE_CLOUD_PROJECT": PROJECT,
    "GOOGLE_CLOUD_LOCATION": LOCATION,
    "NO_GCE_CHECK": "True",
    "GCE_METADATA_HOST": "127.0.0.1:9",
    "GCE_METADATA_IP": "127.0.0.1:9",
    "CLOUDSDK_CONFIG": "/nonexistent",
}


def _clean(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if not k.startswith(("GOOGLE_", "GCE_", "CLOUDSDK_", "LLMBATCH_VERTEX_"))}


@pytest.fixture(autouse=True)
def google_env(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("live"):
        return
    for k in list(os.environ):
        if k not in _clean(dict(os.environ)):
            monkeypatch.delenv(k)
    for k, v in GOOGLE_ENV.items():
        monkeypatch.setenv(k, v)


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, FakeVertex]]:
    app, fake = vertex_fake(end_after_polls=3)
    with serve_app(app) as url:
        key = service_account_file(tmp_path / "sa.json", url + "/token")
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
        yield url, fake


def provider(url: str, **options: Any) -> VertexBatchProvider:
    p = create_provider("vertex", base_url=url, gcs_uri=GCS, **options)
    assert isinstance(p, VertexBatchProvider)
    return p


# -- requests and results --------------------------------------------------------------------


def test_rows_become_vertex_lines_measured_as_sent_and_embeddings_are_refused() -> None:
    body = chat_line(1, "hi", model=MODEL, max_tokens=20, temperature=0.5)["body"]
    reasons, size = VertexBatchProvider.check_and_measure("row-1", CHAT, body)
    line = input_line("row-1", body)
    assert reasons == [] and size == len(line) + 1
    assert json.loads(line) == {
        "key": "row-1",
        "request": {
            "contents": [{"role": "user", "parts": [{"text": "hi"}]}],
            "generationConfig": {"maxOutputTokens": 20, "temperature": 0.5},
        },
    }
    (reason,) = VertexBatchProvider.check_request("/v1/embeddings", {"model": "text-embedding-005", "input": "x"})
    assert "cannot batch /v1/embeddings" in reason
    assert "logprobs" in VertexBatchProvider.check_request(CHAT, {**body, "logprobs": True})[0]
    assert label_value("Job_ABC.x") == "job_abc-x" and len(label_value("x" * 100)) == 63


def test_output_lines_become_chat_completions_and_errors() -> None:
    ok = {
        "key": "row-1", "status": "", "request": {"contents": []},
        "response": {"candidates": [{"content": {"parts": [{"text": "hi"}]}, "finishReason": "STOP"}],
                     "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 1, "thoughtsTokenCount": 2}},
    }  # fmt: skip
    line = translate_line("row-1", ok, model=MODEL, created=1)
    body = line["response"]["body"]
    assert line["custom_id"] == "row-1" and body["choices"][0]["message"]["content"] == "hi"
    assert body["usage"]["prompt_tokens"] == 5 and body["usage"]["completion_tokens"] == 3
    assert "request" not in line["native"]
    bad = translate_line(
        "row-2", {"status": "Bad Request: INVALID_ARGUMENT: nope", "request": {}}, model=MODEL, created=1
    )
    assert bad["response"]["status_code"] == 400 and "nope" in bad["response"]["body"]["error"]["message"]
    busy = translate_line("row-3", {"status": "RESOURCE_EXHAUSTED: quota", "request": {}}, model=MODEL, created=1)
    assert busy["response"]["status_code"] == 429
    odd = translate_line("row-4", {"status": "something went wrong"}, model=MODEL, created=1)
    assert odd["response"]["status_code"] == 500  # retryable: unknown is not a final refusal


def test_settings_are_required(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="LLMBATCH_VERTEX_GCS_URI"):
        create_provider("vertex")
    with pytest.raises(ConfigError, match="gs://bucket/prefix"):
        create_provider("vertex", gcs_uri="llmbatch-test/x")
    with pytest.raises(ConfigError, match="not --api-key"):
        create_provider("vertex", gcs_uri=GCS, api_key="k")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="GOOGLE_APPLICATION_CREDENTIALS"):
        create_provider("vertex", gcs_uri=GCS)
    service_account_file(tmp_path / "sa.json", "http://127.0.0.1:9/token")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "sa.json"))
    monkeypatch.setenv("LLMBATCH_VERTEX_GCS_URI", GCS + "/")
    monkeypatch.delenv("GOOGLE_CLOUD_LOCATION")
    p = create_provider("vertex")
    assert isinstance(p, VertexBatchProvider)
    assert (p.bucket, p.prefix, p.project, p.location) == ("llmbatch-test", "runs/a", PROJECT, "us-central1")
    asyncio.run(p.aclose())


# -- the adapter against the fake ------------------------------------------------------------


def test_job_lifecycle_results_and_lookups(served: tuple[str, FakeVertex], tmp_path: Path) -> None:
    url, fake = served
    rows = [chat_line(i, model=MODEL) for i in range(8)]
    rows[5] = chat_line(5, "refuse FAIL400", model=MODEL)
    chunk = tmp_path / f"{TAG}.jsonl"
    chunk.write_bytes(jsonl(rows))
    p = provider(url)

    async def scenario() -> Lifecycle:
        lc = await lifecycle(p, TAG, JOB, chunk, tmp_path / "out.jsonl")
        await p.delete_file(lc.file_id)  # gone already: no error
        return lc

    try:
        lc = asyncio.run(scenario())
    finally:
        asyncio.run(p.aclose())
    b = lc.batch
    assert lc.file_id == f"{GCS}/{TAG}/input.jsonl"
    assert lc.found is not None and lc.found.id == b.id
    assert b.id.startswith(f"projects/{PROJECT}/locations/{LOCATION}/batchPredictionJobs/")
    assert lc.statuses == [
        RemoteStatus.VALIDATING,
        RemoteStatus.IN_PROGRESS,
        RemoteStatus.IN_PROGRESS,
        RemoteStatus.COMPLETED,
    ]
    (job,) = fake.jobs.values()
    assert (job.display_name, job.model) == (TAG, f"publishers/google/models/{MODEL}")
    assert job.labels == {"llmbatch_chunk": TAG, "llmbatch_job": JOB}
    assert job.output_prefix == f"{GCS}/{TAG}/output"
    assert (b.total, b.completed, b.failed) == (8, 7, 1)
    assert_echoed_but_row_5(read_lines(tmp_path / "out.jsonl"), rows, prompt_tokens=3)
    assert [(r.id, r.metadata[TAG_KEY_NAME]) for r in lc.listed] == [(b.id, TAG)]
    assert ("llmbatch-test", f"runs/a/{TAG}/input.jsonl") not in fake.objects
    # Every call went to v1 on the fake with the token google-auth got from it.
    assert any(
        path.startswith(f"/v1/projects/{PROJECT}/locations/{LOCATION}/batchPredictionJobs") for _m, path in fake.calls
    )
    assert ("POST", "/token") in fake.calls


TAG_KEY_NAME = "llmbatch_chunk"


def test_results_without_their_key_are_matched_by_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Were Vertex to drop the key field, each line is matched by its echoed request; two identical
    requests share their two keys."""
    app, fake = vertex_fake(end_after_polls=1, keep_keys=False)
    rows = [chat_line(i, model=MODEL) for i in range(6)] + [chat_line("twin-a", "same"), chat_line("twin-b", "same")]
    rows = [{**r, "body": {**r["body"], "model": MODEL}} for r in rows]
    chunk = tmp_path / f"{TAG}.jsonl"
    chunk.write_bytes(jsonl(rows))
    with serve_app(app) as url:
        monkeypatch.setenv(
            "GOOGLE_APPLICATION_CREDENTIALS", str(service_account_file(tmp_path / "sa.json", url + "/token"))
        )
        p = provider(url)

        async def scenario() -> None:
            b = await p.create_batch(TAG, JOB, await p.upload(TAG, chunk), CHAT)
            b = await p.get_batch(b.id)
            assert b.status is RemoteStatus.COMPLETED and b.output_file_id
            await p.download(b.output_file_id, tmp_path / "out.jsonl")

        try:
            asyncio.run(scenario())
        finally:
            asyncio.run(p.aclose())
    out = read_lines(tmp_path / "out.jsonl")
    assert sorted(r["custom_id"] for r in out) == sorted(r["custom_id"] for r in rows)
    for rec in out:
        text = rec["response"]["body"]["choices"][0]["message"]["content"]
        assert text == ("same" if rec["custom_id"].startswith("twin") else f"hello {rec['custom_id'].split('-')[1]}")


def test_cancel_failure_and_expiry(served: tuple[str, FakeVertex], tmp_path: Path) -> None:
    url, fake = served
    chunk = tmp_path / "chunk.jsonl"
    p = provider(url)

    async def run(tag: str, n: int = 6, cancel: bool = False, corrupt: bool = False) -> Any:
        chunk.write_bytes(jsonl([chat_line(i, model=MODEL) for i in range(n)]))
        file_id = await p.upload(tag, chunk)
        if corrupt:
            fake.objects[("llmbatch-test", f"runs/a/{tag}/input.jsonl")].data = b"{not json\n"
        b = await p.create_batch(tag, JOB, file_id, CHAT)
        if cancel:
            assert (await p.cancel(b.id)).status is RemoteStatus.CANCELLING
        for _ in range(10):
            b = await p.get_batch(b.id)
            if b.status.terminal:
                return b
        raise AssertionError("never ended")

    async def scenario() -> tuple[Any, ...]:
        failed = await run(f"{JOB}-c00001", corrupt=True)
        cancelled = await run(f"{JOB}-c00002", cancel=True)
        await p.download(cancelled.output_file_id, tmp_path / "cancelled.jsonl")
        fake.expire_next = True
        expired = await run(f"{JOB}-c00003")
        await p.download(expired.output_file_id, tmp_path / "expired.jsonl")
        with pytest.raises(Exception, match="--completion-window"):
            await p.create_batch(f"{JOB}-c00004", JOB, await p.upload(f"{JOB}-c00004", chunk), CHAT, "48h")
        return failed, cancelled, expired

    try:
        failed, cancelled, expired = asyncio.run(scenario())
    finally:
        asyncio.run(p.aclose())
    assert failed.status is RemoteStatus.FAILED and failed.output_file_id is None
    assert "Failed to read the input" in failed.errors[0]["message"]
    assert cancelled.status is RemoteStatus.CANCELLED and len(read_lines(tmp_path / "cancelled.jsonl")) == 3
    assert expired.status is RemoteStatus.EXPIRED and len(read_lines(tmp_path / "expired.jsonl")) == 3
    assert (expired.total, expired.completed) == (6, 3)


def test_direct_calls_go_to_vertex_generate_content(served: tuple[str, FakeVertex]) -> None:
    url, fake = served
    p = provider(url)
    try:
        status, body = asyncio.run(p.direct(CHAT, chat_line(1, "one two three", model=MODEL, max_tokens=2)["body"]))
    finally:
        asyncio.run(p.aclose())
    assert status == 200 and body["choices"][0]["message"]["content"] == "one two"
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["prompt_tokens"] == 4
    assert fake.generated[0]["generationConfig"]["maxOutputTokens"] == 2
    assert any(path.endswith(f"/publishers/google/models/{MODEL}:generateContent") for _m, path in fake.calls)


# -- llmbatch run end to end ---------------------------------------------------------------


def cli_env(tmp_path: Path, url: str) -> dict[str, str]:
    env = _clean(dict(os.environ))
    key = tmp_path / "sa.json"
    if not key.exists():
        service_account_file(key, url + "/token")
    env.update(GOOGLE_ENV, LLMBATCH_HOME=str(tmp_path / "home"), NO_PROXY="127.0.0.1,localhost",
               GOOGLE_APPLICATION_CREDENTIALS=str(key), LLMBATCH_VERTEX_GCS_URI=GCS)  # fmt: skip
    return env


def run_cmd(inp: Path, url: str, *extra: str) -> list[str]:
    return model_run_cmd(inp, url, f"vertex/{MODEL}", *extra)


def assert_one_job_per_chunk(tmp_path: Path, fake: FakeVertex) -> None:
    """Each chunk has exactly one job on the fake, named and labelled for it, holding its rows."""
    assert_one_remote_per_chunk(tmp_path, (j.display_name for j in fake.jobs.values()))
    for tag, batch_id, n in job_query(tmp_path, "SELECT tag, batch_id, rows FROM chunks"):
        job = fake.jobs[batch_id.rsplit("/", 1)[1]]
        assert job.labels["llmbatch_chunk"] == tag and len(job.keys) == n, tag


def test_cli_runs_a_job_every_row_once_in_order(tmp_path: Path) -> None:
    app, fake = vertex_fake(end_after_polls=2)
    rows = [chat_line(i) for i in range(130)]  # rows name gpt-4o-mini: --model vertex/... replaces it
    rows[17] = chat_line(17, "refuse me FAIL400")
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(jsonl(rows))
    with serve_app(app) as url:
        # The Cloud Storage location as a flag this time (the environment's is removed).
        env = {k: v for k, v in cli_env(tmp_path, url).items() if k != "LLMBATCH_VERTEX_GCS_URI"}
        cmd = run_cmd(inp, url, "--batch-size", "50", "--gcs-uri", GCS + "/flags")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr  # row 17 failed
    out = read_lines(tmp_path / "input.results.jsonl")
    assert [r["custom_id"] for r in out] == [r["custom_id"] for r in rows]
    for i, rec in enumerate(out):
        if i != 17:
            assert rec["response"]["body"]["choices"][0]["message"]["content"] == f"hello {i}", rec
    (err,) = read_lines(tmp_path / "input.errors.jsonl")
    assert err["custom_id"] == "row-17" and err["response"]["status_code"] == 400
    assert len(fake.jobs) == 3 and {j.model for j in fake.jobs.values()} == {f"publishers/google/models/{MODEL}"}
    assert all(j.input_uri.startswith(GCS + "/flags/job_") for j in fake.jobs.values())
    assert_one_job_per_chunk(tmp_path, fake)
    inputs = [k for (_b, k) in fake.objects if k.endswith("/input.jsonl")]
    assert inputs == [], "collected chunks' inputs are deleted"


def test_cli_refuses_what_vertex_cannot_run_at_ingest(tmp_path: Path) -> None:
    rows = [chat_line(0, model="vertex/" + MODEL), chat_line(1, model="vertex/" + MODEL, logprobs=True)]
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(jsonl(rows))
    cmd = [*CLI, "run", str(inp), "--provider", "vertex", "--base-url", "http://127.0.0.1:9"]
    proc = subprocess.run(cmd, env=cli_env(tmp_path, "http://127.0.0.1:9"), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "input.jsonl:2" in proc.stderr and "logprobs" in proc.stderr
    assert "input.jsonl:1" not in proc.stderr


def test_sigkill_at_random_moments_creates_no_second_job(tmp_path: Path) -> None:
    """Kills `llmbatch run` right after the fake made a job (before the client can record it) and at
    random moments; afterwards every row is there once, in order, and each chunk has one job."""
    app, fake = vertex_fake(end_after_seconds=0.3, end_after_polls=None, create_latency=0.1)
    n = 300
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(jsonl([chat_line(i) for i in range(n)]))
    with serve_app(app) as url:
        cmd = run_cmd(inp, url, "--batch-size", "30", "--max-in-flight", "3")
        kill_then_finish(cmd, cli_env(tmp_path, url), attempts=5, seed=11, fake=fake)
    check_killed_job(tmp_path, n)
    assert_one_job_per_chunk(tmp_path, fake)
    assert any("filter=labels.llmbatch_chunk" in path for _m, path in fake.calls)


# -- a real job --------------------------------------------------------------------------------


@pytest.mark.live
def test_live_tiny_job(tmp_path: Path) -> None:
    """A real Vertex batch job of three rows (a fraction of a cent on Gemini Flash). Needs Google
    credentials (ADC), GOOGLE_CLOUD_PROJECT and LLMBATCH_VERTEX_GCS_URI (a bucket in the job's
    region); queued jobs can take hours."""
    for k in ("LLMBATCH_VERTEX_GCS_URI", "GOOGLE_CLOUD_PROJECT"):
        if not os.environ.get(k):
            pytest.skip(f"{k} is not set")
    model = os.environ.get("LLMBATCH_LIVE_VERTEX_MODEL", "gemini-2.5-flash-lite")
    run_live_tiny_job("vertex", tmp_path, f"vertex/{model}", 3, 30, dict(os.environ), 24 * 3600)
