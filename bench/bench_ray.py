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


if __name__ == "__main__":
    main()
