"""Benchmark of `llmbatch serve --executor ray` against the local executor. Prints figures; not a test.

An echo batch with --echo-latency 0.05 (latency-bound, so 2 cores still show scaling), end to end
(upload -> completed): rows/s with 1, 2 and 4 replicas (each --max-concurrency rows in flight,
--replica-cpus 0 so that 4 fit on 2 cores), and the local executor at each of the same total
concurrencies. Ratios printed: N replicas / 1 replica (target >= 1.8x at 2), and local / Ray at the
same concurrency (the Ray executor's overhead; target <= 1.2x). Ray runs in the server's process
(no --ray-address), bound to 127.0.0.1, with its temp dir under this run's.

Usage: python bench/bench_ray.py [--rows 20000] [--latency 0.05] [--concurrency 64] [--replicas 1,2,4]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, data_dir: Path, *args: str) -> None:
        self.port = free_port()
        ray_tmp = data_dir.parent / f"{data_dir.name}-ray"
        (ray_tmp / "ray").mkdir(parents=True)
        env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        log = open(data_dir.parent / f"{data_dir.name}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmbatch", "serve", "--port", str(self.port), "--data-dir", str(data_dir),
             "--log-level", "warning", "--engine", "echo", *args],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited: see {log.name}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise SystemExit("server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def write_input(path: Path, rows: int) -> None:
    with open(path, "w") as f:
        for i in range(rows):
            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"row {i}"}]}
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}))
            f.write("\n")


def rows_per_s(server: Server, input_path: Path, rows: int) -> float:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x", max_retries=0)
    with open(input_path, "rb") as fh:
        f = client.files.create(file=("input.jsonl", fh), purpose="batch")
    t0 = time.monotonic()
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    while b.status not in ("completed", "failed", "expired", "cancelled"):
        time.sleep(0.1)
        b = client.batches.retrieve(b.id)
    seconds = time.monotonic() - t0
    assert b.status == "completed" and b.request_counts and b.request_counts.completed == rows, b
    return rows / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--concurrency", type=int, default=64, help="rows in flight per replica")
    ap.add_argument("--replicas", default="1,2,4")
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
            srv = Server(tmpd / f"ray{n}", *common, "--max-concurrency", str(args.concurrency), "--executor", "ray",
                         "--replicas", str(n), "--replica-cpus", "0")  # fmt: skip
            try:
                ray_rate[n] = rows_per_s(srv, input_path, args.rows)
            finally:
                srv.stop()
            print(f"  ray, {n} replica(s): {ray_rate[n]:8.0f} rows/s  ({ray_rate[n] / (ideal * n):.2f} of ideal)")
        for n in counts:
            conc = args.concurrency * n
            srv = Server(tmpd / f"local{n}", *common, "--max-concurrency", str(conc))
            try:
                local = rows_per_s(srv, input_path, args.rows)
            finally:
                srv.stop()
            print(
                f"  local, {conc} in flight: {local:8.0f} rows/s;  local / ray ({n} replica(s)) = "
                f"{local / ray_rate[n]:.2f}x"
            )
        base = ray_rate[counts[0]]
        for n in counts[1:]:
            print(f"  scaling: {n} replicas / {counts[0]} = {ray_rate[n] / base:.2f}x")


if __name__ == "__main__":
    main()
