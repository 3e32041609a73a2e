"""Takes the README's dashboard screenshots (docs/img/server-*.png, docs/img/jobs-*.png): starts
`llmbatch serve` with the echo engine on a free port, runs a few batches (one with failing rows,
one cancelled, one still running) and saves the batches page and a batch page from headless
Chromium; then runs a few `llmbatch run` jobs against that server (one finished, one stopped by
its --max-cost, one running) and saves `llmbatch dashboard`'s jobs page and a job's page.

    python scripts/dashboard_screenshots.py [OUT_DIR] [server|jobs]

Needs selenium and Debian's chromium + chromium-driver (scripts/install.sh installs them).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from openai import OpenAI
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By


def rows(n: int, prefix: str) -> io.BytesIO:
    lines = [
        {"custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "echo", "messages": [{"role": "user", "content": f"Question {i} " * 20}]}}
        for i in range(n)
    ]  # fmt: skip
    return io.BytesIO("".join(json.dumps(x) + "\n" for x in lines).encode())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(url: str) -> None:
    for _ in range(400):
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{url} did not answer")


def jobs_shots(driver: webdriver.Chrome, base: str, out: Path) -> None:
    """Three jobs against the echo server at `base`, and the dashboard's two pages of them."""
    work = Path(tempfile.mkdtemp())
    env = {**os.environ, "LLMBATCH_HOME": str(work / "home"), "OPENAI_API_KEY": "unused", "NO_PROXY": "127.0.0.1"}
    run = [sys.executable, "-m", "llmbatch", "run", "--provider", "openai", "--base-url", f"{base}/v1"]
    common = ["--poll-interval", "0.1", "--max-attempts", "1", "--price-as", "gpt-4o-mini"]

    def job(name: str, n: int, *args: str, wait: bool = True) -> subprocess.Popen[bytes]:
        (work / name).write_bytes(rows(n, name.split(".")[0]).getvalue())
        proc = subprocess.Popen([*run, str(work / name), *common, *args], env=env, stderr=subprocess.DEVNULL)
        if wait:
            proc.wait(300)
        return proc

    job("classify.jsonl", 600, "--batch-size", "100")
    job("summaries.jsonl", 800, "--batch-size", "100", "--max-cost", "0.05")
    running = job("eval.jsonl", 3000, "--batch-size", "150", "--max-in-flight", "2", wait=False)
    port = free_port()
    dash = subprocess.Popen(
        [sys.executable, "-m", "llmbatch", "dashboard", "--port", str(port), "--home", str(work / "home")],
        env=env, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(f"http://127.0.0.1:{port}/")
        time.sleep(12)  # part of the running job done: its charts have a shape
        driver.get(f"http://127.0.0.1:{port}/")
        driver.find_element(By.CSS_SELECTOR, "#jobs tbody tr")
        driver.save_screenshot(str(out / "jobs-list.png"))
        link = driver.find_element(By.CSS_SELECTOR, "tr[data-state=running] a")
        link.click()
        driver.find_element(By.CSS_SELECTOR, "svg.chart path")
        driver.set_window_size(1280, 1250)
        driver.save_screenshot(str(out / "jobs-job.png"))
    finally:
        running.terminate()
        running.wait(30)
        dash.terminate()
        dash.wait(10)


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/img")
    only = sys.argv[2] if len(sys.argv) > 2 else None
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    data = Path(tempfile.mkdtemp())
    args = ["--engine", "echo", "--echo-latency", "0.02", "--echo-fail-rate", "0.03", "--max-concurrency", "4"]
    cmd = [sys.executable, "-m", "llmbatch", "serve", "--port", str(port), "--data-dir", str(data), *args]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    driver = None
    try:
        wait_for(f"{base}/health")
        client = OpenAI(base_url=f"{base}/v1", api_key="unused")

        def batch(n: int, name: str) -> str:
            f = client.files.create(file=(f"{name}.jsonl", rows(n, name)), purpose="batch")
            b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
            return b.id

        options = webdriver.ChromeOptions()
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,760", "--hide-scrollbars"):
            options.add_argument(arg)
        # The system's browser and driver, named: Selenium Manager would otherwise go online for them.
        options.binary_location = shutil.which("chromium") or "chromium"
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "chromedriver"), options=options)
        if only != "jobs":
            server_shots(driver, base, out, batch, client)
        if only != "server":  # after: the jobs' batches would be on the server's pages
            jobs_shots(driver, base, out)
    finally:
        for p in sorted(out.glob("*.png")):
            print(f"{p}: {p.stat().st_size:,} bytes")
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(10)


def server_shots(
    driver: webdriver.Chrome, base: str, out: Path, batch: Callable[[int, str], str], client: OpenAI
) -> None:
    """The server's batches page and a batch's page, of batches finished, cancelled and running."""
    done = [batch(120, f"nightly-{i}") for i in range(3)]
    while client.batches.retrieve(done[-1]).status != "completed":
        time.sleep(0.2)
    cancelled = batch(400, "backfill")
    time.sleep(1)
    client.batches.cancel(cancelled)
    running = batch(3000, "eval-run")
    time.sleep(8)
    driver.get(f"{base}/ui")
    driver.find_element(By.ID, f"row-{running}")
    driver.save_screenshot(str(out / "server-batches.png"))
    driver.get(f"{base}/ui/batches/{done[0]}")
    driver.find_element(By.CSS_SELECTOR, "svg.chart path")
    driver.save_screenshot(str(out / "server-batch.png"))


if __name__ == "__main__":
    main()
