"""Fixtures: real llmbatch servers (uvicorn subprocesses on 127.0.0.1) and clients for them."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import openai
import pytest

TERMINAL = ("completed", "failed", "expired", "cancelled")

# The suite runs on the echo engine unless a test names another: the default engine ("auto")
# would load the packaged model where it is installed. Tests of "auto" itself clear this.
os.environ["LLMBATCH_ENGINE"] = "echo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProc:
    """A running `llmbatch serve` process."""

    port: int
    data_dir: Path
    args: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    keys: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def client(self, api_key: str | None = None, **kwargs: Any) -> openai.OpenAI:
        key = api_key or (self.keys[0] if self.keys else "unused")
        return openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0, **kwargs)

    def http(self, api_key: str | None = None) -> httpx.Client:
        key = api_key or (self.keys[0] if self.keys else None)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=f"http://127.0.0.1:{self.port}", headers=headers, timeout=30)

    def start(self, timeout: float = 20.0) -> float:
        """Starts the process and waits until it answers; returns the seconds that took."""
        cmd = [sys.executable, "-m", "llmbatch", "serve", "--port", str(self.port), "--data-dir", str(self.data_dir)]
        log = open(self.log_path, "ab")
        t0 = time.monotonic()
        self.proc = subprocess.Popen([*cmd, *self.args], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"server did not start within {timeout}s:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., ServerProc]]:
    """Starts servers with extra CLI args; all are stopped at the end of the test."""
    started: list[ServerProc] = []

    def make(*args: str, data_dir: Path | None = None, keys: list[str] | None = None, start: bool = True) -> ServerProc:
        n = len(started)
        extra = [a for k in (keys or []) for a in ("--api-key", k)]
        srv = ServerProc(
            port=free_port(),
            data_dir=data_dir or tmp_path / f"server{n}",
            args=[*args, *extra],
            log_path=tmp_path / f"server{n}.log",
            keys=list(keys or []),
        )
        if start:
            srv.start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """One shared echo server (open, default limits) for tests that need nothing special."""
    base = tmp_path_factory.mktemp("shared-server")
    srv = ServerProc(port=free_port(), data_dir=base / "data", args=[], log_path=base / "server.log")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server: ServerProc) -> openai.OpenAI:
    return server.client()


def chat_line(i: int | str, text: str | None = None, model: str = "gpt-4o-mini", **body: Any) -> dict[str, Any]:
    """One batch input row for /v1/chat/completions."""
    return {
        "custom_id": f"row-{i}" if isinstance(i, int) else i,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": text or f"hello {i}"}], **body},
    }


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def upload(client: openai.OpenAI, data: bytes, name: str = "input.jsonl", purpose: str = "batch") -> Any:
    return client.files.create(file=(name, data), purpose=purpose)  # type: ignore[arg-type]


def wait_batch(client: openai.OpenAI, batch_id: str, timeout: float = 60.0, until: tuple[str, ...] = TERMINAL) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        b = client.batches.retrieve(batch_id)
        if b.status in until:
            return b
        if time.monotonic() > deadline:
            raise AssertionError(f"batch {batch_id} still {b.status} after {timeout}s: {b}")
        time.sleep(0.05)


def read_jsonl(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if not file_id:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines() if line.strip()]


def back_up_store(path: Path, to: Path) -> None:
    """A consistent copy of a job store, WAL included (what a backup tool restores)."""
    src, dst = sqlite3.connect(path), sqlite3.connect(to)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()


def run_batch(
    client: openai.OpenAI, rows: list[dict[str, Any]] | bytes, endpoint: str = "/v1/chat/completions", **kwargs: Any
) -> Any:
    """Uploads rows, creates a batch, waits until it ends, returns the final batch."""
    data = rows if isinstance(rows, bytes) else jsonl(rows)
    f = upload(client, data)
    b = client.batches.create(input_file_id=f.id, endpoint=endpoint, completion_window="24h", **kwargs)  # type: ignore[arg-type]
    return wait_batch(client, b.id)


# -- `llmbatch run` killed with SIGKILL and started again (tests/jobs, tests/providers) ----------


class CreateCounting(Protocol):
    """A provider fake that records its requests and counts the batches it made."""

    @property
    def calls(self) -> list[tuple[str, str]]: ...

    @property
    def creates(self) -> int: ...


def kill_then_finish(
    cmd: list[str],
    env: dict[str, str] | Callable[[int], dict[str, str]],
    *,
    attempts: int,
    seed: int,
    pause: tuple[float, float] = (0.0, 0.5),
    fake: CreateCounting | None = None,
    min_kills: int = 3,
    timeout: float = 120,
) -> int:
    """Starts `cmd` up to `attempts` times (`env`, or `env(attempt)`) and SIGKILLs it each time at a
    random moment `pause` seconds in; with `fake`, only once it has reached the fake (its imports
    take a while), and on every other attempt right after the fake made a batch, before the client
    can record it. Then runs `cmd` to its end, which must succeed after at least `min_kills`
    kills. Returns the number of kills (fewer than `attempts` where the job ended by itself)."""
    env_of = env if callable(env) else lambda _attempt: env
    rng = random.Random(seed)
    kills = 0
    for attempt in range(attempts):
        proc = subprocess.Popen(cmd, env=env_of(attempt), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if fake is None:
            time.sleep(rng.uniform(*pause))
        else:
            calls, creates = len(fake.calls), fake.creates
            deadline = time.monotonic() + 20
            while proc.poll() is None and len(fake.calls) == calls and time.monotonic() < deadline:
                time.sleep(0.005)
            if attempt % 2 == 0:
                while proc.poll() is None and fake.creates == creates and time.monotonic() < deadline:
                    time.sleep(0.002)
            else:
                time.sleep(rng.uniform(*pause))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    final = subprocess.run(cmd, env=env_of(attempts), capture_output=True, text=True, timeout=timeout)
    assert final.returncode == 0, final.stderr
    assert kills >= min_kills, "the job finished too soon to test anything: make it longer"
    return kills


os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")


# -- live tests against real providers (skipped unless asked for) ----------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--live",
        action="store_true",
        default=False,
        help="also run @pytest.mark.live tests: tiny real jobs against providers whose key is set (costs money)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--live"):
        return
    skip = pytest.mark.skip(reason="live provider test: run with --live and the provider's key set")
    for item in items:
        if "live" in item.keywords:
            item.add_marker(skip)


class EngineHandle:
    """An engine started on its own event loop, for synchronous tests: `one(body)`, `many([...])`."""

    def __init__(self, name: str, config: Any) -> None:
        import asyncio

        from llmbatch.engines import create_engine

        self.loop = asyncio.new_event_loop()
        self.engine: Any = create_engine(name, config)
        self.loop.run_until_complete(self.engine.start())

    def many(self, requests: list[tuple[str, dict[str, Any]]]) -> list[Any]:
        """Answers (endpoint, body) requests, all in flight at once."""
        import asyncio

        from llmbatch.engines import EngineRequest

        async def go() -> list[Any]:
            return await asyncio.gather(*(self.engine.handle(EngineRequest(ep, body)) for ep, body in requests))

        return self.loop.run_until_complete(go())

    def one(self, body: dict[str, Any], endpoint: str = "/v1/chat/completions") -> Any:
        return self.many([(endpoint, body)])[0]

    def close(self) -> None:
        self.loop.run_until_complete(self.engine.aclose())
        self.loop.close()


# -- page tests in a real headless browser ----------------------------------------------------

#: Where page tests leave their screenshots (gitignored); printed at the end of each such test.
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def until(check: Callable[[], Any], timeout: float = 60.0, what: str = "") -> Any:  # generous: CI is busy
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.1)


def page_text(browser: Any, css: str) -> str | None:
    """The text of the element `css` selects, or None while it is missing or htmx is swapping it
    out (a poll through `until` reads it again next time instead of failing on a stale element)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        return browser.find_element(By.CSS_SELECTOR, css).text  # type: ignore[no-any-return]
    except (NoSuchElementException, StaleElementReferenceException):
        return None


