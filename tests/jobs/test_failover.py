"""Cross-provider failover (`--fallback`, `--fallback-after`): rows the job's provider could not
answer for a retryable reason are answered by the next provider, once each, in input order.

The job's provider is the Anthropic fake (its row markers pick each row's fate: `EXPIRE`,
`FAIL500`, `FAIL400`, `FAIL429`); the fallback is a real `llmbatch serve` (echo engine) reached as
the OpenAI provider. `llmbatch run` runs as a subprocess against both, over real HTTP.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes._serve import serve_app
from fakes.anthropic import FakeAnthropic, anthropic_fake

from conftest import ServerProc, chat_line, jsonl

MODEL = "claude-haiku-4-5"
FALLBACK = "openai/gpt-4o-mini"


@pytest.fixture
def primary() -> Iterator[tuple[str, FakeAnthropic]]:
    app, fake = anthropic_fake(end_after_polls=1)
    with serve_app(app) as url:
        yield url, fake


def _env(home: Path, fallback_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "OPENAI_"))}
    env.update(
        LLMBATCH_HOME=str(home), ANTHROPIC_API_KEY="test", OPENAI_API_KEY="test", OPENAI_BASE_URL=fallback_url,
        NO_PROXY="127.0.0.1,localhost",
    )  # fmt: skip
    return env


def _cmd(inp: Path, url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "llmbatch", "run", str(inp), "--provider", "anthropic", "--base-url", url,
            "--model", MODEL, "--fallback", FALLBACK, "--poll-interval", "0.05", *extra]  # fmt: skip


def _run(inp: Path, url: str, home: Path, fallback_url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    env = _env(home, fallback_url)
    return subprocess.run(_cmd(inp, url, *extra), env=env, capture_output=True, text=True, timeout=120)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _job_db(home: Path) -> sqlite3.Connection:
    (job_dir,) = (home / "jobs").iterdir()
    return sqlite3.connect(job_dir / "job.sqlite")


def _fallback_batches(server: ServerProc, job_id: str) -> list[Any]:
    """The job's batches at the fallback server (the shared server holds other tests' too)."""
    return [b for b in server.client().batches.list(limit=100) if (b.metadata or {}).get("llmbatch_job") == job_id]


def _sent(fake: FakeAnthropic) -> list[str]:
    """Every custom_id the Anthropic fake was sent, over all its batches."""
    return [cid for b in fake.batches.values() for cid in b.custom_ids]


def _texts() -> list[str]:
    texts = [f"text {i}" for i in range(12)]
    texts[2], texts[7] = "EXPIRE two", "EXPIRE seven"
    texts[5] = "FAIL500 five"
    texts[9] = "FAIL400 nine"
    texts[4] = "FAIL429 four"
    return texts


def test_rows_the_primary_expires_or_5xxs_are_answered_by_the_fallback_once_in_order(
    primary: tuple[str, FakeAnthropic], server: ServerProc, tmp_path: Path
) -> None:
    url, fake = primary
    texts = _texts()
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(jsonl([chat_line(i, t) for i, t in enumerate(texts)]))
    home = tmp_path / "home"

    proc = _run(inp, url, home, server.base_url, "--max-attempts", "2", "--batch-size", "5")
    assert proc.returncode == 1, proc.stderr  # row 9's 400 is final

    out = _lines(tmp_path / "input.results.jsonl")
    assert [r["custom_id"] for r in out] == [f"row-{i}" for i in range(12)]
    moved = {2, 5, 7}
    for i, rec in enumerate(out):
        if i in moved:
            assert rec["provider"] == FALLBACK, rec
            assert rec["response"]["status_code"] == 200
            assert texts[i] in rec["response"]["body"]["choices"][0]["message"]["content"]
        elif i == 9:
            assert rec["provider"] == f"anthropic/{MODEL}"
            assert rec["response"]["status_code"] == 400, rec
        else:
            assert rec["provider"] == f"anthropic/{MODEL}", rec
            assert rec["response"]["body"]["choices"][0]["message"]["content"] == texts[i]
    errors = _lines(tmp_path / "input.errors.jsonl")
    assert [e["custom_id"] for e in errors] == ["row-9"]

    # At the primary: the expired and 5xx rows twice (--max-attempts 2), the 400 once (not failed over).
    sent = _sent(fake)
    assert sorted(c for c in sent if sent.count(c) == 2) == sorted(["row-2", "row-5", "row-7", "row-4"] * 2)
    assert sent.count("row-9") == 1
    # At the fallback: one batch, of exactly the rows that failed over.
    job_id = _job_db(home).execute("SELECT id FROM job").fetchone()[0]
    (batch,) = _fallback_batches(server, job_id)
    assert batch.request_counts.total == 3
    answered = [
        json.loads(x)["custom_id"] for x in server.client().files.content(batch.output_file_id).text.split("\n") if x
    ]
    assert sorted(answered) == ["row-2", "row-5", "row-7"]

    status = subprocess.run(
        [sys.executable, "-m", "llmbatch", "status", job_id],
        env=_env(home, server.base_url), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert status.returncode == 0, status.stderr
    assert f"anthropic/{MODEL}: 1 failed, 8 succeeded" in status.stdout, status.stdout
    assert f"{FALLBACK}: 3 succeeded" in status.stdout, status.stdout

    # Run again: nothing is sent anywhere again.
    batches_before = len(fake.batches)
    again = _run(inp, url, home, server.base_url, "--max-attempts", "2", "--batch-size", "5")
    assert again.returncode == 1, again.stderr
    assert len(fake.batches) == batches_before and len(_fallback_batches(server, job_id)) == 1
    # With another fallback in its place, the job is refused: its rows' batches are at the first one.
    env = _env(home, server.base_url)
    cmd = _cmd(inp, url, "--max-attempts", "2", "--batch-size", "5")
    cmd[cmd.index(FALLBACK)] = "openai/gpt-4.1-mini"
    other = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert other.returncode == 2, other.stderr
    assert "went to fallbacks as gpt-4o-mini" in other.stderr and "Traceback" not in other.stderr


def test_one_budget_covers_both_providers_each_at_its_own_prices(
    primary: tuple[str, FakeAnthropic], server: ServerProc, tmp_path: Path
) -> None:
    """The primary's spend and the fallback's estimate count against one --max-cost: with the
    fallback's model dear, its chunk is held back (exit 3, nothing sent to it); priced at nothing,
    the same cap lets it run."""
    url, _fake = primary
    inp = tmp_path / "input.jsonl"
    texts = ["EXPIRE zero", "text one", "text two", "EXPIRE three"]
    inp.write_bytes(jsonl([chat_line(i, t, max_tokens=50) for i, t in enumerate(texts)]))

    def run(name: str, fallback_price: float) -> tuple[subprocess.CompletedProcess[str], sqlite3.Connection]:
        prices = tmp_path / f"{name}.json"
        prices.write_text(
            json.dumps({MODEL: {"input": 1.0, "output": 5.0}, "gpt-4o-mini": {"input": 0.0, "output": fallback_price}})
        )
        home = tmp_path / f"home-{name}"
        args = ("--max-attempts", "1", "--max-cost", "1", "--price-file", str(prices))
        return _run(inp, url, home, server.base_url, *args), _job_db(home)

    dear, db = run("dear", 100_000.0)
    assert dear.returncode == 3, dear.stderr
    assert "budget" in dear.stderr and "past the $1.00 cap" in dear.stderr
    job_id = db.execute("SELECT id FROM job").fetchone()[0]
    assert _fallback_batches(server, job_id) == []
    # The primary's two answers were paid for, at the primary's prices.
    primary_cost = db.execute("SELECT SUM(cost) FROM rows WHERE lane=0").fetchone()[0]
    assert 0 < primary_cost < 1

    free, db = run("free", 0.0)
    assert free.returncode == 0, free.stderr
    out = _lines(tmp_path / "input.results.jsonl")
    assert [r["provider"] for r in out] == [FALLBACK, f"anthropic/{MODEL}", f"anthropic/{MODEL}", FALLBACK]
    costs = dict(db.execute("SELECT lane, SUM(cost) FROM rows GROUP BY lane").fetchall())
    assert costs == {0: pytest.approx(primary_cost), 1: 0}


def test_a_batch_past_fallback_after_is_cancelled_and_only_its_unanswered_rows_fail_over(
    server: ServerProc, tmp_path: Path
) -> None:
    """A primary whose batches never end on their own: after --fallback-after the batch is
    cancelled there; the 3 rows it answered before the cancel are kept from it, the other 5 go to
    the fallback, none of them tried at the primary again."""
    app, fake = anthropic_fake(end_after_polls=None, cancel_completes=3)
    inp = tmp_path / "input.jsonl"
    texts = [f"text {i}" for i in range(8)]
    inp.write_bytes(jsonl([chat_line(i, t) for i, t in enumerate(texts)]))
    home = tmp_path / "home"
    with serve_app(app) as url:
        proc = _run(inp, url, home, server.base_url, "--fallback-after", "1s")
    assert proc.returncode == 0, proc.stderr
    assert "not finished after 1 s" in proc.stderr

    (batch,) = fake.batches.values()
    assert batch.status == "ended" and batch.cancel_initiated_at is not None
    out = _lines(tmp_path / "input.results.jsonl")
    assert [r["custom_id"] for r in out] == [f"row-{i}" for i in range(8)]
    assert [r["provider"] for r in out] == [f"anthropic/{MODEL}"] * 3 + [FALLBACK] * 5
    for i, rec in enumerate(out):
        assert texts[i] in rec["response"]["body"]["choices"][0]["message"]["content"]


def test_kill_9_during_the_failover_submission_then_resume_sends_no_second_batch(
    primary: tuple[str, FakeAnthropic], server_factory: Any, tmp_path: Path
) -> None:
    """The job's provider is a real `llmbatch serve` that fails 30% of rows with a 500, the
    fallback the Anthropic fake, slow to answer a create (the batch exists at once): the run is
    killed -9 while that answer is awaited, and resumed. Each provider holds one batch per chunk
    the job planned for it, every row has one result, in input order."""
    url, fake = primary
    fake.create_latency = 3.0
    srv = server_factory("--echo-fail-rate", "0.3")
    rows = 40
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(jsonl([chat_line(i) for i in range(rows)]))
    home = tmp_path / "home"
    env = _env(home, srv.base_url)
    env.update(ANTHROPIC_BASE_URL=url)
    cmd = [sys.executable, "-m", "llmbatch", "run", str(inp), "--provider", "openai", "--base-url", srv.base_url,
           "--fallback", f"anthropic/{MODEL}", "--max-attempts", "1", "--batch-size", "10",
           "--poll-interval", "0.05"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while not fake.batches:
            assert proc.poll() is None, "the run ended before it failed over"
            assert time.monotonic() < deadline, "no failover within 90 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # the batch exists; its create's answer is 3 s away
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(fake.batches) == 1

    final = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr

    out = _lines(tmp_path / "input.results.jsonl")
    assert [r["custom_id"] for r in out] == [f"row-{i}" for i in range(rows)]
    assert all(r["response"]["status_code"] == 200 for r in out)
    db = _job_db(home)
    job_id = db.execute("SELECT id FROM job").fetchone()[0]
    planned = {lane: {t for (t,) in db.execute("SELECT tag FROM chunks WHERE lane=?", (lane,))} for lane in (0, 1)}
    # The primary: one batch per chunk of its own.
    remote = _fallback_batches(srv, job_id)
    primary_tags = [b.metadata["llmbatch_chunk"] for b in remote]
    assert sorted(primary_tags) == sorted(planned[0])
    # The fallback: the batch made before the kill was found, not made again.
    assert len(fake.batches) == len(planned[1]) == 1
    moved = [r for r in out if r["provider"] == f"anthropic/{MODEL}"]
    assert moved and sorted(_sent(fake)) == sorted(r["custom_id"] for r in moved)
    found = [m for (m,) in db.execute("SELECT message FROM events WHERE message LIKE '%found batch%'")]
    assert found, "the resumed run should have found the batch by its tag"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--fallback", "claude-sonnet-4-5"], "--fallback 'claude-sonnet-4-5': give a provider and a model"),
        (["--fallback", "local/echo"], "PROVIDER one of openai,"),
        (["--fallback", "anthropic/a", "--fallback", "anthropic/a"], "name each provider/model once"),
        (["--fallback-after", "1h"], "--fallback-after needs a --fallback"),
        (["--fallback", "anthropic/a", "--fallback-after", "soon"], "invalid duration 'soon'"),
        (["--fallback", "gemini/gemini-2.5-flash"], "the gemini provider needs an API key"),
    ],
)
def test_bad_fallback_options_are_refused_naming_what_and_why(args: list[str], says: str, tmp_path: Path) -> None:
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(jsonl([chat_line(0)]))
    cmd = [sys.executable, "-m", "llmbatch", "run", str(inp), "--provider", "openai", *args]
    env = {
        k: v
        for k, v in _env(tmp_path / "home", "http://127.0.0.1:9").items()
        if not k.startswith(("GEMINI_", "GOOGLE_"))
    }
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert says in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "home" / "jobs").exists() or not any((tmp_path / "home" / "jobs").iterdir())


def test_run_file_fails_over_and_its_records_say_who_answered(
    primary: tuple[str, FakeAnthropic], server: ServerProc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Python API takes the same settings: `fallbacks`, and its records name the provider."""
    from llmbatch import run_file

    url, _fake = primary
    for k, v in _env(tmp_path / "home", server.base_url).items():
        monkeypatch.setenv(k, v)
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(jsonl([chat_line(0, "EXPIRE zero"), chat_line(1, "text one")]))
    job = run_file(
        inp, provider="anthropic", model=MODEL, base_url=url, fallbacks=[FALLBACK], max_attempts=1, poll_interval=0.05
    )
    assert [(r["custom_id"], r["provider"]) for r in job.results()] == [
        ("row-0", FALLBACK),
        ("row-1", f"anthropic/{MODEL}"),
    ]
