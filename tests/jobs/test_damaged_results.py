"""Result files damaged after a job finished: rows keep their results as references into the
downloaded files, so a file cut short, deleted or changed since must be caught (its size and
sha256 are recorded when it is downloaded), named, and downloaded again by a run.

Jobs run in-process against `MemoryProvider` (as in test_runner_memory.py); what a row's line
must be comes from the fake's own output files, not from our export.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from fakes.memory_provider import MemoryProvider

from conftest import chat_line, jsonl
from llmbatch import DamagedResults, StateError
from llmbatch.api import Job
from llmbatch.jobs import EXIT_OK, JobRunner, JobSession, JobSettings

FAST = {"poll_interval": 0.001, "max_poll_interval": 0.001}
ROWS = 40


class Finished:
    """A job of ROWS rows (two chunks) run to its end against `fake`."""

    def __init__(self, tmp: Path, session: JobSession, settings: JobSettings, fake: MemoryProvider) -> None:
        self.tmp, self.session, self.settings, self.fake = tmp, session, settings, fake
        self.messages: list[str] = []

    def run(self) -> Any:
        runner = JobRunner(self.session.store, self.session.dir, self.settings, self.fake, say=self.messages.append)
        return asyncio.run(runner.run())

    @property
    def output(self) -> Path:
        return self.tmp / "input.results.jsonl"

    def result_files(self) -> list[Path]:
        return sorted((self.session.dir / "results").glob("*.jsonl"))

    def provider_records(self) -> dict[str, dict[str, Any]]:
        """Every row's answer as the fake's output files hold it, by custom_id."""
        records = {}
        for b in self.fake.batch_list:
            for file_id in (b.output_file_id, b.error_file_id):
                if file_id:
                    records.update({r["custom_id"]: r for r in self.fake.file_lines(file_id)})
        return records

    def assert_exact(self) -> None:
        """The export has one line per input row, each the provider's answer for that row."""
        expected = self.provider_records()
        lines = self.output.read_bytes().splitlines()
        assert len(lines) == ROWS
        for i, line in enumerate(lines):
            assert orjson.loads(line) == expected[f"row-{i}"], i


