"""Benchmarks of `llmbatch serve`. Prints figures; not a test.

1. A 100,000-row chat batch on the echo engine, end to end (upload -> completed -> download):
   wall time, rows/s, and the server's peak RSS. Target on 2 cores: under 60 s, RSS < 300 MB.
   Also how fast the API answers while the batch runs (a batch retrieve every 50 ms).
2. The same for a batch 5x larger: peak RSS must stay flat (streaming, not whole files).
3. 100,000 rows through the `openai` forwarding engine (its aiohttp transport) against an echo
   upstream with 50 ms latency at 256 in flight, as a ratio to the ideal time
   rows x latency / concurrency. Target: within 1.5x. Both servers share the machine's cores,
   so the upstream's CPU counts against the ratio too.
4. Fairness between API keys: key B's 1-row batch, alone and then created just after key A
   queued 12 batches of 2,000 rows (--max-active-batches 4), as a ratio (behind / alone), with A's
   rows/s over its backlog; once per --scheduling mode (fair, fifo). Target: a small multiple.
5. Responsiveness: p50/p99 latency of GET /health and GET /v1/batches/{id} while the heaviest
   direct requests the server accepts run back to back (a 2,048 x 3,072 embeddings answer,
   ~130 MB; a chat request of ~3.8 MB of text), against the same figure on an idle server.
   Target: p99 under 50 ms.

Usage: python bench/bench_server.py [--rows 100000] [--big-factor 5] [--skip-big] [--skip-forward]
       [--skip-fairness] [--fairness-modes fair,fifo] [--fairness-latency 0] [--fairness-concurrency 64]
       [--skip-heavy] [--heavy-seconds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai
import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`llmbatch serve` (echo unless `args` say otherwise) in its own process, its log beside
    `data_dir`; `env` adds environment variables, `start_timeout` bounds the wait for /health."""

    def __init__(
        self, data_dir: Path, *args: str, env: dict[str, str] | None = None, start_timeout: float = 30
    ) -> None:
        self.port = free_port()
        log = open(data_dir.parent / f"{data_dir.name}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmbatch", "serve", "--port", str(self.port), "--data-dir", str(data_dir),
             "--log-level", "warning", "--engine", "echo", *args],  # a later --engine in args wins
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )  # fmt: skip
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: see {log.name}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        else:
            raise RuntimeError("server did not start")
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.peak_rss = 0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        p = psutil.Process(self.proc.pid)
        while not self._stop.is_set():
            try:
                self.peak_rss = max(self.peak_rss, p.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.02)

    def cpu_seconds(self) -> float:
        t = psutil.Process(self.proc.pid).cpu_times()
        return t.user + t.system

    def reset_peak(self) -> None:
        self.peak_rss = psutil.Process(self.proc.pid).memory_info().rss

    def close(self) -> None:
        self._stop.set()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def write_input(path: Path, rows: int) -> int:
    with open(path, "w") as f:
        for i in range(rows):
            f.write(
                json.dumps(
                    {
                        "custom_id": f"req-{i}",
                        "method": "POST",
                        "url": "/v1/chat/completions",
                        "body": {
                            "model": "gpt-4o-mini",
                            "messages": [
                                {"role": "system", "content": "You are a helpful assistant."},
                                {"role": "user", "content": f"Summarise item {i} in one short sentence, please."},
                            ],
                            "max_tokens": 64,
                        },
                    }
                )
                + "\n"
            )
    return path.stat().st_size


def run_batch(url: str, path: Path, rows: int, out_path: Path) -> dict[str, float]:
    client = openai.OpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)
    t0 = time.perf_counter()
    with open(path, "rb") as fh:
        f = client.files.create(file=(path.name, fh), purpose="batch")
    t_up = time.perf_counter()
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    latencies: list[float] = []
    while b.status not in ("completed", "failed", "expired", "cancelled"):
        time.sleep(0.05)
        t = time.perf_counter()
        b = client.batches.retrieve(b.id)
        if b.status == "in_progress":
            latencies.append(time.perf_counter() - t)
    t_done = time.perf_counter()
    if b.status != "completed":
        raise RuntimeError(f"batch ended {b.status}: {b.errors}")
    n = 0
    with client.files.with_streaming_response.content(b.output_file_id) as resp, open(out_path, "wb") as out:
        for chunk in resp.iter_bytes(1 << 20):
            out.write(chunk)
            n += chunk.count(b"\n")
    t_end = time.perf_counter()
    if n != rows or b.request_counts.completed != rows:
        raise RuntimeError(f"expected {rows} output lines, got {n} ({b.request_counts})")
    processing = (b.completed_at or 0) - (b.in_progress_at or 0)
    return {
        "upload_s": t_up - t0,
        "batch_s": t_done - t_up,
        "download_s": t_end - t_done,
        "total_s": t_end - t0,
        "server_processing_s": float(processing),
        "poll_median_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "poll_max_ms": 1000 * max(latencies) if latencies else float("nan"),
    }


