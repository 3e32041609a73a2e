"""Every code block of README.md runs as pasted, on the embedded default (no key, no network).

Like pytest-examples: each fenced block is a test. A `python` block runs as a script, a `bash`
block as a shell script (with `set -e`), both in a scratch directory holding a copy of
`examples/`, with a fresh `LLMBATCH_HOME`, no API keys, and the default engine (the packaged
model where it is installed, else echo). What a block may not run is marked in the README by an
HTML comment on the line before it, with the reason:

- `<!-- not-run: REASON -->`: the whole block (it needs a key, a GPU, a cluster, model files, or
  starts a long-running server);
- `<!-- not-run lines 1, 3: REASON -->`: those lines of a shell block (counted from 1);
- `<!-- with-server: REASON -->`: the block talks to `llmbatch serve`, which the test starts
  (default engine) on a free port and gives the block in place of the README's port 8000.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from llmbatch.engines._packaged import local_engine_available

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
_MARK = re.compile(r"<!--\s*(not-run|with-server)(?:\s+lines\s+([\d,\s]+))?\s*:\s*(\S.*?)\s*-->")
_FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass
class Block:
    line: int  # the opening fence's line in README.md, from 1
    lang: str
    code: list[str]
    mark: str | None = None  # "not-run" or "with-server"
    skip_lines: frozenset[int] = frozenset()
    reason: str = ""

    @property
    def id(self) -> str:
        return f"README.md:{self.line}-{self.lang}"


def readme_blocks() -> list[Block]:
    lines = README.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        block = Block(line=i + 1, lang=m.group(1), code=lines[i + 1 : end])
        previous = lines[i - 1].strip() if i > 0 else ""
        if mark := _MARK.fullmatch(previous):
            block.mark, block.reason = mark.group(1), mark.group(3)
            if mark.group(2):
                block.skip_lines = frozenset(int(n) for n in mark.group(2).replace(",", " ").split())
        blocks.append(block)
        i = end + 1
    return blocks


BLOCKS = readme_blocks()


def test_every_block_is_run_or_says_why_not() -> None:
    """A block is python or bash, and a marked one says why; the blocks skipped whole stay few."""
    assert BLOCKS, "no code blocks found in README.md"
    for b in BLOCKS:
        assert b.lang in ("python", "bash"), f"{b.id}: a block that runs needs a language (python or bash)"
        assert b.mark is None or b.reason, f"{b.id}: say why the block does not run"
        assert all(1 <= n <= len(b.code) for n in b.skip_lines), f"{b.id}: no such line in {sorted(b.skip_lines)}"
    skipped = [b for b in BLOCKS if b.mark == "not-run" and not b.skip_lines]
    assert len(skipped) <= len(BLOCKS) // 2 + 2, [b.id for b in skipped]
    assert sum(1 for b in BLOCKS if b.lang == "python" and b.mark != "not-run") >= 4


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.mark != "not-run" or b.skip_lines], ids=lambda b: b.id)
def test_block_runs_as_pasted(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server_factory) -> None:  # type: ignore[no-untyped-def]
    work = tmp_path / "work"
    outputs = shutil.ignore_patterns("*.results.jsonl", "*.errors.jsonl")
    shutil.copytree(ROOT / "examples", work / "examples", ignore=outputs)
    monkeypatch.delenv("LLMBATCH_ENGINE", raising=False)  # the default engine, as a new user has it
    for key in [k for k in os.environ if k.endswith("_API_KEY") or k.endswith("_API_KEYS")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("LLMBATCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    code = [line for n, line in enumerate(block.code, 1) if n not in block.skip_lines]
    text = "\n".join(code) + "\n"
    if block.mark == "with-server":
        # One llama.cpp thread: the suite's cores are shared (its threads spin waiting for each other).
        srv = server_factory(*(["--n-threads", "1"] if local_engine_available() else []))
        assert "127.0.0.1:8000" in text, f"{block.id}: a with-server block talks to 127.0.0.1:8000"
        text = text.replace("127.0.0.1:8000", f"127.0.0.1:{srv.port}")
    if block.lang == "python":
        (work / "snippet.py").write_text(text)
        cmd = [sys.executable, "snippet.py"]
    else:
        cmd = ["bash", "-e", "-c", text]
    done = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=180, preexec_fn=_one_core(block))
    assert done.returncode == 0, f"{block.id} exited {done.returncode}:\n{text}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    if block.lang == "python":  # each shows its result: one that only defines a function ran nothing
        assert done.stdout.strip(), f"{block.id} printed nothing:\n{text}"


def _one_core(block: Block) -> Callable[[], None] | None:
    """Runs a block as on a one-core machine (its llama.cpp engine then takes one thread): the
    suite's workers share two cores, and llama.cpp's threads spin while they wait for each other."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))
    core = cores[block.line % len(cores)]
    return lambda: os.sched_setaffinity(0, {core})
