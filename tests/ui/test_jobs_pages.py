"""The local jobs dashboard in a real headless Chromium while a real `llmbatch run` writes the job
(against a real echo server): the jobs page follows its progress without a reload, the job page
shows its charts, batches and commands. Screenshots go to test-artifacts/."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ARTIFACTS, DashboardProc, chat_line, click, dashboard_env, jsonl, page_text, until

pytestmark = [pytest.mark.browser, pytest.mark.xdist_group("browser")]  # one Chromium at a time


def test_jobs_dashboard_in_a_browser(server_factory, browser, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    def text(css: str) -> str | None:
        return page_text(browser, css)

    server = server_factory("--echo-latency", "0.05", "--max-concurrency", "2", "--echo-fail-rate", "0.05")
    home = tmp_path / "home"
    (home / "jobs").mkdir(parents=True)
    dashboard = DashboardProc(home, tmp_path / "dashboard.log")
    inp = tmp_path / "questions.jsonl"
    inp.write_bytes(jsonl([chat_line(i) for i in range(300)]))
    run = subprocess.Popen(
        [sys.executable, "-m", "llmbatch", "run", str(inp), "--provider", "openai", "--base-url", server.base_url,
         "--batch-size", "25", "--max-attempts", "1", "--poll-interval", "0.05", "--max-cost", "0.05"],
        env=dashboard_env(home), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        ARTIFACTS.mkdir(exist_ok=True)
        browser.get(dashboard.base + "/")
        row = "#jobs tbody tr"
        until(lambda: browser.find_elements(By.CSS_SELECTOR, row), what="the job in the table")
        job = browser.find_element(By.CSS_SELECTOR, row).get_attribute("id").removeprefix("job-")

        # The progress moves without a reload: htmx swaps the table; a marker set on the page survives.
        browser.execute_script("window.__notReloaded = true")
        cell = f"#job-{job} .progress-text"
        first = until(lambda: text(cell), what="the progress")
        until(lambda: text(cell) not in (None, first), what=f"progress past {first!r}")
        assert browser.execute_script("return window.__notReloaded") is True
        assert until(lambda: text(f"#job-{job} .status")) == "running"
        browser.save_screenshot(str(ARTIFACTS / "jobs-list.png"))

        click(browser, By.LINK_TEXT, job)
        until(lambda: len(browser.find_elements(By.CSS_SELECTOR, "svg.chart path")) >= 2, what="the job's charts")
        assert until(lambda: text("#cmd-resume")) == f"llmbatch resume {job}"
        assert until(lambda: text("#cmd-cancel")) == f"llmbatch cancel {job}"
        until(lambda: browser.find_elements(By.CSS_SELECTOR, "#batches td.mono"), what="the batches table")
        # The page follows the job to its end, then says so.
        status = "#job h1 .status"
        until(lambda: text(status) == "finished", what="finished on the page")
        browser.save_screenshot(str(ARTIFACTS / "jobs-job.png"))
        assert run.wait(60) in (0, 1)
    finally:
        if run.poll() is None:
            run.terminate()
            run.wait(10)
        dashboard.stop()
    print(f"\nscreenshots in {ARTIFACTS}")
