"""The Bedrock adapter: translation, the adapter against an S3 + Bedrock HTTP fake through boto3,
and `llmbatch run --provider bedrock` end to end, a kill -9 included.

The fake (`tests/fakes/bedrock.py`) is served on 127.0.0.1 by uvicorn; boto3 reaches it with
`endpoint_url` (`--base-url`) and fake static credentials, so nothing leaves the machine.
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
from fakes.bedrock import ROLE_ARN, FakeBedrock, bedrock_fake
from provider_cli import (
    CLI,
    assert_echoed_but_row_5,
    assert_one_remote_per_chunk,
    check_killed_job,
    chunk_sizes,
    job_query,
    lifecycle,
    model_run_cmd,
    read_lines,
    run_live_tiny_job,
)

from conftest import chat_line, jsonl, kill_then_finish
from llmbatch._exceptions import ConfigError
from llmbatch.pricing import PriceTable
from llmbatch.providers import RemoteStatus, create_provider
from llmbatch.providers._bedrock import BedrockBatchProvider, job_name, openai_line, record_line, tag_of_job_name
from llmbatch.providers._bedrock_models import model_input

MODEL = "anthropic.claude-3-haiku-20240307-v1:0"
LLAMA = "meta.llama3-70b-instruct-v1:0"
MISTRAL = "mistral.mistral-large-2402-v1:0"
NOVA = "us.amazon.nova-lite-v1:0"
CHAT = "/v1/chat/completions"
S3 = "s3://llmbatch-test/runs/a"
TAG = "job_0123456789abcdef-c00001"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIDLLMBATCHTEST",
    "AWS_SECRET_ACCESS_KEY": "not-a-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/nonexistent",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
}


@pytest.fixture(autouse=True)
def aws_env(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake static credentials, and nothing of the machine's AWS setup (the live test keeps it)."""
    if request.node.get_closest_marker("live"):
        return
    for k in list(os.environ):
        if k.startswith(("AWS_", "LLMBATCH_BEDROCK_")):
            monkeypatch.delenv(k)
    for k, v in AWS_ENV.items():
        monkeypatch.setenv(k, v)


# -- translation ---------------------------------------------------------------------------


def test_claude_rows_become_invoke_model_bodies() -> None:
    row = chat_line(1, "hi", model=MODEL, max_tokens=20, temperature=0.5)["body"]
    reasons, size = BedrockBatchProvider.check_and_measure("row-1", CHAT, row)
    assert reasons == [] and size is not None
    line = record_line("row-1", row)
    assert size == len(line) + 1
    rec = json.loads(line)
    assert rec["recordId"] == "row-1"
    assert rec["modelInput"] == {
        "anthropic_version": "bedrock-2023-05-31",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "max_tokens": 20,
        "temperature": 0.5,
    }
    assert "n=2" in BedrockBatchProvider.check_request(CHAT, {**row, "n": 2})[0]
    assert BedrockBatchProvider.check_request("/v1/embeddings", row)
    # Inference profiles (a region prefix) are Claude too.
    assert BedrockBatchProvider.check_request(CHAT, {**row, "model": "us." + MODEL}) == []


# AWS's documented bodies (Bedrock user guide, model parameters pages; Meta's Llama 3 model card
# for the chat template), written out here rather than made by the code under test.
LLAMA_DOC_PROMPT = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful AI assistant<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat can you help me with?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
MISTRAL_DOC_PROMPT = (
    "<s>[INST] What is your favourite condiment? [/INST] Well, I'm quite partial to a good squeeze of fresh lemon "
    "juice. It adds just the right amount of zesty flavour to whatever I'm cooking up in the kitchen!</s> "
    "[INST] Do you have mayonnaise recipes? [/INST]"
)