@pytest.fixture
def finished(tmp_path: Path) -> Iterator[Callable[[], Finished]]:
    sessions: list[JobSession] = []

    def make() -> Finished:
        inp = tmp_path / "input.jsonl"
        inp.write_bytes(jsonl([chat_line(i) for i in range(ROWS)]))
        settings = JobSettings(provider="openai", batch_size=ROWS // 2, **FAST)
        session, _created = JobSession.open([inp], settings, tmp_path / "jobs", api_key="test", say=lambda m: None)
        sessions.append(session)
        job = Finished(tmp_path, session, session.prepare(settings).settings, MemoryProvider())
        assert job.run().code == EXIT_OK
        assert len(job.result_files()) == 2
        job.assert_exact()
        return job

    yield make
    for s in sessions:
        s.close()


def damage(path: Path, how: str) -> None:
    if how == "truncate":
        os.truncate(path, path.stat().st_size // 2)
    elif how == "delete":
        path.unlink()
    else:  # one byte flipped, the size unchanged
        data = bytearray(path.read_bytes())
        at = data.index(b"hello 0")
        data[at] = ord("j")
        path.write_bytes(bytes(data))


HOW = ["truncate", "delete", "flip"]
PROBLEM = {"truncate": "cut short", "delete": "missing", "flip": "changed since it was downloaded"}


@pytest.mark.parametrize("how", HOW)
def test_an_export_refuses_a_damaged_result_file_and_names_it(finished: Callable[[], Finished], how: str) -> None:
    job = finished()
    first = job.result_files()[0]
    before = job.output.read_bytes()
    damage(first, how)
    with pytest.raises(DamagedResults) as caught:
        job.session.export()
    assert str(first) in str(caught.value) and PROBLEM[how] in str(caught.value)
    assert f"llmbatch resume {job.session.id}" in str(caught.value)
    assert caught.value.files == {str(first): caught.value.files[str(first)]}
    assert isinstance(caught.value, StateError)
    assert job.output.read_bytes() == before  # not rewritten
    assert not list(job.tmp.glob("*.part"))
    # The Python API refuses the same way, before handing out a record.
    api = Job(job.session.dir)
    with pytest.raises(DamagedResults, match=PROBLEM[how]):
        api.export()
    with pytest.raises(DamagedResults, match=PROBLEM[how]):
        next(api.results())


@pytest.mark.parametrize("how", HOW)
def test_a_run_downloads_a_damaged_file_again_and_exports_exactly(finished: Callable[[], Finished], how: str) -> None:
    job = finished()
    first = job.result_files()[0]
    downloads = job.fake.calls["download"]
    damage(first, how)
    assert job.run().code == EXIT_OK
    assert job.fake.calls["download"] == downloads + 1
    assert any(str(first) in m and "downloaded it again" in m for m in job.messages), job.messages
    job.assert_exact()
    job.session.export()  # and stays exportable
    job.assert_exact()


def test_a_file_downloaded_again_with_other_bytes_has_its_rows_found_again(finished: Callable[[], Finished]) -> None:
    """A provider that translates its results (Anthropic, Gemini) stamps the time in them: the
    file comes back with other bytes, and each row's line is found again by its custom_id."""
    job = finished()
    first = job.result_files()[0]
    (f,) = [f for f in job.fake.files.values() if first.name.endswith(f"-{f.id}.jsonl")]
    # The same records, padded: every offset moves.
    f.data = b"\n" + b"".join(orjson.dumps({"pad": "x" * 7, **orjson.loads(x)}) + b"\n" for x in f.data.splitlines())
    damage(first, "truncate")
    assert job.run().code == EXIT_OK
    job.assert_exact()  # the rows of the file downloaded again have their padded records
    assert job.output.read_bytes().count(b'"pad"') == len(job.fake.file_lines(f.id)) == ROWS // 2


def test_a_file_from_before_hashes_is_checked_by_its_extent_and_downloaded_again(
    finished: Callable[[], Finished],
) -> None:
    """Files recorded by schema 1 have no size, hash or file id: a file shorter than the rows
    point into is still caught, and its id is asked of its chunk's batch."""
    job = finished()
    db = sqlite3.connect(job.session.dir / "job.sqlite")
    with db:
        db.execute("UPDATE result_files SET size=NULL, sha256=NULL, file_id=NULL, chunk_id=NULL")
    db.close()
    first = job.result_files()[0]
    damage(first, "truncate")
    with pytest.raises(DamagedResults, match="rows point up to byte"):
        job.session.export()
    assert job.run().code == EXIT_OK
    job.assert_exact()


@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_a_run_fails_naming_the_file_when_the_provider_no_longer_has_it(
    finished: Callable[[], Finished], how: str
) -> None:
    job = finished()
    first = job.result_files()[0]
    for f in job.fake.files.values():
        f.deleted = True
    damage(first, how)
    with pytest.raises(DamagedResults) as caught:
        job.run()
    message = str(caught.value)
    assert str(first) in message and "the provider no longer has it" in message, message
    assert "HTTP 404" in message
    with pytest.raises(DamagedResults):  # and it stays refused
        job.session.export()


def test_llmbatch_results_exits_2_naming_the_damaged_file(finished: Callable[[], Finished]) -> None:
    job = finished()
    first = job.result_files()[0]
    before = job.output.read_bytes()
    damage(first, "truncate")
    proc = subprocess.run(
        [sys.executable, "-m", "llmbatch", "results", job.session.id, "--job-dir", str(job.session.dir.parent)],
        env={**os.environ, "LLMBATCH_HOME": str(job.tmp / "home")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert str(first) in proc.stderr and "cut short" in proc.stderr and "llmbatch resume" in proc.stderr
    assert "succeeded" not in proc.stderr
    assert job.output.read_bytes() == before
