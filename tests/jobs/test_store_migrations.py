"""The job store's schema is versioned (`PRAGMA user_version`, ordered migrations): a job
database made by an earlier release opens, resumes and exports after an upgrade."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from llmbatch._exceptions import StateError
from llmbatch.jobs import SCHEMA_VERSION, JobStore

FIXTURE = Path(__file__).parent / "fixtures" / "job_v0"
JOB_ID = "job_0d2b867151828123"


def _old_job(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the fixture job under tmp_path/jobs, pointed at a copy of its input."""
    root = tmp_path / "jobs"
    job_dir = root / JOB_ID
    shutil.copytree(FIXTURE, job_dir, ignore=shutil.ignore_patterns("*.py", "*.md", "requests.jsonl"))
    inp = tmp_path / "requests.jsonl"
    shutil.copyfile(FIXTURE / "requests.jsonl", inp)
    st = inp.stat()
    db = sqlite3.connect(job_dir / "job.sqlite")  # the test's own connection, as a user's file move would
    with db:
        db.execute(
            "UPDATE job SET inputs=?",
            (orjson.dumps([{"path": str(inp), "size": st.st_size, "mtime_ns": st.st_mtime_ns}]),),
        )
    db.close()
    return root, inp


def _schema(path: Path) -> dict[str, object]:
    """Every table's columns and every index's definition, as SQLite reports them."""
    db = sqlite3.connect(path)
    try:
        tables = [n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        shape: dict[str, object] = {t: db.execute(f"PRAGMA table_info({t})").fetchall() for t in tables}
        for name, table in db.execute("SELECT name, tbl_name FROM sqlite_master WHERE type='index' ORDER BY name"):
            shape[f"index {name}"] = (table, db.execute(f"PRAGMA index_xinfo({name})").fetchall())
        return shape
    finally:
        db.close()


def test_an_old_job_database_is_migrated_in_place(tmp_path: Path) -> None:
    root, _inp = _old_job(tmp_path)
    path = root / JOB_ID / "job.sqlite"
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 0  # made before versioning
    db.close()
    store = JobStore(path)
    try:
        assert store.schema_version() == SCHEMA_VERSION
        assert store.counts() == {"pending": 0, "queued": 3, "succeeded": 3, "failed": 0, "invalid": 1}
        assert [(c.state, c.rows) for c in store.chunks()] == [("collected", 3), ("planned", 3)]
    finally:
        store.close()
    # A fresh store and the migrated one have the same tables, columns and indexes.
    fresh = JobStore(tmp_path / "fresh.sqlite")
    fresh.close()
    assert _schema(path) == _schema(tmp_path / "fresh.sqlite")


def test_an_old_job_resumes_and_exports_after_the_upgrade(tmp_path: Path) -> None:
    root, inp = _old_job(tmp_path)
    env = {**os.environ, "LLMBATCH_HOME": str(tmp_path / "home"), "LLMBATCH_ENGINE": "echo"}
    cli = [sys.executable, "-m", "llmbatch"]
    proc = subprocess.run(
        [*cli, "resume", JOB_ID, "--job-dir", str(root)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1, proc.stderr  # the invalid row failed; every other row succeeded
    out = [orjson.loads(line) for line in inp.with_name("requests.results.jsonl").read_text().splitlines()]
    expected = [orjson.loads(line)["custom_id"] for line in inp.read_text().splitlines()]
    assert [r["custom_id"] for r in out] == expected
    answered = [r for r in out if r["response"] is not None]
    assert len(answered) == 6 and all(r["response"]["status_code"] == 200 for r in answered)
    # Rows answered before the upgrade keep their results (read from the old result file).
    first = {r["custom_id"]: r for r in answered}["row-0"]
    assert "hello 0" in orjson.dumps(first["response"]["body"]).decode()
    (bad,) = [r for r in out if r["error"] is not None]
    assert bad["custom_id"] == "bad" and "requests.jsonl:4" in bad["error"]["message"]
    again = subprocess.run(
        [*cli, "results", JOB_ID, "--job-dir", str(root)], env=env, capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 1 and "7 rows (6 succeeded)" in again.stderr, again.stderr


def test_a_database_from_a_newer_release_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "job.sqlite"
    JobStore(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StateError, match="newer llmbatch"):
        JobStore(path)


def test_a_file_left_empty_by_a_crash_gets_the_schema(tmp_path: Path) -> None:
    path = tmp_path / "job.sqlite"
    path.touch()  # created, then killed before the schema's transaction
    store = JobStore(path)
    try:
        assert store.job() is None and store.schema_version() == SCHEMA_VERSION
    finally:
        store.close()


def test_rows_answered_from_the_cache_before_version_7_keep_their_lines(tmp_path: Path) -> None:
    """Version 6 kept a cached row's whole line; version 7 keeps the cache's compressed record and
    makes the line when it is read. The migration turns one into the other: the line reads the same."""
    from llmbatch.jobs import CheckedRow, ResultReader
    from llmbatch.jobs._records import InputRow

    path = tmp_path / "job.sqlite"
    store = JobStore(path)
    store.create_job("job_v6", [{"path": str(tmp_path / "in.jsonl"), "size": 1, "mtime_ns": 1}], {"provider": "local"})
    checked = CheckedRow("row-0", None, 0, "/v1/chat/completions", "m", 10, 20, 0, "pending", None)
    store.insert_checked([InputRow.of(0, 0, 1, 0, 99, checked)], ["in.jsonl"])
    store.close()
    line = (
        b'{"id":null,"custom_id":"row-0","cached":true,'
        b'"response":{"status_code":200,"body":{"a":"\xc3\xa9"}},"error":null}'
    )
    db = sqlite3.connect(path)
    with db:  # the row as version 6 left it
        db.execute("UPDATE rows SET state='succeeded', from_cache=1, saved_cost=0.5, result=?", (line,))
        db.execute("DROP INDEX rows_repeats")  # and what versions 7 and 8 added
        db.execute("ALTER TABLE rows DROP COLUMN repeat_of")
        db.execute("ALTER TABLE rows DROP COLUMN answer")
        db.execute("PRAGMA user_version = 6")
    db.close()
    store = JobStore(path)
    try:
        assert store.schema_version() == SCHEMA_VERSION
        with ResultReader(store) as reader:
            ((cid, state, result, _error),) = store.outcomes(["row-0"])
            assert (cid, state) == ("row-0", "succeeded") and orjson.loads(reader.line(result)) == orjson.loads(line)
        assert store.from_cache() == (1, 0.5)
    finally:
        store.close()
