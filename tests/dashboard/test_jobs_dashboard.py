"""`llmbatch dashboard` over real HTTP: a real `llmbatch dashboard` process reading the jobs that
real `llmbatch run` processes write (against a real echo server), while they write them."""

from __future__ import annotations

import html
import json
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import DashboardProc, chat_line, dashboard_env, free_port, jsonl

CLI = [sys.executable, "-m", "llmbatch"]
FIXTURE_V0 = Path(__file__).parent.parent / "jobs" / "fixtures" / "job_v0"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def dashboard(home: Path, tmp_path: Path) -> Iterator[DashboardProc]:
    (home / "jobs").mkdir(parents=True)
    d = DashboardProc(home, tmp_path / "dashboard.log")
    yield d
    d.stop()


def done_of(html: str, job: str) -> tuple[int, int, int]:
    """(succeeded, failed, total) of a job's row on the jobs page."""
    m = re.search(rf'id="job-{job}"[^>]*data-done="(\d+)" data-failed="(\d+)" data-total="(\d+)"', html)
    assert m, f"no row for {job}"
    return int(m[1]), int(m[2]), int(m[3])


def test_a_running_job_is_watched_without_blocking_it(server_factory, dashboard, home, tmp_path) -> None:  # type: ignore[no-untyped-def]
    server = server_factory("--echo-latency", "0.03", "--max-concurrency", "2", "--echo-fail-rate", "0.1")
    # 60 invalid rows (no model) skipped and failed at once, 80 valid ones in batches of 20.
    rows = [chat_line(i) for i in range(80)] + [{**chat_line(f"bad-{i}"), "body": {"messages": []}} for i in range(60)]
    inp = tmp_path / "input.jsonl"
    inp.write_bytes(jsonl(rows))
    run = subprocess.Popen(
        [*CLI, "run", str(inp), "--provider", "openai", "--base-url", server.base_url, "--batch-size", "20",
         "--max-attempts", "1", "--poll-interval", "0.05", "--skip-invalid"],
        env=dashboard_env(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    seen: list[tuple[int, int, int]] = []
    job = None
    deadline = time.monotonic() + 120
    try:
        while run.poll() is None and time.monotonic() < deadline:
            page = dashboard.get("/")
            assert page.status_code == 200, page.text
            found = re.search(r'id="job-(job_[0-9a-f]+)"', page.text)
            if found:
                job = found[1]
                seen.append(done_of(page.text, job))
                assert dashboard.get(f"/jobs/{job}").status_code == 200
            time.sleep(0.1)
    finally:
        out = run.communicate(timeout=60)[0].decode()
    assert run.returncode == 1, out  # some rows failed, and the run ended as it should
    assert job is not None
    # The dashboard saw the job move, and never go back.
    assert any(0 < s + f < t for s, f, t in seen), seen
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(seen, seen[1:])), seen
    store = home / "jobs" / job / "job.sqlite"
    db = sqlite3.connect(store)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()

    shown_status = subprocess.run([*CLI, "status", job, "--json"], env=dashboard_env(home), capture_output=True)
    status = json.loads(shown_status.stdout)
    r = status["rows"]
    assert done_of(dashboard.get("/").text, job) == (r["succeeded"], r["failed"] + r["invalid"], 140)
    page = dashboard.get(f"/jobs/{job}").text
    assert f"${status['usage']['cost']:.4f}" in page  # the spend is `status`'s
    for command in (f"llmbatch resume {job}", f"llmbatch cancel {job}", f"llmbatch results {job}"):
        assert f">{command}<" in page
    # The batches with the provider's ids, the chart from the event log.
    batch_ids = [b.id for b in server.client().batches.list(limit=100)]
    assert batch_ids and all(b in page for b in batch_ids)
    assert page.count("<svg") == 2 and "no data yet" not in page

    # Failed rows with their errors, 50 a page, in input order, as the errors file has them.
    errors = [json.loads(line) for line in (tmp_path / "input.errors.jsonl").read_text().splitlines()]
    assert len(errors) > 50
    shown = re.findall(r'<tr class="failure" data-custom-id="([^"]+)"', page)
    assert shown == [e["custom_id"] for e in errors[:50]]
    older = re.search(r'id="more-failures" href="([^"]+)"', page)
    assert older
    second = dashboard.get(html.unescape(older[1])).text
    rest = re.findall(r'<tr class="failure" data-custom-id="([^"]+)"', second)
    assert shown + rest == [e["custom_id"] for e in errors]
    assert ">input.jsonl:140<" in second and "missing_required_parameter: body.model must be a non-empty" in second


def test_the_pages_tolerate_what_they_find(dashboard, home) -> None:  # type: ignore[no-untyped-def]
    jobs = home / "jobs"
    (jobs / "job_damaged").mkdir()
    (jobs / "job_damaged" / "job.sqlite").write_bytes(b"not a database at all" * 100)
    (jobs / "job_creating").mkdir()
    (jobs / "job_creating" / "job.sqlite").write_bytes(b"")  # a job between its file and its schema
    shutil.copytree(FIXTURE_V0, jobs / "job_old")  # a store an older llmbatch wrote
    (jobs / "not-a-job").mkdir()

    page = dashboard.get("/")
    assert page.status_code == 200, page.text
    assert "job_damaged" in page.text and "damaged" in page.text
    assert "job_old" in page.text and "llmbatch status job_old" in page.text
    for job in ("job_damaged", "job_old", "job_creating"):
        assert dashboard.get(f"/jobs/{job}").status_code == 200
    # Read-only: the old store is not migrated, the empty one not made a database.
    db = sqlite3.connect(jobs / "job_old" / "job.sqlite")
    assert db.execute("PRAGMA user_version").fetchone()[0] == 0
    db.close()
    assert (jobs / "job_creating" / "job.sqlite").stat().st_size == 0

    for bad in ("nope", "%2E%2E", "not-a-job", "job_old%2F..%2F..", ".hidden"):
        assert dashboard.get(f"/jobs/{bad}").status_code == 404, bad
    assert dashboard.get("/static/style.css").status_code == 200
    # Another site's page cannot read it through a DNS name pointed at 127.0.0.1.
    assert dashboard.get("/", headers={"Host": "evil.example"}).status_code == 400


def test_a_bind_beyond_loopback_needs_a_flag(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*CLI, "dashboard", "--host", "0.0.0.0", "--port", str(free_port()), "--home", str(tmp_path)],
        env=dashboard_env(tmp_path), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--allow-remote" in proc.stderr and "0.0.0.0" in proc.stderr


def test_the_commands_name_a_job_root_that_is_not_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmbatch.dashboard import commands_for

    monkeypatch.setenv("LLMBATCH_HOME", str(tmp_path / "home"))
    assert commands_for("job_1", tmp_path / "home" / "jobs")["resume"] == "llmbatch resume job_1"
    other = tmp_path / "my jobs"
    assert commands_for("job_1", other) == {
        "resume": f"llmbatch resume job_1 --job-dir '{other}'",
        "status": f"llmbatch status job_1 --job-dir '{other}'",
        "cancel": f"llmbatch cancel job_1 --job-dir '{other}'",
        "export": f"llmbatch results job_1 --job-dir '{other}'",
    }