def test_llama_mistral_and_nova_rows_take_their_documented_shapes() -> None:
    llama = {"model": LLAMA, "max_tokens": 512, "temperature": 0.5, "top_p": 0.9, "messages": [
        {"role": "system", "content": "You are a helpful AI assistant"},
        {"role": "user", "content": [{"type": "text", "text": "What can you help me with?"}]}]}  # fmt: skip
    assert model_input(LLAMA, llama) == {
        "prompt": LLAMA_DOC_PROMPT, "max_gen_len": 512, "temperature": 0.5, "top_p": 0.9}  # fmt: skip
    answer = "Well, I'm quite partial to a good squeeze of fresh lemon juice. It adds just the right amount of zesty flavour to whatever I'm cooking up in the kitchen!"  # noqa: E501
    mistral = {"model": MISTRAL, "max_completion_tokens": 400, "stop": ["###"], "messages": [
        {"role": "user", "content": "What is your favourite condiment?"},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "Do you have mayonnaise recipes?"}]}  # fmt: skip
    assert model_input(MISTRAL, mistral) == {"prompt": MISTRAL_DOC_PROMPT, "max_tokens": 400, "stop": ["###"]}
    nova = {"model": NOVA, "max_tokens": 500, "top_p": 0.9, "temperature": 0.7, "stop": "END", "messages": [
        {"role": "system", "content": "Act as a creative writing assistant."},
        {"role": "user", "content": "Write a short story about dragons."}]}  # fmt: skip
    assert model_input(NOVA, nova) == {
        "schemaVersion": "messages-v1",
        "system": [{"text": "Act as a creative writing assistant."}],
        "messages": [{"role": "user", "content": [{"text": "Write a short story about dragons."}]}],
        "inferenceConfig": {"maxTokens": 500, "topP": 0.9, "temperature": 0.7, "stopSequences": ["END"]},
    }


