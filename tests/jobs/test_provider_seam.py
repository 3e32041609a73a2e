"""The runner's side of the provider seam: choosing a provider, rewriting rows, reading inputs.

End-to-end parts run the real CLI against real `llmbatch serve` processes; the ingest tests
read real files into a real job store.
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from test_run_cli import POLL, cli_env, llmbatch, read_lines, remote_batches, write_input

from conftest import chat_line, jsonl
from llmbatch.jobs import JobSettings, JobStore, ingest
from llmbatch.jobs._ingest import remote_id_for
from llmbatch.providers import PROVIDERS, split_model

# -- choosing the provider and the model ------------------------------------------------------


def test_split_model() -> None:
    assert split_model("anthropic/claude-sonnet-4-5", None) == ("anthropic", "claude-sonnet-4-5")
    assert split_model("gpt-4o-mini", None) == (None, "gpt-4o-mini")
    # An explicit provider takes off only its own prefix: other slashes are part of the name.
    assert split_model("openai/gpt-oss-120b", "groq") == (None, "openai/gpt-oss-120b")
    assert split_model("groq/openai/gpt-oss-120b", "groq") == ("groq", "openai/gpt-oss-120b")
    assert split_model("meta-llama/Llama-3.3-70B", None) == (None, "meta-llama/Llama-3.3-70B")
    assert split_model("local/x", None) == (None, "local/x")  # `local` is never picked by a prefix


def test_model_flag_rewrites_every_row(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = server_factory()
    rows = [chat_line(i, f"hi {i}", model="gpt-4o-mini") for i in range(30)]
    inp = write_input(tmp_path, rows)
    proc = llmbatch(
        tmp_path, "run", str(inp), "--provider", "openai", "--base-url", server.base_url, *POLL, "--keep-uploads",
        "--model", "my-deployment", "--batch-size", "10",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = read_lines(tmp_path / "input.results.jsonl")
    assert [r["custom_id"] for r in out] == [r["custom_id"] for r in rows]
    assert {r["response"]["body"]["model"] for r in out} == {"my-deployment"}
    with server.client() as c:
        for b in remote_batches(server):
            sent = [json.loads(line) for line in c.files.content(b.input_file_id).text.splitlines()]
            assert {s["body"]["model"] for s in sent} == {"my-deployment"}


def test_provider_prefix_on_the_rows_picks_the_provider(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = server_factory()
    rows = [chat_line(i, model="openai/gpt-4o-mini") for i in range(5)]
    inp = write_input(tmp_path, rows)
    # No --provider: the rows' `openai/` prefix picks the openai provider, which sends the bare name.
    proc = llmbatch(tmp_path, "run", str(inp), "--base-url", server.base_url, *POLL, "--keep-uploads")
    assert proc.returncode == 0, proc.stderr
    (b,) = remote_batches(server)
    with server.client() as c:
        sent = [json.loads(line) for line in c.files.content(b.input_file_id).text.splitlines()]
    assert {s["body"]["model"] for s in sent} == {"gpt-4o-mini"}
    job = next((tmp_path / "home" / "jobs").iterdir())
    settings = JobStore(job / "job.sqlite").job()["settings"]  # type: ignore[index]
    assert settings["provider"] == "openai"


@pytest.mark.parametrize(
    ("provider", "variable"),
    [("groq", "GROQ_API_KEY"), ("azure", "AZURE_OPENAI_API_KEY"), ("anthropic", "ANTHROPIC_API_KEY")],
)
def test_a_missing_key_names_its_variable(tmp_path: Path, provider: str, variable: str) -> None:
    inp = write_input(tmp_path, [chat_line(0, model="some-model")])
    env = {k: v for k, v in cli_env(tmp_path, key=False).items() if k != variable}
    proc = subprocess.run(
        [sys.executable, "-m", "llmbatch", "run", str(inp), "--provider", provider,
         "--base-url", "http://127.0.0.1:9", *POLL],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert variable in proc.stderr


def test_a_missing_sdk_names_the_install_command(tmp_path: Path) -> None:
    inp = write_input(tmp_path, [chat_line(0, model="claude-sonnet-4-5")])
    # The SDK made unimportable in the child, as on a machine without the extra installed.
    code = "import sys; sys.modules['anthropic'] = None; from llmbatch.cli import main; main()"
    proc = subprocess.run(
        [sys.executable, "-c", code, "run", str(inp), "--provider", "anthropic", *POLL],
        env={**cli_env(tmp_path), "ANTHROPIC_API_KEY": "x"}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert 'pip install "llmbatch[anthropic]"' in proc.stderr


def test_every_registered_provider_loads() -> None:
    from llmbatch.providers import provider_class

    for name in PROVIDERS:
        cls = provider_class(name)
        assert cls.name == name


# -- ids the provider refuses ---------------------------------------------------------------


def test_remote_ids_replace_only_refused_ids() -> None:
    pattern = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # Anthropic's
    assert remote_id_for("row-1", pattern) is None
    long_id = "x" * 65
    mapped = remote_id_for(long_id, pattern)
    assert mapped is not None and pattern is not None and pattern.fullmatch(mapped)
    assert mapped == remote_id_for(long_id, pattern)  # stable across runs
    assert remote_id_for("a b", pattern) != mapped
    assert remote_id_for("anything goes", None) is None


# -- reading inputs -------------------------------------------------------------------------


def _rows_of(store: JobStore) -> list[tuple[object, ...]]:
    db = sqlite3.connect(store.path)  # the test's own connection: what is on disk
    try:
        return db.execute(
            "SELECT idx, file_no, line, offset, length, custom_id, endpoint, model, est_input, est_output, state, "
            "error "
            "FROM rows ORDER BY idx"
        ).fetchall()
    finally:
        db.close()


def test_ingest_in_worker_processes_matches_in_process(tmp_path: Path) -> None:
    lines = [jsonl([chat_line(i, f"text {i} " * (i % 7))]).rstrip(b"\n") for i in range(400)]
    lines[0] = b"\xef\xbb\xbf" + lines[0]  # a byte-order mark on the first line
    lines[10] = b"{not json"
    lines[20] = b""  # a blank line: skipped, but it still counts for line numbers
    lines[30] = lines[31]  # a repeated custom_id
    lines[399] = lines[5]  # another, far from the first: found across ranges
    data = b"\n".join(lines[:200]) + b"\r\n" + b"\r\n".join(lines[200:]) + b"\n"
    inputs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    inputs[0].write_bytes(data)
    inputs[1].write_bytes(jsonl([chat_line(f"b{i}") for i in range(50)]))
    settings = JobSettings(provider="local")

    serial = JobStore(tmp_path / "serial.sqlite")
    r1 = ingest(serial, inputs, settings, workers=0)
    pooled = JobStore(tmp_path / "pooled.sqlite")
    r2 = ingest(pooled, inputs, settings, workers=2, range_bytes=2048)

    assert _rows_of(serial) == _rows_of(pooled)
    assert (r1.rows, r1.invalid, r1.problems) == (r2.rows, r2.invalid, r2.problems)
    assert r1.rows == 449 and r1.invalid == 3
    rows = _rows_of(pooled)
    by_line = {(r[1], r[2]): r for r in rows}
    assert by_line[(0, 11)][10] == "invalid" and "invalid_json_line" in str(by_line[(0, 11)][11])
    assert "duplicate_custom_id" in str(by_line[(0, 32)][11]) and "a.jsonl:31" in str(by_line[(0, 32)][11])
    assert "duplicate_custom_id" in str(by_line[(0, 400)][11]) and "a.jsonl:6" in str(by_line[(0, 400)][11])
    assert (0, 21) not in by_line
    first = by_line[(0, 1)]
    raw = inputs[0].read_bytes()[first[3] : first[3] + first[4]]  # type: ignore[operator]
    assert json.loads(raw)["custom_id"] == first[5]  # offsets skip the byte-order mark
    row_250 = by_line[(0, 251)]
    raw = inputs[0].read_bytes()[row_250[3] : row_250[3] + row_250[4]]  # type: ignore[operator]
    assert raw.endswith(b"}") and json.loads(raw)["custom_id"] == row_250[5]  # no \r kept


def test_a_job_file_left_empty_by_a_kill_gets_its_schema(tmp_path: Path) -> None:
    path = tmp_path / "job.sqlite"
    path.write_bytes(b"")  # created, then killed before the schema's transaction
    store = JobStore(path)
    assert store.job() is None
    store.create_job("job_x", [], {})
    assert store.job()["id"] == "job_x"  # type: ignore[index]


def test_uploads_are_deleted_once_collected(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = server_factory()
    inp = write_input(tmp_path, [chat_line(i) for i in range(25)])
    proc = llmbatch(
        tmp_path, "run", str(inp), "--provider", "openai", "--base-url", server.base_url, *POLL, "--batch-size", "10"
    )
    assert proc.returncode == 0, proc.stderr
    assert len(remote_batches(server)) == 3
    with server.client() as c:
        assert list(c.files.list(purpose="batch")) == []  # inputs gone; outputs stay for the user
        assert len(list(c.files.list(purpose="batch_output"))) == 3


def test_price_as_prices_deployment_names(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = server_factory()
    inp = write_input(tmp_path, [chat_line(i, max_tokens=10) for i in range(5)])
    base = ["run", str(inp), "--provider", "openai", "--base-url", server.base_url, *POLL, "--model", "my-deployment"]
    refused = llmbatch(tmp_path, *base, "--max-cost", "1")
    assert refused.returncode == 2 and "my-deployment" in refused.stderr  # no price for a deployment name
    proc = llmbatch(tmp_path, *base, "--max-cost", "1", "--price-as", "gpt-4o-mini")
    assert proc.returncode == 0, proc.stderr
    job = next((tmp_path / "home" / "jobs").iterdir()).name
    status = json.loads(llmbatch(tmp_path, "status", job, "--json").stdout)
    assert status["usage"]["cost"] > 0 and status["estimate"]["cost"] > 0  # priced as gpt-4o-mini
