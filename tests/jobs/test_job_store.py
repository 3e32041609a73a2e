"""JobStore (src/llmbatch/jobs/_store.py): planning, guarded chunk transitions, collecting."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import orjson
import pytest

from llmbatch._exceptions import DamagedResults, StateError
from llmbatch.jobs import CheckedRow, JobStore, ResponseCache, ResultReader, ResultRef
from llmbatch.jobs._cache import Entry, answer_from_cache, keep_answers
from llmbatch.jobs._export import _OPEN_MAPS
from llmbatch.jobs._records import Failure, InputRow, Outcome, Retry, Success

CHAT = "/v1/chat/completions"
MODEL = "gpt-4o-mini"


def row_tuple(idx: int, state: str = "pending", custom_id: str | None = None) -> InputRow:
    """A row as reading an input makes it."""
    checked = CheckedRow(custom_id or f"row-{idx}", None, 0, CHAT, MODEL, 10, 20, 0, state, None)
    return InputRow.of(idx, 0, idx + 1, idx * 100, 99, checked)


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = JobStore(tmp_path / "job.sqlite")
    s.create_job("job_test", [{"path": str(tmp_path / "in.jsonl"), "size": 1, "mtime_ns": 1}], {"provider": "local"})
    s.insert_checked([row_tuple(i) for i in range(5)], ["in.jsonl"])
    yield s
    s.close()


def rows(store: JobStore) -> dict[int, tuple[str, int, int | None, str | None]]:
    """idx -> (state, attempts, chunk_id, error), read by a connection of the test's own."""
    db = sqlite3.connect(store.path)
    try:
        return {
            idx: (state, attempts, chunk_id, error)
            for idx, state, attempts, chunk_id, error in db.execute(
                "SELECT idx, state, attempts, chunk_id, error FROM rows ORDER BY idx"
            )
        }
    finally:
        db.close()


def execute(store: JobStore, *statements: str) -> None:
    """Runs `statements` in one transaction on a connection of the test's own, as a row that
    another release or another process wrote would be."""
    db = sqlite3.connect(store.path)
    try:
        with db:
            for statement in statements:
                db.execute(statement)
    finally:
        db.close()


def plan(store: JobStore, tag: str, idxs: list[int]) -> int:
    return store.plan_chunk(tag, CHAT, MODEL, idxs, 99 * len(idxs), 10 * len(idxs), 20 * len(idxs), 0.5)


def submit(store: JobStore, chunk_id: int) -> None:
    """planned -> uploading -> uploaded -> creating -> submitted, as the runner does."""
    store.move_chunk(chunk_id, "uploading", ("planned",))
    store.move_chunk(chunk_id, "uploaded", ("uploading",), file_id="file-1")
    store.move_chunk(chunk_id, "creating", ("uploaded",))
    store.move_chunk(chunk_id, "submitted", ("creating",), batch_id="batch-1", remote_status="validating")


def test_replan_chunk_gives_rows_back_and_fails_those_no_batch_takes(store: JobStore) -> None:
    cid = plan(store, "job_test-c00001", [0, 1, 2])
    store.move_chunk(cid, "uploading", ("planned",))
    with pytest.raises(StateError):  # a chunk that may be a batch is never re-planned
        store.replan_chunk(cid, ("creating",), "refused")
    failed = [Failure(b'{"custom_id": "row-1"}', "request_too_large: too large", 1)]
    assert store.replan_chunk(cid, ("uploading",), "chunk 1: refused as too large", failed) == 2
    r = rows(store)
    assert [r[i] for i in (0, 2)] == [("pending", 0, None, None)] * 2  # the attempt given back
    assert r[1][0] == "failed" and r[1][3] == "request_too_large: too large"
    (chunk,) = store.chunks()
    assert chunk.state == "abandoned" and not store.create_tried(cid)
    assert store.estimated_cost() == 0  # its rows will be in the chunks planned next, counted there
    assert [idx for idx, *_ in store.pending_rows(CHAT, MODEL)] == [0, 2, 3, 4]
    assert any(kind == "replan" and "refused" in message for _at, kind, _c, message in store.events())

    cid2 = plan(store, "job_test-c00002", [0, 2])
    store.move_chunk(cid2, "uploading", ("planned",))
    store.move_chunk(cid2, "uploaded", ("uploading",), file_id="file-1")
    store.move_chunk(cid2, "creating", ("uploaded",))
    store.move_chunk(cid2, "uploaded", ("creating",), "no batch found")
    assert store.create_tried(cid2)


