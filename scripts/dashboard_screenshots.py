"""Takes the README's dashboard screenshots (docs/img/server-*.png): starts `llmbatch serve` with
the echo engine on a free port, runs a few batches (one with failing rows, one cancelled, one
still running) and saves the batches page and a batch page from headless Chromium.

    python scripts/dashboard_screenshots.py [OUT_DIR]

Needs selenium and Debian's chromium + chromium-driver (scripts/install.sh installs them).
"""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
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


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/img")
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = Path(tempfile.mkdtemp())
    args = ["--engine", "echo", "--echo-latency", "0.02", "--echo-fail-rate", "0.03", "--max-concurrency", "4"]
    cmd = [sys.executable, "-m", "llmbatch", "serve", "--port", str(port), "--data-dir", str(data), *args]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    driver = None
    try:
        for _ in range(200):
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        client = OpenAI(base_url=f"{base}/v1", api_key="unused")

        def batch(n: int, name: str) -> str:
            f = client.files.create(file=(f"{name}.jsonl", rows(n, name)), purpose="batch")
            b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
            return b.id

        done = [batch(120, f"nightly-{i}") for i in range(3)]
        while client.batches.retrieve(done[-1]).status != "completed":
            time.sleep(0.2)
        cancelled = batch(400, "backfill")
        time.sleep(1)
        client.batches.cancel(cancelled)
        running = batch(3000, "eval-run")
        time.sleep(8)
        options = webdriver.ChromeOptions()
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,760", "--hide-scrollbars"):
            options.add_argument(arg)
        # The system's browser and driver, named: Selenium Manager would otherwise go online for them.
        options.binary_location = shutil.which("chromium") or "chromium"
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "chromedriver"), options=options)
        driver.get(f"{base}/ui")
        driver.find_element(By.ID, f"row-{running}")
        driver.save_screenshot(str(out / "server-batches.png"))
        driver.get(f"{base}/ui/batches/{done[0]}")
        driver.find_element(By.CSS_SELECTOR, "svg.chart path")
        driver.save_screenshot(str(out / "server-batch.png"))
        for p in sorted(out.glob("server-*.png")):
            print(f"{p}: {p.stat().st_size:,} bytes")
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