def test_untranslatable_rows_are_refused_with_the_reason() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    cases = [
        ({"model": "cohere.command-r-v1:0", "messages": [{"role": "user", "content": "x"}]}, "cohere.command-r"),
        ({"model": LLAMA, "messages": [{"role": "user", "content": "x"}], "tools": [tool]}, "tool calling"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [tool]}, "tool calling"),
        ({"model": NOVA, "messages": [{"role": "user", "content": [image]}]}, "text only"),
        ({"model": MISTRAL, "messages": [{"role": "user", "content": "x"}], "n": 3}, "n=3"),
        ({"model": LLAMA, "messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs=True"),
        ({"model": LLAMA, "messages": [{"role": "user", "content": "x"}], "stop": ["."]}, "no stop sequences"),
        (
            {"model": NOVA, "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
            "structured output",
        ),  # fmt: skip
        ({"model": MISTRAL, "messages": [{"role": "assistant", "content": "x"}]}, "first non-system"),
    ]
    for body, why in cases:
        reasons = BedrockBatchProvider.check_request(CHAT, body)
        assert reasons and any(why in r for r in reasons), (body, reasons)


def test_each_familys_documented_answer_becomes_a_chat_completion() -> None:
    llama = {"generation": "Paris.", "prompt_token_count": 9, "generation_token_count": 3, "stop_reason": "stop"}
    mistral = {"outputs": [{"text": "Mayo is", "stop_reason": "length"}]}
    nova = {"output": {"message": {"role": "assistant", "content": [{"text": "Once upon"}]}},
            "stopReason": "max_tokens", "usage": {"inputTokens": 12, "outputTokens": 2, "totalTokens": 14}}  # fmt: skip
    got = []
    for output, model in ((llama, LLAMA), (mistral, MISTRAL), (nova, NOVA)):
        line = openai_line({"recordId": "r1", "modelInput": {}, "modelOutput": output}, model, 1700000000)
        body = line["response"]["body"]
        assert line["custom_id"] == "r1" and line["response"]["status_code"] == 200
        assert body["object"] == "chat.completion" and body["model"] == model
        got.append((body["choices"][0]["message"]["content"], body["choices"][0]["finish_reason"],
                    body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"]))  # fmt: skip
    assert got == [("Paris.", "stop", 9, 3), ("Mayo is", "length", 0, 0), ("Once upon", "length", 12, 2)]
    failed = openai_line({"recordId": "r2", "error": {"errorCode": 400, "errorMessage": "bad"}}, LLAMA, 1)
    assert failed["response"]["status_code"] == 400 and "bad" in failed["response"]["body"]["error"]["message"]


def test_bedrock_models_are_priced_at_half_their_on_demand_price() -> None:
    table = PriceTable.load(None).for_provider("bedrock")
    for model in (MODEL, "us." + MODEL, LLAMA, MISTRAL, NOVA):
        price = table.lookup(model)
        assert price is not None and price.batch_input == price.input / 2, model
    assert table.lookup("us." + MODEL) == table.lookup(MODEL)


def test_job_names_carry_the_tag() -> None:
    assert job_name(TAG) == "llmbatch-job-0123456789abcdef-c00001"
    assert tag_of_job_name(job_name(TAG)) == TAG and tag_of_job_name("someone-else") is None


def test_settings_are_required(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="LLMBATCH_BEDROCK_S3_URI"):
        create_provider("bedrock", role_arn=ROLE_ARN)
    with pytest.raises(ConfigError, match="LLMBATCH_BEDROCK_ROLE_ARN"):
        create_provider("bedrock", s3_uri=S3)
    with pytest.raises(ConfigError, match="s3://bucket/prefix"):
        create_provider("bedrock", s3_uri="llmbatch-test/x", role_arn=ROLE_ARN)
    monkeypatch.setenv("LLMBATCH_BEDROCK_S3_URI", S3)
    monkeypatch.setenv("LLMBATCH_BEDROCK_ROLE_ARN", ROLE_ARN)
    p = create_provider("bedrock")
    assert isinstance(p, BedrockBatchProvider) and (p.bucket, p.prefix, p.role_arn) == (
        "llmbatch-test",
        "runs/a",
        ROLE_ARN,
    )


# -- the adapter against the fake ------------------------------------------------------------


@pytest.fixture
def served() -> Iterator[tuple[str, FakeBedrock]]:
    app, fake = bedrock_fake(end_after_polls=3)
    with serve_app(app) as url:
        yield url, fake


def provider(url: str) -> BedrockBatchProvider:
    p = create_provider("bedrock", base_url=url, s3_uri=S3, role_arn=ROLE_ARN, max_retries=0)
    assert isinstance(p, BedrockBatchProvider)
    return p


def test_job_lifecycle_results_and_lookups(served: tuple[str, FakeBedrock], tmp_path: Path) -> None:
    url, fake = served
    rows = [chat_line(i, model=MODEL) for i in range(8)]
    rows[5] = chat_line(5, "refuse FAIL400", model=MODEL)
    chunk = tmp_path / f"{TAG}.jsonl"
    chunk.write_bytes(jsonl(rows))
    p = provider(url)

    try:
        lc = asyncio.run(lifecycle(p, TAG, "job_0123456789abcdef", chunk, tmp_path / "out.jsonl"))
    finally:
        asyncio.run(p.aclose())
    b = lc.batch
    assert lc.file_id == f"{S3}/{TAG}/{TAG}.jsonl"
    assert lc.found is not None and lc.found.id == b.id
    # Submitted at create (its first poll: Validating), then Scheduled, then ended.
    assert lc.statuses == [RemoteStatus.VALIDATING, RemoteStatus.IN_PROGRESS, RemoteStatus.COMPLETED]
    (job,) = fake.jobs.values()
    assert (job.name, job.token, job.model, job.role) == (job_name(TAG), job_name(TAG), MODEL, ROLE_ARN)
    assert job.output_uri == f"{S3}/{TAG}/output/" and job.timeout_hours == 24
    assert job.status == "PartiallyCompleted" and (b.total, b.completed, b.failed) == (8, 7, 1)
    out = read_lines(tmp_path / "out.jsonl")
    assert_echoed_but_row_5(out, rows, prompt_tokens=2)
    for rec in out:
        if rec["custom_id"] != "row-5":
            assert "modelOutput" in rec["native"] and "modelInput" not in rec["native"]
    assert [(r.id, r.metadata) for r in lc.listed] == [(b.id, {"llmbatch_chunk": TAG})]
    assert ("llmbatch-test", f"runs/a/{TAG}/{TAG}.jsonl") not in fake.objects


def test_stop_failure_and_expiry(tmp_path: Path) -> None:
    app, fake = bedrock_fake(end_after_polls=3, min_records=4)
    chunk = tmp_path / f"{TAG}.jsonl"

    async def run(p: BedrockBatchProvider, n: int, tag: str, stop: bool = False) -> Any:
        chunk.write_bytes(jsonl([chat_line(i, model=MODEL) for i in range(n)]))
        b = await p.create_batch(tag, "job", await p.upload(tag, chunk), CHAT)
        if stop:
            assert (await p.cancel(b.id)).status is RemoteStatus.CANCELLING
        for _ in range(10):
            b = await p.get_batch(b.id)
            if b.status.terminal:
                return b
        raise AssertionError("never ended")

    with serve_app(app) as url:
        p = provider(url)

        async def scenario() -> tuple[Any, ...]:
            failed = await run(p, 2, "job_a-c00001")
            stopped = await run(p, 6, "job_a-c00002", stop=True)
            fake.expire_next = True
            expired = await run(p, 6, "job_a-c00003")
            await p.download(expired.output_file_id, tmp_path / "expired.jsonl")
            return failed, stopped, expired

        try:
            failed, stopped, expired = asyncio.run(scenario())
        finally:
            asyncio.run(p.aclose())
    assert failed.status is RemoteStatus.FAILED and failed.output_file_id is None
    assert "fewer than the minimum 4" in failed.errors[0]["message"]
    assert stopped.status is RemoteStatus.CANCELLED
    assert expired.status is RemoteStatus.EXPIRED and len(read_lines(tmp_path / "expired.jsonl")) == 3


# -- llmbatch run end to end ---------------------------------------------------------------


def cli_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "LLMBATCH_BEDROCK_"))}
    env.update(AWS_ENV, LLMBATCH_HOME=str(tmp_path / "home"), NO_PROXY="127.0.0.1,localhost",
               LLMBATCH_BEDROCK_S3_URI=S3, LLMBATCH_BEDROCK_ROLE_ARN=ROLE_ARN)  # fmt: skip
    return env