def test_job_round_trip(store: JobStore) -> None:
    job = store.job()
    assert job is not None
    assert job["id"] == "job_test" and job["status"] == "ingesting" and job["settings"] == {"provider": "local"}
    store.set_job(status="running", settings={"provider": "openai"})
    job = store.job()
    assert job is not None and job["status"] == "running" and job["settings"] == {"provider": "openai"}
    assert store.counts() == {"pending": 5, "queued": 0, "succeeded": 0, "failed": 0, "invalid": 0}


def test_plan_chunk_queues_rows_and_counts_attempts(store: JobStore) -> None:
    cid = plan(store, "job_test-c00001", [0, 1, 2])
    r = rows(store)
    assert [r[i][:3] for i in (0, 1, 2)] == [("queued", 1, cid)] * 3
    assert [r[i][:3] for i in (3, 4)] == [("pending", 0, None)] * 2
    assert store.counts()["queued"] == 3
    (chunk,) = store.chunks()
    assert (chunk.id, chunk.tag, chunk.state, chunk.rows) == (cid, "job_test-c00001", "planned", 3)
    assert (chunk.est_input, chunk.est_output, chunk.est_cost) == (30, 60, 0.5)
    assert store.estimated_cost() == 0.5
    assert [idx for idx, *_ in store.chunk_rows(cid)] == [0, 1, 2]
    assert [idx for idx, *_ in store.pending_rows(CHAT, MODEL)] == [3, 4]

    # A row already queued elsewhere is not taken again, nor counted again: the plan is
    # refused whole (no chunk, no row touched).
    with pytest.raises(StateError):
        plan(store, "job_test-c00002", [2, 3])
    r = rows(store)
    assert r[2][:3] == ("queued", 1, cid)
    assert r[3][:3] == ("pending", 0, None)
    assert len(store.chunks()) == 1
    cid2 = plan(store, "job_test-c00002", [3, 4])
    assert [rows(store)[i][:3] for i in (3, 4)] == [("queued", 1, cid2)] * 2

    # A row sent back to pending and planned again has its second attempt counted.
    submit(store, cid)
    store.collect(cid, Outcome(3, retry=[Retry("HTTP 500: boom", 0)]), "completed")
    assert rows(store)[0] == ("pending", 1, None, "HTTP 500: boom")
    cid3 = plan(store, "job_test-c00003", [0])
    assert rows(store)[0][:3] == ("queued", 2, cid3)


def test_plan_chunk_tags_are_unique(store: JobStore) -> None:
    plan(store, "job_test-c00001", [0])
    with pytest.raises(Exception):  # noqa: B017 - sqlite3.IntegrityError
        plan(store, "job_test-c00001", [1])
    # The failed plan left nothing behind: the row is still pending, one chunk exists.
    assert rows(store)[1][:3] == ("pending", 0, None)
    assert len(store.chunks()) == 1


