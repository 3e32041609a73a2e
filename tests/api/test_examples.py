"""Every example in examples/ runs as written against the local server (no key, no network): on the
echo engine, and on the packaged local model where it is installed (the examples' default there)."""

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
        ("classify_texts.py", "topics.jsonl", lambda r: r["topic"] in ("sports", "politics", "science")),
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