def click(browser: Any, by: str, value: str) -> None:
    """Clicks the element once it is there, finding it again if htmx swapped it out between
    finding and clicking (a refreshed table or header replaces its elements every few seconds)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    def attempt() -> bool:
        try:
            browser.find_element(by, value).click()
        except (NoSuchElementException, StaleElementReferenceException):
            return False
        return True

    until(attempt, what=f"{value} to click")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """A headless Chromium (Debian's `chromium` + `chromium-driver`, through Selenium) that saves
    downloads under tmp_path/downloads. Skips, saying what is missing, where they are not installed
    (scripts/install.sh installs them as root on Debian)."""
    import shutil

    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[dev]')")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip("no chromium/chromedriver on PATH (apt-get install -y chromium chromium-driver)")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,900"):
        options.add_argument(arg)
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(30)
    driver.downloads = downloads  # type: ignore[attr-defined]
    try:
        yield driver
    finally:
        driver.quit()


# -- the local jobs dashboard (`llmbatch dashboard`) -------------------------------------------


def dashboard_env(home: Path) -> dict[str, str]:
    """The environment of `llmbatch` commands on the jobs in `home` (run against fake OpenAI-like servers)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env.update(LLMBATCH_HOME=str(home), NO_PROXY="127.0.0.1,localhost", OPENAI_API_KEY="test")
    return env


class DashboardProc:
    """A running `llmbatch dashboard` process over the jobs in `home` (started on a free port)."""

    def __init__(self, home: Path, log: Path, *args: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        out = open(log, "wb")
        cmd = [sys.executable, "-m", "llmbatch", "dashboard", "--port", str(self.port), "--home", str(home), *args]
        self.proc = subprocess.Popen(cmd, env=dashboard_env(home), stdout=out, stderr=subprocess.STDOUT)
        out.close()
        self.log = log
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, log.read_text()
            try:
                if httpx.get(self.base + "/", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise AssertionError(f"dashboard did not start:\n{log.read_text()}")

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.base + path, timeout=30, **kwargs)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