def test_move_chunk_guards_its_state(store: JobStore) -> None:
    cid = plan(store, "job_test-c00001", [0, 1])
    with pytest.raises(StateError):
        store.move_chunk(cid, "uploaded", ("uploading",), file_id="file-x")
    (chunk,) = store.chunks()
    assert chunk.state == "planned" and chunk.file_id is None  # nothing changed

    store.move_chunk(cid, "uploading", ("planned",), intent_at=123)
    assert store.chunks(("uploading",))[0].intent_at == 123
    with pytest.raises(StateError):
        store.move_chunk(cid, "uploading", ("planned",))  # not twice
    with pytest.raises(StateError):
        store.move_chunk(999, "uploading", ("planned",))  # no such chunk
    store.move_chunk(cid, "uploaded", ("uploading",), file_id="file-1")
    store.move_chunk(cid, "creating", ("uploaded",))
    store.move_chunk(cid, "submitted", ("creating",), batch_id="batch-1", remote_status="validating")
    (chunk,) = store.chunks()
    assert (chunk.state, chunk.file_id, chunk.batch_id, chunk.remote_status) == (
        "submitted", "file-1", "batch-1", "validating",
    )  # fmt: skip
    assert store.chunks(("planned", "uploaded")) == []
    assert [c.id for c in store.chunks(("submitted",))] == [cid]
    # The transitions were recorded as events.
    kinds = [kind for _at, kind, chunk_id, _msg in store.events(100) if chunk_id == cid]
    assert kinds == ["plan", "uploading", "uploaded", "creating", "submitted"]


def test_collect_applies_results(store: JobStore) -> None:
    cid = plan(store, "job_test-c00001", [0, 1, 2, 3])
    submit(store, cid)
    outcome = Outcome(
        3,
        succeeded=[Success(b'{"ok": 0}', 11, 5, 2, 1, 0.25, 0), Success(b'{"ok": 1}', 9, 4, 0, 0, 0.125, 1)],
        retry=[Retry("HTTP 429: slow down", 2)],
        failed=[Failure(b'{"bad": 3}', "HTTP 400: no messages", 3)],
    )
    store.collect(cid, outcome, remote_status="completed")
    r = rows(store)
    assert r[0] == ("succeeded", 1, cid, None)
    assert r[1] == ("succeeded", 1, cid, None)
    assert r[2] == ("pending", 1, None, "HTTP 429: slow down")
    assert r[3] == ("failed", 1, cid, "HTTP 400: no messages")
    assert r[4] == ("pending", 0, None, None)
    results = {row.idx: row.result for row in store.export_rows()}
    assert results[0] == b'{"ok": 0}' and results[3] == b'{"bad": 3}' and results[2] is None
    assert store.counts() == {"pending": 2, "queued": 0, "succeeded": 2, "failed": 1, "invalid": 0}
    assert store.totals() == {
        "input_tokens": 20, "output_tokens": 9, "cached_tokens": 2, "reasoning_tokens": 1, "cost": 0.375,
    }  # fmt: skip
    (chunk,) = store.chunks()
    assert (chunk.state, chunk.remote_status) == ("collected", "completed")
    assert chunk.finished_at is not None
    assert store.in_flight_cost() == 0

    # Collecting the same chunk again is refused and changes nothing.
    with pytest.raises(StateError):
        store.collect(cid, Outcome(3, succeeded=[Success(b'{"again": 2}', 1, 1, 0, 0, 9.0, 2)]), "completed")
    assert rows(store)[2] == ("pending", 1, None, "HTTP 429: slow down")
    assert store.totals()["cost"] == 0.375


def test_collect_refuses_a_chunk_not_submitted(store: JobStore) -> None:
    cid = plan(store, "job_test-c00001", [0, 1])
    store.move_chunk(cid, "uploading", ("planned",))
    store.move_chunk(cid, "uploaded", ("uploading",), file_id="file-1")
    with pytest.raises(StateError):
        store.collect(
            cid, Outcome(3, succeeded=[Success(b'{"ok": 0}', 1, 1, 0, 0, 0.1, 0)], retry=[Retry("x", 1)]), "completed"
        )
    # The whole transaction was rolled back: the rows are untouched.
    r = rows(store)
    assert r[0] == ("queued", 1, cid, None) and r[1] == ("queued", 1, cid, None)
    assert store.totals()["cost"] == 0
    assert store.chunks()[0].state == "uploaded"
    assert store.in_flight_cost() == 0.5