def small_batch_seconds(client: openai.OpenAI, file_id: str) -> float:
    """Seconds from creating a batch to seeing it completed, polling every 10 ms."""
    t0 = time.perf_counter()
    b = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = t0 + 600
    while b.status not in ("completed", "failed", "expired", "cancelled") and time.perf_counter() < deadline:
        time.sleep(0.01)
        b = client.batches.retrieve(b.id)
    if b.status != "completed":
        raise RuntimeError(f"small batch ended {b.status}: {b.errors}")
    return time.perf_counter() - t0


def fairness(tmpd: Path, mode: str, batches: int, rows: int, latency: float, concurrency: int) -> None:
    """Key B's 1-row batch alone, then behind key A's backlog of `batches` x `rows` rows."""
    flags = [] if mode == "default" else ["--scheduling", mode]  # "default": a server without the flag
    srv = Server(
        tmpd / f"fair-{mode}", "--api-key", "key-a", "--api-key", "key-b", "--max-active-batches", "4",
        "--max-concurrency", str(concurrency), "--echo-latency", str(latency), *flags,
    )  # fmt: skip
    try:
        a = openai.OpenAI(base_url=srv.url, api_key="key-a", max_retries=0, timeout=600)
        b = openai.OpenAI(base_url=srv.url, api_key="key-b", max_retries=0, timeout=600)
        big, small = tmpd / f"fair-a-{mode}.jsonl", tmpd / f"fair-b-{mode}.jsonl"
        write_input(big, rows)
        write_input(small, 1)
        with open(big, "rb") as fh:
            a_file = a.files.create(file=(big.name, fh), purpose="batch").id
        with open(small, "rb") as fh:
            b_file = b.files.create(file=(small.name, fh), purpose="batch").id
        alone = statistics.median(small_batch_seconds(b, b_file) for _ in range(3))
        t0 = time.perf_counter()
        backlog = [
            a.batches.create(input_file_id=a_file, endpoint="/v1/chat/completions", completion_window="24h").id
            for _ in range(batches)
        ]
        behind = small_batch_seconds(b, b_file)
        for batch_id in backlog:
            while (got := a.batches.retrieve(batch_id)).status not in ("completed", "failed", "expired", "cancelled"):
                time.sleep(0.05)
            if got.status != "completed":
                raise RuntimeError(f"A's batch ended {got.status}")
        a_s = time.perf_counter() - t0
        print(
            f"fairness ({mode}): B's 1-row batch alone {alone * 1000:.0f} ms, behind A's {batches} x {rows:,} rows "
            f"{behind * 1000:.0f} ms -> {behind / alone:.1f}x; A's backlog {a_s:.1f} s = "
            f"{batches * rows / a_s:,.0f} rows/s (echo latency {latency * 1000:.0f} ms, max concurrency {concurrency})"
        )
    finally:
        srv.close()


_EMBED = {"model": "text-embedding-3-large", "input": [f"text {i}" for i in range(2048)], "dimensions": 3072}
_CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "lorem ipsum dolor sit amet\n" * 140_000}]}
HEAVY_REQUESTS = [("/v1/embeddings", _EMBED), ("/v1/chat/completions", _CHAT)]


def post_and_drain(port: int, path: str, body: bytes) -> int:
    """POSTs `body` and reads the answer off a plain socket (no client-side parsing); its status."""
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(head.encode() + b"Connection: close\r\n\r\n" + body)
        buf = bytearray(1 << 20)
        first = b""
        while n := sock.recv_into(buf):
            first = first or bytes(buf[: min(n, 12)])
    return int(first[9:12])


def poll_latencies(port: int, batch_id: str, seconds: float) -> list[float]:
    """Latencies of GET /health and GET /v1/batches/{id}, one of each every 10 ms, for `seconds`."""
    latencies = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for path in ("/health", f"/v1/batches/{batch_id}"):
                t = time.perf_counter()
                http.get(path).raise_for_status()
                latencies.append(time.perf_counter() - t)
            time.sleep(0.01)
    return sorted(latencies)