def run_cmd(inp: Path, url: str, *extra: str) -> list[str]:
    return model_run_cmd(inp, url, f"bedrock/{MODEL}", *extra)


def assert_one_job_per_chunk(tmp_path: Path, fake: FakeBedrock) -> None:
    """Each chunk has exactly one job on the fake, named for it, holding its rows."""
    assert_one_remote_per_chunk(tmp_path, (j.name for j in fake.jobs.values()), job_name)
    records = fake.job_records()
    for tag, batch_id, n in job_query(tmp_path, "SELECT tag, batch_id, rows FROM chunks"):
        assert len(records[batch_id.rsplit("/", 1)[1]]) == n, tag


def test_cli_runs_a_job_every_row_once_in_order(tmp_path: Path) -> None:
    """250 rows in chunks of 100: the last 50 would be a job below Bedrock's minimum of 100
    records, so they are folded into the chunk before them (100 + 150)."""
    app, fake = bedrock_fake(end_after_polls=2, min_records=100)
    rows = [chat_line(i) for i in range(250)]  # rows name gpt-4o-mini: --model bedrock/... replaces it
    rows[17] = chat_line(17, "refuse me FAIL400")
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(jsonl(rows))
    with serve_app(app) as url:
        # The S3 location and the role as flags this time (the environment's are removed).
        env = {k: v for k, v in cli_env(tmp_path).items() if not k.startswith("LLMBATCH_BEDROCK_")}
        cmd = run_cmd(inp, url, "--batch-size", "100", "--s3-uri", S3 + "/flags", "--role-arn", ROLE_ARN)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr  # row 17 failed
    out = read_lines(tmp_path / "input.results.jsonl")
    assert [r["custom_id"] for r in out] == [r["custom_id"] for r in rows]
    for i, rec in enumerate(out):
        if i != 17:
            assert rec["response"]["body"]["choices"][0]["message"]["content"] == f"hello {i}", rec
    (err,) = read_lines(tmp_path / "input.errors.jsonl")
    assert err["custom_id"] == "row-17" and err["response"]["status_code"] == 400
    assert chunk_sizes(tmp_path) == [100, 150] and not fake.invoked
    assert len(fake.jobs) == 2 and {j.model for j in fake.jobs.values()} == {MODEL}
    assert all(j.input_uri.startswith(S3 + "/flags/job_") and j.role == ROLE_ARN for j in fake.jobs.values())
    assert_one_job_per_chunk(tmp_path, fake)
    inputs = [k for (_b, k) in fake.objects if k.endswith(".jsonl")]
    assert inputs == [], "collected chunks' inputs are deleted"