def test_collect_only_touches_queued_rows(store: JobStore) -> None:
    cid = plan(store, "job_test-c00001", [0, 1])
    submit(store, cid)
    # Row 4 was never queued: a stray result for it must not mark it.
    outcome = Outcome(3, succeeded=[Success(b"{}", 1, 1, 0, 0, 0.1, 0), Success(b"{}", 1, 1, 0, 0, 0.1, 4)])
    outcome.failed.append(Failure(b"{}", "e", 1))
    store.collect(cid, outcome, "completed")
    r = rows(store)
    assert r[0][0] == "succeeded" and r[1][0] == "failed" and r[4] == ("pending", 0, None, None)
    assert store.totals()["cost"] == pytest.approx(0.1)


def test_reopening_keeps_state(tmp_path: Path) -> None:
    first = JobStore(tmp_path / "job.sqlite")
    first.create_job("job_test", [], {})
    first.insert_checked([row_tuple(0), row_tuple(1)], ["in.jsonl"])
    cid = plan(first, "job_test-c00001", [0])
    first.close()
    again = JobStore(tmp_path / "job.sqlite")
    try:
        job = again.job()
        assert job is not None and job["id"] == "job_test"
        assert rows(again)[0][:3] == ("queued", 1, cid)
        assert [c.tag for c in again.chunks()] == ["job_test-c00001"]
    finally:
        again.close()


def test_result_reader_keeps_few_files_mapped(store: JobStore, tmp_path: Path) -> None:
    """Reading results across many downloaded files maps only a few at once (a long job's export
    would otherwise hold every file's pages), and each line still comes out whole."""
    (tmp_path / "results").mkdir()
    refs = []
    for n in range(3 * _OPEN_MAPS):
        line = f'{{"custom_id": "r{n}"}}'.encode()
        data = b"junk\n" + line + b"\n"
        (tmp_path / "results" / f"f{n}.jsonl").write_bytes(data)
        file = store.result_file(f"results/f{n}.jsonl", len(data), hashlib.sha256(data).hexdigest(), f"file-{n}", 1)
        refs.append((ResultRef(file, 5, len(line)), line))
    with ResultReader(store) as reader:
        for ref, line in [*refs, *reversed(refs), *refs[:2] * 3]:
            assert reader.line(ref) == line
            assert len(reader.maps) <= _OPEN_MAPS
        assert reader.line(b"inline bytes") == b"inline bytes"
    assert not reader.maps


def test_result_reader_refuses_a_line_past_the_end_of_a_cut_file(store: JobStore, tmp_path: Path) -> None:
    """The reader the batching client uses hands out no part of a line from a file cut short."""
    (tmp_path / "results").mkdir()
    data = b'{"custom_id": "a"}\n{"custom_id": "b"}\n'
    path = tmp_path / "results" / "f.jsonl"
    path.write_bytes(data[:25])
    file = store.result_file("results/f.jsonl", len(data), hashlib.sha256(data).hexdigest(), "file-1", 1)
    with ResultReader(store) as reader:
        assert reader.line(ResultRef(file, 0, 18)) == b'{"custom_id": "a"}'
        with pytest.raises(DamagedResults, match="cut short"):
            reader.line(ResultRef(file, 19, 18))


def _cached(store: JobStore, cache: ResponseCache, answered: list[int]) -> None:
    """Gives rows their custom_ids as request keys and keeps an answer in `cache` for rows `answered`."""
    execute(store, "UPDATE rows SET request_key = CAST(custom_id AS BLOB), sampled = 0")
    record = {"response": {"status_code": 200, "body": {"answer": "é"}}, "error": None}
    cache.store(
        "s", [Entry(f"row-{i}".encode(), CHAT, MODEL, orjson.dumps(record), 3, 4, 0, 0, 0.25) for i in answered]
    )