def responsiveness(server: Server, seconds: float) -> None:
    port = server.port
    client = openai.OpenAI(base_url=server.url, api_key="bench", max_retries=0)
    row = {"custom_id": "r", "method": "POST", "url": "/v1/chat/completions",
           "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}}  # fmt: skip
    f = client.files.create(file=("in.jsonl", json.dumps(row).encode()), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")

    def pct(xs: list[float], q: float) -> float:
        return 1000 * xs[min(len(xs) - 1, int(len(xs) * q))]

    idle = poll_latencies(port, batch.id, seconds)
    stop = threading.Event()
    answered: list[int] = []

    def heavy(path: str, body: bytes) -> None:
        while not stop.is_set():
            answered.append(post_and_drain(port, path, body))

    workers = [threading.Thread(target=heavy, args=(p, json.dumps(b).encode())) for p, b in HEAVY_REQUESTS]
    for w in workers:
        w.start()
    try:
        loaded = poll_latencies(port, batch.id, seconds)
    finally:
        stop.set()
        for w in workers:
            w.join()
    if set(answered) != {200}:
        raise RuntimeError(f"heavy requests answered {sorted(set(answered))}")
    print(
        f"polls (GET /health, GET batch) idle: p50 {pct(idle, 0.5):.1f} ms, p99 {pct(idle, 0.99):.1f} ms; "
        f"while the heaviest direct requests run ({len(answered)} answered in {seconds:.0f} s): "
        f"p50 {pct(loaded, 0.5):.1f} ms, p99 {pct(loaded, 0.99):.1f} ms, max {pct(loaded, 1.0):.1f} ms "
        f"(target p99 < 50 ms)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--big-factor", type=int, default=5)
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--skip-forward", action="store_true")
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--skip-fairness", action="store_true")
    ap.add_argument("--fairness-modes", default="fair,fifo", help="comma-separated; 'default' passes no --scheduling")
    ap.add_argument("--fairness-latency", type=float, default=0.0, help="echo latency in the fairness section")
    ap.add_argument("--fairness-concurrency", type=int, default=64, help="--max-concurrency in the fairness section")
    ap.add_argument("--skip-heavy", action="store_true")
    ap.add_argument("--heavy-seconds", type=float, default=10.0)
    args = ap.parse_args()
    limits = ["--max-lines", "10000000", "--max-file-size", "4GB"]

    with tempfile.TemporaryDirectory(prefix="llmbatch-bench-") as tmp:
        tmpd = Path(tmp)
        print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}, load {os.getloadavg()[0]:.1f}")

        # 5 first (it is short): poll latency while the heaviest direct requests run.
        if not args.skip_heavy:
            heavy_server = Server(tmpd / "heavy")
            try:
                responsiveness(heavy_server, args.heavy_seconds)
            finally:
                heavy_server.close()

        # 1 + 2: echo engine, end to end, and peak RSS at two sizes.
        echo = Server(tmpd / "echo", *limits, "--max-concurrency", "256")
        try:
            sizes = [args.rows] + ([] if args.skip_big else [args.rows * args.big_factor])
            rss = {}
            for rows in sizes:
                inp = tmpd / f"in-{rows}.jsonl"
                size = write_input(inp, rows)
                echo.reset_peak()
                cpu0 = echo.cpu_seconds()
                r = run_batch(echo.url, inp, rows, tmpd / f"out-{rows}.jsonl")
                cpu = echo.cpu_seconds() - cpu0
                rss[rows] = echo.peak_rss
                print(
                    f"echo {rows:>9,} rows ({size / 1e6:,.0f} MB in): total {r['total_s']:6.1f} s "
                    f"(upload {r['upload_s']:.1f}, batch {r['batch_s']:.1f}, download {r['download_s']:.1f}) "
                    f"= {rows / r['total_s']:,.0f} rows/s; server peak RSS {echo.peak_rss / 2**20:,.0f} MiB; "
                    f"a poll while it runs: median {r['poll_median_ms']:.1f} ms, max {r['poll_max_ms']:.1f} ms; "
                    f"server CPU {1e6 * cpu / rows:.0f} us/row"
                )
                inp.unlink()
            if len(rss) == 2:
                a, b = sizes
                print(f"peak RSS ratio {b:,} / {a:,} rows: {rss[b] / rss[a]:.2f}x (flat means close to 1.0)")
        finally:
            echo.close()

        # 3: forwarding engine against an echo upstream with latency.
        if not args.skip_forward:
            rows = args.rows
            upstream = Server(tmpd / "upstream", "--echo-latency", str(args.latency))
            fwd = Server(
                tmpd / "forward", *limits, "--engine", "openai", "--upstream-url", upstream.url,
                "--max-concurrency", str(args.concurrency),
            )  # fmt: skip
            try:
                inp = tmpd / "in-forward.jsonl"
                write_input(inp, rows)
                cpu0 = fwd.cpu_seconds(), upstream.cpu_seconds()
                r = run_batch(fwd.url, inp, rows, tmpd / "out-forward.jsonl")
                cpu = fwd.cpu_seconds() - cpu0[0], upstream.cpu_seconds() - cpu0[1]
                ideal = rows * args.latency / args.concurrency
                print(
                    f"forward (aiohttp) {rows:,} rows at {args.concurrency} in flight, "
                    f"upstream latency {args.latency * 1000:.0f} ms: "
                    f"batch {r['batch_s']:.1f} s vs ideal {ideal:.1f} s -> aiohttp/ideal {r['batch_s'] / ideal:.2f}x "
                    f"(end to end incl. upload/download {r['total_s']:.1f} s -> {r['total_s'] / ideal:.2f}x); "
                    f"batch server peak RSS {fwd.peak_rss / 2**20:,.0f} MiB; CPU seconds: batch server "
                    f"{cpu[0]:.1f} ({1e6 * cpu[0] / rows:.0f} us/row), upstream {cpu[1]:.1f} "
                    f"({(os.cpu_count() or 1) * r['total_s']:.0f} available on {os.cpu_count()} cores)"
                )
            finally:
                fwd.close()
                upstream.close()

        # 4: fairness between keys.
        if not args.skip_fairness:
            for mode in args.fairness_modes.split(","):
                fairness(tmpd, mode.strip(), 12, 2000, args.fairness_latency, args.fairness_concurrency)


if __name__ == "__main__":
    main()