def test_cli_refuses_other_model_families_at_ingest(tmp_path: Path) -> None:
    rows = [chat_line(0, model="bedrock/" + MODEL), chat_line(1, model="bedrock/cohere.command-r-v1:0")]
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(jsonl(rows))
    cmd = [*CLI, "run", str(inp), "--provider", "bedrock", "--base-url", "http://127.0.0.1:9"]
    proc = subprocess.run(cmd, env=cli_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "input.jsonl:2" in proc.stderr and "cohere.command-r-v1:0" in proc.stderr
    assert "input.jsonl:1" not in proc.stderr


def test_cli_splits_evenly_where_a_short_tail_cannot_be_folded(tmp_path: Path) -> None:
    """260 rows in chunks of 200 under a byte limit that holds 200: the tail of 60 cannot be
    folded in, so the two chunks share the rows (130 + 130), each a job Bedrock takes."""
    app, fake = bedrock_fake(end_after_polls=1, min_records=100)
    rows = [chat_line(i, model=MODEL) for i in range(260)]
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(jsonl(rows))
    sizes = [BedrockBatchProvider.check_and_measure(r["custom_id"], CHAT, r["body"])[1] or 0 for r in rows]
    with serve_app(app) as url:
        cmd = [*CLI, "run", str(inp), "--provider", "bedrock", "--base-url", url, "--poll-interval", "0.05",
               "--batch-size", "200", "--max-bytes", str(sum(sizes[:200]))]  # fmt: skip
        proc = subprocess.run(cmd, env=cli_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert chunk_sizes(tmp_path) == [130, 130]
    assert all(j.status == "Completed" for j in fake.jobs.values()) and not fake.invoked
    assert_one_job_per_chunk(tmp_path, fake)


def test_cli_sends_a_job_below_the_minimum_through_invoke_model(tmp_path: Path) -> None:
    """20 rows cannot make a Bedrock job (100 at least): they go through InvokeModel, translated
    for the job's --model (the rows name gpt-4o-mini), with a line saying why; with --no-direct
    the job is refused naming the minimum."""
    app, fake = bedrock_fake(end_after_polls=1, min_records=100)
    rows = [chat_line(i, max_tokens=50) for i in range(20)]
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(jsonl(rows))
    with serve_app(app) as url:
        cmd = [*CLI, "run", str(inp), "--model", f"bedrock/{LLAMA}", "--base-url", url, "--poll-interval", "0.05"]
        refused = subprocess.run([*cmd, "--no-direct"], env=cli_env(tmp_path / "refused"), capture_output=True,
                                 text=True, timeout=60)  # fmt: skip
        proc = subprocess.run(cmd, env=cli_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "minimum of 100" in refused.stderr and "--no-direct" in refused.stderr
    assert proc.returncode == 0, proc.stderr
    assert "20 rows of meta.llama3-70b-instruct-v1:0: fewer than the bedrock provider's minimum of 100" in proc.stderr
    assert not fake.jobs and [m for m, _b in fake.invoked] == [LLAMA] * 20
    assert all(b["prompt"].startswith("<|begin_of_text|>") and b["max_gen_len"] == 50 for _m, b in fake.invoked)
    out = read_lines(tmp_path / "input.results.jsonl")
    assert [r["custom_id"] for r in out] == [r["custom_id"] for r in rows]
    for i, rec in enumerate(out):
        body = rec["response"]["body"]
        assert body["choices"][0]["message"]["content"] == f"hello {i}" and body["model"] == LLAMA
        assert body["usage"]["completion_tokens"] == 2


def test_cli_retries_failed_rows_through_invoke_model(tmp_path: Path) -> None:
    """A job's rows that failed with a 500 go back, too few for a job of their own: InvokeModel
    sends them, as Nova bodies for the job's model."""
    app, fake = bedrock_fake(end_after_polls=1, min_records=100)
    rows = [chat_line(i, "BATCH500 again" if i in (3, 77) else None) for i in range(120)]
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(jsonl(rows))
    with serve_app(app) as url:
        cmd = [*CLI, "run", str(inp), "--model", f"bedrock/{NOVA}", "--base-url", url, "--poll-interval", "0.05"]
        proc = subprocess.run(cmd, env=cli_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert len(fake.jobs) == 1 and len(fake.invoked) == 2
    assert all(m == NOVA and b["schemaVersion"] == "messages-v1" for m, b in fake.invoked)
    out = read_lines(tmp_path / "input.results.jsonl")
    assert [r["response"]["body"]["choices"][0]["message"]["content"] for r in out] == [
        "BATCH500 again" if i in (3, 77) else f"hello {i}" for i in range(120)
    ]


def test_sigkill_at_random_moments_creates_no_second_job(tmp_path: Path) -> None:
    """Kills `llmbatch run` right after the fake made a job (before the client can record it) and at
    random moments; afterwards every row is there once, in order, and each chunk has one job."""
    app, fake = bedrock_fake(end_after_seconds=0.3, end_after_polls=None, create_latency=0.1, min_records=100)
    n = 600
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(jsonl([chat_line(i) for i in range(n)]))
    cmd_extra = ("--batch-size", "100", "--max-in-flight", "3")
    with serve_app(app) as url:
        kill_then_finish(run_cmd(inp, url, *cmd_extra), cli_env(tmp_path), attempts=5, seed=11, fake=fake)
    check_killed_job(tmp_path, n)
    assert_one_job_per_chunk(tmp_path, fake)
    assert any(path.startswith("/model-invocation-jobs?") for _m, path in fake.calls)


# -- a real job --------------------------------------------------------------------------------


@pytest.mark.live
def test_live_tiny_job(tmp_path: Path) -> None:
    """A real Bedrock batch job (Bedrock wants at least 100 records; costs about a cent on Claude
    Haiku). Needs AWS credentials, LLMBATCH_BEDROCK_S3_URI and LLMBATCH_BEDROCK_ROLE_ARN; it can
    take hours."""
    for k in ("LLMBATCH_BEDROCK_S3_URI", "LLMBATCH_BEDROCK_ROLE_ARN"):
        if not os.environ.get(k):
            pytest.skip(f"{k} is not set")
    model = os.environ.get("LLMBATCH_LIVE_BEDROCK_MODEL", MODEL)
    run_live_tiny_job("bedrock", tmp_path, f"bedrock/{model}", 100, 60, dict(os.environ), 24 * 3600)