def test_the_cache_answers_only_rows_still_with_the_jobs_own_provider(store: JobStore, tmp_path: Path) -> None:
    """A row moved to a fallback (lane 1) keeps the key of its request as the job's own provider
    was sent it: an answer found under that key would be exported as the fallback's. The answers
    taken read back as the rows' own lines, under their custom_ids, marked cached."""
    execute(store, "UPDATE rows SET lane = 1 WHERE idx IN (1, 3)")
    with ResponseCache(tmp_path / "cache.sqlite") as cache:
        _cached(store, cache, [0, 1, 2, 3, 4])
        assert answer_from_cache(store, cache, "s", sampled=False) == (3, 0.75)
        assert answer_from_cache(store, cache, "other scope", sampled=False) == (0, 0.75)
        assert store.outcomes(["row-0"]) == []  # answered, but not readable before its record is copied in
        assert keep_answers(store, cache) == 0
        assert cache.stats().hits == 3
    assert [state for state, *_ in rows(store).values()] == [
        "succeeded",
        "pending",
        "succeeded",
        "pending",
        "succeeded",
    ]
    with ResultReader(store) as reader:
        lines = {cid: orjson.loads(reader.line(result)) for cid, _s, result, _e in store.outcomes(["row-0", "row-4"])}
    want = {"id": None, "cached": True, "response": {"status_code": 200, "body": {"answer": "é"}}, "error": None}
    assert lines == {cid: {**want, "custom_id": cid} for cid in ("row-0", "row-4")}
    assert store.from_cache() == (3, 0.75)


def test_an_answer_gone_from_the_cache_before_it_is_copied_sends_its_row(store: JobStore, tmp_path: Path) -> None:
    """Between a row taking an answer and its record being copied in (a run killed there, or
    another job's eviction), the answer may go: the row goes back to pending, to be sent."""
    with ResponseCache(tmp_path / "cache.sqlite") as cache:
        _cached(store, cache, [0, 1, 2])
        assert answer_from_cache(store, cache, "s", sampled=False)[0] == 3
        assert cache.clear() == 3
        _cached(store, cache, [9])  # another answer, which takes the first id freed
        assert keep_answers(store, cache) == 3
    assert {state for state, *_ in rows(store).values()} == {"pending"}
    assert store.from_cache() == (0, 0.0)
    with ResponseCache(tmp_path / "cache.sqlite") as cache:  # the job resumed without --cache
        _cached(store, cache, [0, 1])
        assert answer_from_cache(store, cache, "s", sampled=False)[0] == 2
    assert keep_answers(store, None) == 2 and store.pending_count() == 5


def test_a_repeat_is_held_until_its_first_row_is_final_and_sent_if_that_failed(store: JobStore) -> None:
    """Rows with one request key: the first is sent, the others wait for it (`hold_repeats`);
    when it fails they are released, and the next hold makes the next one the first."""
    # One request key for every row; row 4 sampled, so never held.
    execute(store, "UPDATE rows SET request_key = X'6b', sampled = 0", "UPDATE rows SET sampled = 1 WHERE idx = 4")
    assert store.hold_repeats() == 3
    assert [r.idx for r in store.pending_rows(CHAT, MODEL)] == [0, 4]
    assert store.pending_count() == 5 and store.sendable_count() == 2
    assert [e.rows for e in store.estimate_by_model(10_000)] == [2]
    assert not store.repeats_ready() and store.release_repeats() == 0
    cid = plan(store, "c1", [0])
    submit(store, cid)
    store.collect(cid, Outcome(1, failed=[Failure(b"{}", "boom", 0)]), "completed")
    assert store.repeats_ready() and store.release_repeats() == 3
    assert store.hold_repeats() == 2 and [r.idx for r in store.pending_rows(CHAT, MODEL)] == [1, 4]
    assert store.release_repeats(every=True) == 2 and store.sendable_count() == 4
