"""The server's dashboard in a real headless Chromium against a real server running real batches:
sign in, watch progress move without a reload, open a batch, download its output, cancel one,
and never see another key's batch. Screenshots go to test-artifacts/."""

from __future__ import annotations

import pytest

from conftest import ARTIFACTS, chat_line, click, jsonl, page_text, run_batch, until, upload, wait_batch

pytestmark = [pytest.mark.browser, pytest.mark.xdist_group("browser")]  # one Chromium at a time

A, B = "sk-page-a", "sk-page-b"


def test_dashboard_in_a_browser(server_factory, browser) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    srv = server_factory("--echo-latency", "0.05", "--max-concurrency", "2", keys=[A, B])
    a, b = srv.client(api_key=A), srv.client(api_key=B)
    theirs = run_batch(b, [chat_line(1)])
    f = upload(a, jsonl([chat_line(i) for i in range(160)]))
    running = a.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    base = f"http://127.0.0.1:{srv.port}"
    ARTIFACTS.mkdir(exist_ok=True)

    browser.get(f"{base}/ui")  # a key is asked for
    assert "/ui/login" in browser.current_url
    browser.find_element(By.ID, "key").send_keys(A)
    browser.find_element(By.ID, "sign-in").click()
    until(lambda: browser.find_elements(By.ID, f"row-{running.id}"), what="A's batch in the table")
    assert not browser.find_elements(By.ID, f"row-{theirs.id}") and theirs.id not in browser.page_source

    # Progress moves without a reload: htmx swaps the table; a marker set on the page survives.
    browser.execute_script("window.__notReloaded = true")
    cell = f"#row-{running.id} .progress-text"
    first = until(lambda: page_text(browser, cell), what="the progress cell")
    until(lambda: page_text(browser, cell) not in (None, first), what=f"progress past {first!r}")
    assert browser.execute_script("return window.__notReloaded") is True
    browser.save_screenshot(str(ARTIFACTS / "server-batches.png"))

    click(browser, By.LINK_TEXT, running.id)
    until(lambda: browser.find_elements(By.CSS_SELECTOR, "svg.chart path"), what="the batch's chart")
    status = "#batch h1 .status"
    until(lambda: page_text(browser, status) == "completed", what="completed on the page")
    browser.save_screenshot(str(ARTIFACTS / "server-batch.png"))
    click(browser, By.ID, "file-output")
    name = f"batch_{running.id}_output.jsonl"
    saved = until(lambda: (browser.downloads / name).is_file() and (browser.downloads / name), what="the download")
    output = a.files.content(a.batches.retrieve(running.id).output_file_id).content
    until(lambda: saved.read_bytes() == output, timeout=5, what="the whole file downloaded")

    # Cancel from the page: the button asks first.
    f = upload(a, jsonl([chat_line(i) for i in range(400)]))
    doomed = a.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    browser.get(f"{base}/ui/batches/{doomed.id}")
    click(browser, By.ID, "cancel")
    browser.switch_to.alert.accept()
    until(lambda: page_text(browser, status) in ("cancelling", "cancelled"), what="cancel")
    assert wait_batch(a, doomed.id).status == "cancelled"
    until(lambda: browser.find_elements(By.ID, "errors"), what="the error lines of the cancelled rows")
    browser.save_screenshot(str(ARTIFACTS / "server-batch-cancelled.png"))

    # Another key's batch is not there, by link or by address.
    browser.get(f"{base}/ui/batches/{theirs.id}")
    assert "No batch found" in browser.find_element(By.ID, "error").text
    print(f"\nscreenshots in {ARTIFACTS}")
