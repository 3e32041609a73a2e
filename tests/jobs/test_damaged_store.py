"""A job whose own files are damaged (its SQLite store cut, overwritten or not SQLite at all; its
lock file a directory): every command says so in one line naming the job, the file and what to
do, exits 2, and `llmbatch jobs` still lists the other jobs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import chat_line, jsonl

CLI = [sys.executable, "-m", "llmbatch"]


def llmbatch(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LLMBATCH_HOME": str(home), "LLMBATCH_ENGINE": "echo"}
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def finished_jobs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str, str]:
    """(home, the first job's input, its id, the other job's id): two finished local jobs, made
    once per module (four CLI runs, ~5 s under load); each test damages a copy of `home`."""
    base = tmp_path_factory.mktemp("finished-jobs")
    home = base / "home"
    ids: list[str] = []
    for name in ("first", "other"):
        inp = base / f"{name}.jsonl"
        inp.write_bytes(jsonl([chat_line(f"{name}-{i}", model="echo") for i in range(5)]))
        done = llmbatch(home, "run", str(inp), "--poll-interval", "0.05")
        assert done.returncode == 0, done.stderr
        ids.append(json.loads(llmbatch(home, "status", str(_only_new(home, ids)), "--json").stdout)["id"])
    return home, base / "first.jsonl", ids[0], ids[1]


@pytest.fixture
def two_jobs(finished_jobs: tuple[Path, Path, str, str], tmp_path: Path) -> tuple[Path, Path, str, str]:
    """`finished_jobs` with a home of this test's own. The input stays where it is: a job's id
    hashes its input's path, size and mtime, so `run INPUT` finds the copied job."""
    template, inp, job, other = finished_jobs
    home = tmp_path / "home"
    shutil.copytree(template, home)
    return home, inp, job, other


def _only_new(home: Path, known: list[str]) -> Path:
    (found,) = [d for d in (home / "jobs").iterdir() if d.name not in known]
    return found


def _truncate(db: Path) -> None:
    db.write_bytes(db.read_bytes()[: db.stat().st_size // 2])


def _garbage_header(db: Path) -> None:
    data = bytearray(db.read_bytes())
    data[:100] = os.urandom(100)
    db.write_bytes(bytes(data))


def _not_sqlite(db: Path) -> None:
    db.write_text("these are notes, not a database\n" * 50)


def _flipped_pages(db: Path) -> None:
    """Every b-tree page after the first gets an impossible page type (its first byte)."""
    data = bytearray(db.read_bytes())
    page = int.from_bytes(data[16:18], "big") or 65536
    for start in range(page, len(data), page):
        data[start] = 0xFF
    db.write_bytes(bytes(data))


DAMAGE: dict[str, Callable[[Path], None]] = {
    "truncated": _truncate,
    "garbage-header": _garbage_header,
    "not-sqlite": _not_sqlite,
    "flipped-pages": _flipped_pages,
}


def _one_clear_line(proc: subprocess.CompletedProcess[str], job: str, db: Path) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert f"job {job}" in line and str(db) in line and "damaged" in line and f"llmbatch jobs rm {job}" in line


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_store_is_one_clear_line_and_the_other_jobs_still_list(
    two_jobs: tuple[Path, Path, str, str], damage: str
) -> None:
    home, inp, job, other = two_jobs
    db = home / "jobs" / job / "job.sqlite"
    for extra in (db.with_name("job.sqlite-wal"), db.with_name("job.sqlite-shm")):
        extra.unlink(missing_ok=True)  # what a bad copy leaves: the file alone
    DAMAGE[damage](db)

    for args in (["status", job], ["results", job], ["run", str(inp)], ["resume", job]):
        _one_clear_line(llmbatch(home, *args), job, db)

    listed = llmbatch(home, "jobs")
    assert listed.returncode == 0, listed.stderr
    lines = {ln.split()[0]: ln for ln in listed.stdout.splitlines()}
    assert "DAMAGED" in lines[job] and "DAMAGED" not in lines[other] and "5/5 succeeded" in lines[other]

    removed = llmbatch(home, "jobs", "rm", job)
    assert removed.returncode == 0, removed.stderr
    assert not db.parent.exists()
    assert [ln.split()[0] for ln in llmbatch(home, "jobs").stdout.splitlines()] == [other]
    rerun = llmbatch(home, "run", str(inp), "--poll-interval", "0.05")  # the same input: a new job
    assert rerun.returncode == 0, rerun.stderr


def test_a_lock_file_that_is_a_directory_is_one_clear_line(two_jobs: tuple[Path, Path, str, str]) -> None:
    home, inp, job, _other = two_jobs
    lock = home / "jobs" / job / "lock"
    lock.unlink(missing_ok=True)
    lock.mkdir()
    for args in (["run", str(inp)], ["resume", job]):
        proc = llmbatch(home, *args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert f"job {job}" in line and str(lock) in line and "is a directory" in line
    shutil.rmtree(lock)  # what the message says to do
    assert llmbatch(home, "resume", job).returncode == 0


def test_removing_a_job_refuses_paths_and_unknown_ids(two_jobs: tuple[Path, Path, str, str]) -> None:
    home, _inp, job, _other = two_jobs
    for bad in ("..", f"../jobs/{job}", "job_nope"):
        proc = llmbatch(home, "jobs", "rm", bad)
        assert proc.returncode == 2 and "no job" in proc.stderr, proc.stderr
    assert (home / "jobs" / job / "job.sqlite").exists()
