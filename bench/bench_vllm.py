"""Benchmark of the vllm engine: a whole batch through `llmbatch serve --engine vllm` against raw vLLM.

Both sides get the same chat conversations (fixed seed, user messages of 5 to 400 words),
greedy decoding with the same max_tokens, and the same vLLM settings (`llm_kwargs`, what the
engine passes to `vllm.LLM`). They run one after the other on the same GPU, each in its own
process, so each has the whole GPU:

(a) the server: one batch of all rows, timed from batch creation to completion (polled);
(b) raw vLLM: one `LLM.chat` call on all conversations, what a hand-written offline script
    does, timed around that call alone.

Each side's throughput is the completion tokens it generated per second; the ratio (a)/(b)
is the engine's efficiency. Target: >= 0.95. Both decode greedily, so both generate nearly
the same tokens (the server's rows cannot set ignore_eos, so answers may end at EOS on both
sides alike); the token totals are printed to show it. Needs a CUDA GPU and vLLM.

With `--executors local,ray` the server runs once per executor: `--executor ray` puts the engine
on one Ray replica (an actor with the GPU, in a Ray started by the server on 127.0.0.1), so the
ratio ray / raw is what the Ray executor costs (target >= 0.95 too). Rows/s are printed beside
tokens/s.

Usage: python bench/bench_vllm.py --model PATH_OR_ID [--rows 2000] [--max-tokens 128]
       [--n-parallel N] [--n-ctx N] [--dtype auto] [--gpu-memory-utilization 0.9] [--seed 0]
       [--executors local[,ray]]   (--model defaults to $LLMBATCH_VLLM_MODEL)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil

from llmbatch.engines import VLLMOptions
from llmbatch.engines._vllm import llm_kwargs

SERVED = "bench-model"
_TASKS = (
    "Summarise the following notes in three sentences.",
    "List the five most important points in the text below.",
    "Rewrite the following as a short, friendly email.",
    "Explain the text below to a ten-year-old.",
    "Write a title and a one-paragraph abstract for these notes.",
)
_WORDS = (
    "the report describes revenue costs and the outlook for next year while the team plans new work on "
    "customers products markets prices supply demand risk growth quality service support training data "
    "systems tools models results tests users feedback budget schedule hiring office travel energy water "
    "river city road bridge school library garden kitchen music story history science weather season"
).split()


def build_conversations(rows: int, seed: int) -> list[list[dict[str, str]]]:
    """Chat conversations of one user message each, lengths spread from a few words to a page."""
    rng = random.Random(seed)
    conversations = []
    for _ in range(rows):
        words = min(400, max(5, int(rng.lognormvariate(4.0, 0.9))))
        text = " ".join(rng.choice(_WORDS) for _ in range(words))
        conversations.append([{"role": "user", "content": f"{rng.choice(_TASKS)}\n\n{text}"}])
    return conversations


def engine_options(args: argparse.Namespace) -> VLLMOptions:
    fields: dict[str, Any] = {
        "model_path": args.model,
        "served_model_name": SERVED,
        "embedding_model": "none",
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "dtype": args.dtype,
        "n_ctx": args.n_ctx,
    }
    if args.n_parallel is not None:
        fields["n_parallel"] = args.n_parallel
    return VLLMOptions(**fields)


# -- (b) raw vLLM, in its own process ----------------------------------------------------------


def raw_worker(args: argparse.Namespace) -> None:
    """Runs in a child process: loads vLLM as the engine would, times one LLM.chat over all rows."""
    from vllm import LLM, SamplingParams

    conversations = json.loads(Path(args.raw_worker[0]).read_text())
    llm = LLM(**llm_kwargs(engine_options(args)))
    llm.chat([[{"role": "user", "content": "Warm up."}]], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    t0 = time.perf_counter()
    outputs = llm.chat(conversations, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    result = {
        "seconds": seconds,
        "rows": len(outputs),
        "completion_tokens": sum(len(c.token_ids) for o in outputs for c in o.outputs),
        "prompt_tokens": sum(len(o.prompt_token_ids) for o in outputs),
    }
    Path(args.raw_worker[1]).write_text(json.dumps(result))


def run_raw(args: argparse.Namespace, conversations_path: Path, tmp: Path) -> dict[str, Any]:
    out = tmp / "raw.json"
    cmd = [sys.executable, __file__, *_shared_args(args), "--raw-worker", str(conversations_path), str(out)]
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def _shared_args(args: argparse.Namespace) -> list[str]:
    shared = ["--model", args.model, "--max-tokens", str(args.max_tokens), "--dtype", args.dtype]
    shared += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    if args.n_parallel is not None:
        shared += ["--n-parallel", str(args.n_parallel)]
    if args.n_ctx is not None:
        shared += ["--n-ctx", str(args.n_ctx)]
    return shared


# -- (a) the server --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_server(
    args: argparse.Namespace, conversations: list[list[dict[str, str]]], tmp: Path, executor: str = "local"
) -> dict[str, Any]:
    port = free_port()
    env = dict(os.environ)
    engine_args = ["--model-path", args.model, "--served-model-name", SERVED, "--embedding-model", "none"]
    if executor == "ray":
        # One replica in a Ray the server starts on 127.0.0.1; its temp dir short (socket paths).
        ray_tmp = Path(tempfile.mkdtemp(prefix="lbv-", dir="/tmp"))
        (ray_tmp / "ray").mkdir()
        env.update(RAY_TMPDIR=str(ray_tmp), RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
        engine_args += ["--executor", "ray", "--replicas", "1", "--replica-placement-wait", "1800"]
    engine_args += ["--dtype", args.dtype, "--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    if args.n_parallel is not None:
        engine_args += ["--n-parallel", str(args.n_parallel)]
    if args.n_ctx is not None:
        engine_args += ["--n-ctx", str(args.n_ctx)]
    log = open(tmp / f"server-{executor}.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmbatch", "serve", "--port", str(port), "--data-dir", str(tmp / f"data-{executor}"),
         "--log-level", "warning", "--engine", "vllm", *engine_args],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    try:
        _wait_healthy(proc, port, tmp / f"server-{executor}.log")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bench", max_retries=0, timeout=600)
        client.chat.completions.create(
            model=SERVED, messages=[{"role": "user", "content": "Warm up."}], max_tokens=8, temperature=0
        )
        rows = [
            {
                "custom_id": f"row-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": SERVED, "messages": conv, "max_tokens": args.max_tokens, "temperature": 0},
            }
            for i, conv in enumerate(conversations)
        ]
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
        f = client.files.create(file=("bench.jsonl", data), purpose="batch")
        t0 = time.perf_counter()
        b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        while b.status not in ("completed", "failed", "expired", "cancelled"):
            time.sleep(0.05)
            b = client.batches.retrieve(b.id)
        seconds = time.perf_counter() - t0
        if b.status != "completed" or b.output_file_id is None:
            raise RuntimeError(f"batch ended {b.status}: {b.errors} {b.request_counts}")
        lines = [json.loads(x) for x in client.files.content(b.output_file_id).text.splitlines() if x.strip()]
        ok = [x["response"]["body"]["usage"] for x in lines if x["response"]["status_code"] == 200]
        if len(ok) != len(rows):
            errors = client.files.content(b.error_file_id).text.splitlines() if b.error_file_id else []
            raise RuntimeError(f"{len(rows) - len(ok)} rows failed, the first: {errors[:1]}")
        return {
            "seconds": seconds,
            "rows": len(ok),
            "completion_tokens": sum(u["completion_tokens"] for u in ok),
            "prompt_tokens": sum(u["prompt_tokens"] for u in ok),
        }
    finally:
        _stop(proc)
        log.close()
        if executor == "ray":
            shutil.rmtree(ray_tmp, ignore_errors=True)


def _wait_healthy(proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    deadline = time.monotonic() + 1800  # vLLM loads, compiles and captures CUDA graphs first
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-4000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not start within 30 minutes")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stops the server and waits for its vLLM processes too, so the GPU is free for the next side."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    proc.terminate()
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)
    _, alive = psutil.wait_procs(children, timeout=60)
    for child in alive:
        child.kill()


# -- main --------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.environ.get("LLMBATCH_VLLM_MODEL"), help="model directory or id")
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--n-parallel", type=int, default=None, help="vLLM max_num_seqs [vLLM's default]")
    ap.add_argument("--n-ctx", type=int, default=None, help="vLLM max_model_len [the model's]")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--executors", default="local", help="local, ray or local,ray: the server's executor(s)")
    ap.add_argument("--raw-worker", nargs=2, metavar=("CONVERSATIONS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.model:
        ap.error("give --model or set LLMBATCH_VLLM_MODEL")
    if args.raw_worker:
        raw_worker(args)
        return
    executors = [e.strip() for e in args.executors.split(",")]
    if not set(executors) <= {"local", "ray"}:
        ap.error(f"--executors: local and/or ray, not {args.executors!r}")
    _need_gpu("ray" in executors)

    conversations = build_conversations(args.rows, args.seed)
    with tempfile.TemporaryDirectory(prefix="llmbatch-bench-vllm-") as tmp_name:
        tmp = Path(tmp_name)
        conversations_path = tmp / "conversations.json"
        conversations_path.write_text(json.dumps(conversations))
        print(f"model {args.model}: {args.rows} chat rows, max_tokens {args.max_tokens}, greedy")
        servers = {executor: run_server(args, conversations, tmp, executor) for executor in executors}
        raw = run_raw(args, conversations_path, tmp)
    sides = [(f"llmbatch batch, executor {e}", r) for e, r in servers.items()] + [("raw vLLM LLM.chat", raw)]
    for name, r in sides:
        print(
            f"{name:<30} {r['seconds']:8.2f} s  {r['rows'] / r['seconds']:8.1f} rows/s  "
            f"{r['completion_tokens']:>9,} completion tokens ({r['prompt_tokens']:,} prompt)  "
            f"{r['completion_tokens'] / r['seconds']:>10,.0f} tokens/s"
        )
    for executor, r in servers.items():
        ratio = (r["completion_tokens"] / r["seconds"]) / (raw["completion_tokens"] / raw["seconds"])
        rows_ratio = (r["rows"] / r["seconds"]) / (raw["rows"] / raw["seconds"])
        verdict = "meets" if ratio >= 0.95 else "misses"
        print(
            f"ratio {executor} / raw: {ratio:.3f} in tokens/s, {rows_ratio:.3f} in rows/s ({verdict} the 0.95 target)"
        )


def _need_gpu(ray: bool) -> None:
    """Exits with a clear message where this benchmark cannot run."""
    import importlib.util

    missing = [m for m in ("vllm", *(("ray",) if ray else ())) if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f'bench_vllm.py needs {" and ".join(missing)} (and a CUDA GPU): pip install "llmbatch[vllm]"')
    import torch

    if torch.cuda.device_count() == 0:  # NVML: leaves CUDA uninitialised in this process
        sys.exit("bench_vllm.py needs a CUDA GPU, and none is visible here")


if __name__ == "__main__":
    main()
