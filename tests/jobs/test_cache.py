"""The response cache across jobs (`--cache`): real CLI runs against real `llmbatch serve`
processes (what the server was sent is what was paid for), the Python API, and the cache's
SQLite file shared by processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from test_run_cli import content, llmbatch, read_lines, run_openai, sent_custom_ids, write_input

from conftest import chat_line
from llmbatch import run_file
from llmbatch.jobs import JobSettings, JobStore, ResponseCache, cache_scope
from llmbatch.jobs._cache import Entry


def _rows(prefix: str, n: int, changed: set[int] = frozenset(), **body: Any) -> list[dict[str, Any]]:  # type: ignore[assignment]
    """`n` rows at temperature 0 capped at 1,000 tokens; ids start with `prefix` (ids are not
    part of a request's key), the texts of the `changed` rows differ."""
    body = {"temperature": 0, "max_tokens": 1000, **body}
    return [
        chat_line(f"{prefix}{i}", f"question {i}" + (" (edited)" if i in changed else ""), **body) for i in range(n)
    ]


def _job_of(tmp_path: Path, inp: Path) -> str:
    """The id of the job that ran `inp`."""
    for d in (tmp_path / "home" / "jobs").iterdir():
        store = JobStore(d / "job.sqlite")
        try:
            if (job := store.job()) and job["inputs"][0]["path"] == str(inp.resolve()):
                return str(job["id"])
        finally:
            store.close()
    raise AssertionError(f"no job ran {inp}")


def _sent(server: Any, prefix: str) -> list[str]:
    """The ids starting with `prefix` that the server was sent, sorted."""
    return sorted(i for i in sent_custom_ids(server) if i.startswith(prefix))


def _cache_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["--cache", *extra, "--cache-path", str(tmp_path / "cache.sqlite")]


def test_a_rerun_sends_only_the_rows_it_has_no_answer_for(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = server_factory()
    first = _rows("a-", 20)
    proc = run_openai(tmp_path, write_input(tmp_path, first, "first.jsonl"), server, *_cache_args(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert len(sent_custom_ids(server)) == 20

    # Other ids, two rows edited. The cap passes 2 rows' estimate ($0.0003 each at gpt-4o-mini's
    # batch price) and not 20's: the budget counts only what is sent.
    second = _rows("b-", 20, changed={4, 11})
    inp = write_input(tmp_path, second, "second.jsonl")
    # `estimate` says beforehand what `run --cache` will send; it only reads the cache.
    with ResponseCache(tmp_path / "cache.sqlite") as c:
        before = c.stats()
    est = llmbatch(
        tmp_path, "estimate", str(inp), "--provider", "openai", "--base-url", server.base_url, *_cache_args(tmp_path)
    )
    assert est.returncode == 0, est.stderr
    assert "Estimate: 2 rows" in est.stdout and "Cache: 18 rows answered from the response cache" in est.stdout
    with ResponseCache(tmp_path / "cache.sqlite") as c:
        assert c.stats().hits == before.hits == 0
    elsewhere = llmbatch(tmp_path, "estimate", str(inp), "--provider", "openai", *_cache_args(tmp_path))
    assert "Estimate: 20 rows" in elsewhere.stdout and "Cache:" not in elsewhere.stdout  # another server's answers
    proc = run_openai(tmp_path, inp, server, *_cache_args(tmp_path), "--max-cost", "0.002")
    assert proc.returncode == 0, proc.stderr
    assert _sent(server, "b-") == ["b-11", "b-4"]
    assert "Estimate: 2 rows" in proc.stderr
    assert "Cache: 18 rows answered from the response cache" in proc.stderr
    with ResponseCache(tmp_path / "cache.sqlite") as c:
        assert c.stats().hits == 18

    out = read_lines(tmp_path / "second.results.jsonl")
    assert [r["custom_id"] for r in out] == [r["custom_id"] for r in second]
    assert [content(r) for r in out] == [r["body"]["messages"][0]["content"] for r in second]
    assert [bool(r.get("cached")) for r in out] == [i not in (4, 11) for i in range(20)]
    first_out = {r["custom_id"]: r for r in read_lines(tmp_path / "first.results.jsonl")}
    for rec in out:
        if rec.get("cached"):  # the answer's own usage, under an id of this job's own
            assert (
                rec["response"]["body"]["usage"] == first_out["a-" + rec["custom_id"][2:]]["response"]["body"]["usage"]
            )
            assert rec["id"].startswith("batch_req_") and rec["id"] not in {r["id"] for r in first_out.values()}
    assert len({r["id"] for r in out}) == 20

    status = llmbatch(tmp_path, "status", _job_of(tmp_path, inp), "--json")
    data = json.loads(status.stdout)
    assert data["from_cache"] == 18 and data["rows"]["succeeded"] == 20
    assert data["estimate"]["output_tokens"] == 2000  # the two rows sent, not the twenty


def test_a_job_run_again_with_cache_keeps_the_answers_it_already_has(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Run first without --cache, then the same input again with it (the README's order): the
    job's answers go into the cache then, without sending anything again, and the next job finds them."""
    server = server_factory()
    inp = write_input(tmp_path, _rows("a-", 6), "first.jsonl")
    assert run_openai(tmp_path, inp, server).returncode == 0
    again = run_openai(tmp_path, inp, server, *_cache_args(tmp_path))
    assert again.returncode == 0, again.stderr
    assert "cache: kept the answers of 6 rows this job answered before" in again.stderr
    assert len(sent_custom_ids(server)) == 6  # nothing sent twice
    with ResponseCache(tmp_path / "cache.sqlite") as c:
        assert c.stats().entries == 6
    third = run_openai(tmp_path, inp, server, *_cache_args(tmp_path))  # the same cache: nothing to keep
    assert third.returncode == 0 and "kept the answers" not in third.stderr
    edited = write_input(tmp_path, _rows("b-", 6, changed={2}), "second.jsonl")
    proc = run_openai(tmp_path, edited, server, *_cache_args(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert _sent(server, "b-") == ["b-2"]


def test_rows_repeating_an_earlier_row_are_sent_once(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """With --cache, a row that repeats an earlier row of the same job (another id, the same
    request) is not sent: it takes the first one's answer once that is in. Sampled rows are each
    sent: asking twice is how a job samples twice."""
    server = server_factory()
    rows = _rows("a-", 4) + _rows("b-", 4)  # b-i repeats a-i
    rows += [chat_line("s-0", "pick a number"), chat_line("s-1", "pick a number")]  # sampled (temperature 1)
    inp = write_input(tmp_path, rows, "repeats.jsonl")
    est = llmbatch(tmp_path, "estimate", str(inp), "--provider", "openai", *_cache_args(tmp_path))
    assert "Estimate: 6 rows" in est.stdout and "Repeats: 4 rows repeat an earlier row" in est.stdout, est.stdout
    proc = run_openai(tmp_path, inp, server, *_cache_args(tmp_path), "--batch-size", "100")
    assert proc.returncode == 0, proc.stderr
    assert sorted(sent_custom_ids(server)) == ["a-0", "a-1", "a-2", "a-3", "s-0", "s-1"]
    assert "Estimate: 6 rows" in proc.stderr and "Repeats: 4 rows repeat an earlier row" in proc.stderr
    out = read_lines(tmp_path / "repeats.results.jsonl")
    assert [r["custom_id"] for r in out] == [r["custom_id"] for r in rows]
    assert [content(r) for r in out] == [r["body"]["messages"][0]["content"] for r in rows]
    assert [bool(r.get("cached")) for r in out] == [False] * 4 + [True] * 4 + [False] * 2
    by_id = {r["custom_id"]: r for r in out}
    for i in range(4):  # the first's own usage, under an id of the repeat's own
        assert by_id[f"b-{i}"]["response"]["body"]["usage"] == by_id[f"a-{i}"]["response"]["body"]["usage"]
    assert len({r["id"] for r in out}) == len(rows)
    data = json.loads(llmbatch(tmp_path, "status", _job_of(tmp_path, inp), "--json").stdout)
    assert data["from_cache"] == 4 and data["rows"]["succeeded"] == 10

    # Without --cache, every row is sent.
    plain = write_input(tmp_path, _rows("c-", 2) + _rows("d-", 2), "plain.jsonl")
    assert run_openai(tmp_path, plain, server).returncode == 0
    assert _sent(server, "c-") == ["c-0", "c-1"] and _sent(server, "d-") == ["d-0", "d-1"]


def test_sampled_answers_are_reused_only_with_cache_all(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = server_factory()

    # Rows 0-3 sample (no temperature: the APIs' default is 1; or 0.7), 4-5 have a seed, 6 is at 0.
    def rows(prefix: str) -> list[dict[str, Any]]:
        made = [chat_line(f"{prefix}{i}", f"hello {i}") for i in range(7)]
        made[1]["body"]["temperature"] = 0.7
        made[4]["body"]["seed"] = made[5]["body"]["seed"] = 7
        made[6]["body"]["temperature"] = 0
        return made

    proc = run_openai(tmp_path, write_input(tmp_path, rows("a-"), "a.jsonl"), server, *_cache_args(tmp_path, "all"))
    assert proc.returncode == 0, proc.stderr
    proc = run_openai(tmp_path, write_input(tmp_path, rows("b-"), "b.jsonl"), server, *_cache_args(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert _sent(server, "b-") == ["b-0", "b-1", "b-2", "b-3"]
    out = read_lines(tmp_path / "b.results.jsonl")
    assert [bool(r.get("cached")) for r in out] == [False] * 4 + [True] * 3

    proc = run_openai(tmp_path, write_input(tmp_path, rows("c-"), "c.jsonl"), server, *_cache_args(tmp_path, "all"))
    assert proc.returncode == 0, proc.stderr
    assert _sent(server, "c-") == []


def test_the_python_api_reads_and_fills_the_cache(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = server_factory()
    cache = tmp_path / "cache.sqlite"
    common = {"provider": "openai", "base_url": server.base_url, "api_key": "test", "job_dir": tmp_path / "jobs",
              "cache": "deterministic", "cache_path": cache, "poll_interval": 0.05, "keep_uploads": True}  # fmt: skip
    assert run_file(write_input(tmp_path, _rows("a-", 6), "a.jsonl"), **common).wait() == 0
    job = run_file(write_input(tmp_path, _rows("b-", 6, changed={2}), "b.jsonl"), **common)
    assert job.wait() == 0
    assert _sent(server, "b-") == ["b-2"]
    records = list(job.results())
    assert [r["custom_id"] for r in records] == [f"b-{i}" for i in range(6)]
    assert [bool(r.get("cached")) for r in records] == [i != 2 for i in range(6)]


def test_another_provider_or_server_has_answers_of_its_own(tmp_path: Path) -> None:
    one = cache_scope(JobSettings(provider="openai", base_url="http://127.0.0.1:1/v1"))
    other = cache_scope(JobSettings(provider="openai", base_url="http://127.0.0.1:2/v1"))
    local = cache_scope(JobSettings(provider="local", engine="echo"))
    assert len({one, other, local, cache_scope(JobSettings(provider="groq"))}) == 4
    with ResponseCache(tmp_path / "c.sqlite") as c:
        c.store(one, [_entry(b"k" * 16)])
        assert set(c.lookup(one, [b"k" * 16])) == {b"k" * 16}
        assert c.lookup(other, [b"k" * 16]) == {} and c.lookup(local, [b"k" * 16]) == {}


def _entry(key: bytes, size: int = 0) -> Entry:
    text = os.urandom(size).hex().encode()  # random hex: compresses to a little over `size` bytes
    return Entry(key, "/v1/chat/completions", "m", b'{"response":{"x":"' + text + b'"},"error":null}', 1, 2, 0, 0, 0.5)


def test_the_answers_used_least_recently_are_evicted_past_the_bound(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    with ResponseCache(path, max_size=10_000) as c:
        c.touch_after = 0  # every use marks (by default: once an hour)
        keys = [i.to_bytes(16, "big") for i in range(30)]
        for key in keys[:8]:
            c.store("s", [_entry(key, 900)])
        time.sleep(0.01)
        assert set(c.lookup("s", [keys[0]])) == {keys[0]}  # used again: now the most recent
        for key in keys[8:12]:
            time.sleep(0.002)
            c.store("s", [_entry(key, 900)])
        s = c.stats()
        assert s.stored_bytes <= 10_000 and s.entries < 12
        kept = set(c.lookup("s", keys[:12]))
        assert keys[0] in kept and keys[11] in kept
        assert keys[1] not in kept  # the oldest of those never used again went first
        c.clear()
        assert c.stats().entries == 0 and c.lookup("s", keys) == {}


_WRITER = """
import sys, time
from pathlib import Path
from llmbatch.jobs import ResponseCache
from llmbatch.jobs._cache import Entry
n, path = int(sys.argv[1]), Path(sys.argv[2])
with ResponseCache(path) as c:
    for i in range(200):
        key = (n * 1000 + i).to_bytes(16, "big")
        c.store("s", [Entry(key, "/v1/chat/completions", "m", b'{"response":1}', 1, 1, 0, 0, 0.0)])
        assert key in c.lookup("s", [key, (i).to_bytes(16, "big")])
"""


def test_two_processes_share_one_cache(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(n), str(path)], stderr=subprocess.PIPE, text=True)
        for n in (1, 2)
    ]
    for p in procs:
        _out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    with ResponseCache(path) as c:
        assert c.stats().entries == 400


def test_cache_commands(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    with ResponseCache(path) as c:
        c.store("openai http://127.0.0.1:1/v1", [_entry(i.to_bytes(16, "big")) for i in range(3)])
    where = ["--cache-path", str(path)]
    stats = json.loads(llmbatch(tmp_path, "cache", "stats", "--json", *where).stdout)
    assert stats["entries"] == 3 and stats["file_bytes"] > 0 and stats["cost"] == 1.5
    assert stats["by_scope"] == {"openai http://127.0.0.1:1/v1": 3} and stats["hits"] == 0
    exported = tmp_path / "export.jsonl"
    assert llmbatch(tmp_path, "cache", "export", "-o", str(exported), *where).returncode == 0
    lines = read_lines(exported)
    assert [r["key"] for r in lines] == [i.to_bytes(16, "big").hex() for i in range(3)]
    assert lines[0]["result"] == {"response": {"x": ""}, "error": None} and lines[0]["usage"]["output_tokens"] == 2
    proc = llmbatch(tmp_path, "cache", "clear", *where)
    assert proc.returncode == 0 and "cleared 3 answers" in proc.stderr
    assert json.loads(llmbatch(tmp_path, "cache", "stats", "--json", *where).stdout)["entries"] == 0
    bad = llmbatch(tmp_path, "run", str(tmp_path / "input.jsonl"), "--cache-max-size", "lots")
    assert bad.returncode == 2 and "invalid size 'lots'" in bad.stderr
