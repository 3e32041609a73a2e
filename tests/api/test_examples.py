"""Every example in examples/ runs as written against the local server (no key, no network): on the
echo engine, and on the packaged local model where it is installed (the examples' default there).
The demo (`llmbatch run examples/requests.jsonl`, README's first command) answers the same twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmbatch.engines._packaged import local_engine_available, packaged_embedding_model

EXAMPLES = Path(__file__).parents[2] / "examples"


_real = pytest.mark.skipif(
    not local_engine_available() or packaged_embedding_model() is None, reason="needs the packaged local models"
)


@pytest.mark.parametrize("engine", ["echo", pytest.param("auto", marks=_real)])
@pytest.mark.parametrize(
    ("script", "output", "check"),
    [
        ("summarize_articles.py", "summaries.jsonl", lambda r: r["summary"]),
        (
            "classify_texts.py",
            "topics.jsonl",
            lambda r: r["topic"] in ("sports", "politics", "science") and 0 <= r["confidence"] <= 1,
        ),
        ("embed_corpus.py", "embeddings.jsonl", lambda r: len(r["embedding"]) > 0),
    ],
)
def test_example_runs(tmp_path: Path, script: str, output: str, check, engine: str) -> None:  # type: ignore[no-untyped-def]
    env = {**os.environ, "LLMBATCH_HOME": str(tmp_path / "home"), "LLMBATCH_ENGINE": engine}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--out", str(tmp_path)], env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (tmp_path / output).read_text().splitlines()]
    articles = [json.loads(line) for line in (EXAMPLES / "articles.jsonl").read_text().splitlines()]
    if output != "embeddings.jsonl":
        records = [r["output"] for r in records]
    assert [r["id"] for r in records] == [a["id"] for a in articles]
    assert all(check(r) for r in records)


@_real
def test_demo_answers_are_stable_and_sensible(tmp_path: Path) -> None:
    """The README's first command, run twice as a new user would (each from a fresh home): every
    row is greedy and short, so both runs give the same answers, each one finished (not cut off)."""
    rows = [json.loads(line) for line in (EXAMPLES / "requests.jsonl").read_text().splitlines()]
    assert all(r["body"].get("temperature") == 0 and r["body"]["max_tokens"] <= 64 for r in rows)
    procs = []
    for run in ("a", "b"):
        # One llama.cpp thread each: the two runs share the suite's cores (its threads spin while
        # they wait for each other), and the thread count does not change a greedy answer.
        env = {**os.environ, "LLMBATCH_HOME": str(tmp_path / run), "LLMBATCH_ENGINE": "auto"}
        cmd = [sys.executable, "-m", "llmbatch", "run", str(EXAMPLES / "requests.jsonl"), "--n-threads", "1",
               "-o", str(tmp_path / f"{run}.jsonl")]  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    answers = []
    for run, proc in zip("ab", procs):
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        lines = [json.loads(line) for line in (tmp_path / f"{run}.jsonl").read_text().splitlines()]
        choices = [line["response"]["body"]["choices"][0] for line in lines]
        assert all(c["finish_reason"] == "stop" for c in choices), choices
        answers.append({line["custom_id"]: c["message"]["content"] for line, c in zip(lines, choices)})
    assert answers[0] == answers[1]
    # Questions with one right answer get it (greedy SmolLM2-135M; the README quotes these).
    assert "Paris" in answers[0]["request-2"] and "7" in answers[0]["request-3"]
