"""Benchmark of the response cache (`--cache`). Prints figures; not a test.

A job of N rows (default 100,000; temperature 0) runs on the local provider (echo engine, in
this process) with `--cache`, filling the cache; then a second input, the same rows under
other ids with 1% of them edited, runs with `--cache` (its answers aged a day first, as a
nightly re-run finds them). Reported: rows the second job sent (target: only the edited ones),
the time its cache lookup took before anything was planned (every pending row looked up and the
hits recorded in the job store; target: under 1 s on 2 cores), the time copying the answers'
records into the job store and marking them used took (done while the first batch runs), both
jobs' wall times, the cache's size on disk, and what computing the request keys costs per row.

Usage: python bench/bench_cache.py [--rows 100000] [--changed 0.01]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

os.environ.setdefault("LLMBATCH_ENGINE", "echo")

from llmbatch import run_file  # noqa: E402
from llmbatch._rows import request_key  # noqa: E402
from llmbatch.jobs import JobStore, ResponseCache, _runner, _session  # noqa: E402

_TEXT = "Label the sentiment of this review as positive, negative or neutral. Review: "


def body(i: int, edited: bool) -> dict[str, Any]:
    review = f"item {i}: the delivery was quick and the product works as described" + (" (edited)" if edited else "")
    return {
        "model": "gpt-4o-mini",
        "temperature": 0,
        "max_tokens": 5,
        "messages": [{"role": "user", "content": _TEXT + review}],
    }


def write(path: Path, rows: int, prefix: str, edited: set[int]) -> None:
    with open(path, "wb") as f:
        for i in range(rows):
            line = {"custom_id": f"{prefix}{i}", "method": "POST", "url": "/v1/chat/completions",
                    "body": body(i, i in edited)}  # fmt: skip
            f.write(orjson.dumps(line) + b"\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--changed", type=float, default=0.01)
    args = ap.parse_args()
    n = args.rows
    edited = set(range(0, n, max(1, round(1 / args.changed))))

    lookups: list[float] = []
    copies: list[float] = []

    def timed(module: Any, name: str, into: list[float]) -> None:
        real = getattr(module, name)

        def call(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                into.append(time.perf_counter() - t0)

        setattr(module, name, call)

    # All the cache does before planning: open it, look every pending row up, hold repeats back.
    timed(_session.JobSession, "_answer_from_cache", lookups)
    timed(_runner, "keep_answers", copies)

    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        root = Path(tmp)
        first, second = root / "first.jsonl", root / "second.jsonl"
        write(first, n, "a-", set())
        write(second, n, "b-", edited)
        cache_path = root / "cache.sqlite"
        common: dict[str, Any] = {"provider": "local", "engine": "echo", "job_dir": root / "jobs"}
        common.update(cache="deterministic", cache_path=cache_path, poll_interval=0.05)

        t0 = time.perf_counter()
        job1 = run_file(first, **common)
        t1 = time.perf_counter() - t0
        assert job1.wait() == 0

        # As a nightly re-run finds them: last used a day ago, so using them marks them again (LRU).
        db = sqlite3.connect(cache_path)
        with db:
            db.execute("UPDATE answers SET used_at = used_at - 86400")
        db.close()

        t0 = time.perf_counter()
        job2 = run_file(second, **common)
        t2 = time.perf_counter() - t0
        assert job2.wait() == 0
        store = JobStore(job2.dir / "job.sqlite")
        try:
            cached, _saved = store.from_cache()
            sent = sum(ch.rows for ch in store.chunks(("collected",)))
        finally:
            store.close()
        with ResponseCache(cache_path) as c:
            s = c.stats()

        bodies = [body(i, False) for i in range(min(n, 100_000))]
        t0 = time.perf_counter()
        for b in bodies:
            request_key("/v1/chat/completions", b)
        per_key = (time.perf_counter() - t0) / len(bodies)

    print(f"rows: {n:,}; edited in the second input: {len(edited):,} ({args.changed:.0%})")
    print(f"first job (fills the cache): {t1:.1f} s")
    print(f"second job: {t2:.1f} s; {cached:,} rows answered from the cache, {sent:,} rows sent")
    print(
        f"  before planning (the cache opened, every pending row looked up, hits recorded, repeats held): "
        f"{lookups[-1]:.2f} s"
    )
    print(f"  answers copied into the job store and marked used, while the first batch runs: {copies[-1]:.2f} s")
    print(f"cache: {s.entries:,} answers, {s.stored_bytes / 1e6:.1f} MB stored, {s.file_bytes / 1e6:.1f} MB on disk "
          f"({s.file_bytes / max(1, s.entries):.0f} bytes an answer)")  # fmt: skip
    print(f"request key when a row is read: {per_key * 1e6:.1f} us a row")
    assert sent == len(edited), f"sent {sent} rows, expected {len(edited)}"


if __name__ == "__main__":
    main()
