"""`llmbatch serve` takes its port and its data directory before it says it is starting."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from conftest import ServerProc


def _serve(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    """`llmbatch serve ARGS` run to its end (these runs refuse to start, so they end at once)."""
    return subprocess.run(
        [sys.executable, "-m", "llmbatch", "serve", "--engine", "echo", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "LLMBATCH_HOME": str(home)},
        timeout=60,
    )


def test_a_busy_port_is_one_line_naming_the_port_and_the_option(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _serve("--port", str(port), "--data-dir", str(tmp_path / "data"), home=tmp_path)
    assert result.returncode == 2, result.stderr
    # Nothing was announced: the port is bound before "starting on" and "server ready".
    assert result.stderr.splitlines() == [
        f"error: port {port} on 127.0.0.1 is already in use (another llmbatch serve?): "
        "stop that server or choose another port with --port"
    ]


def test_a_second_server_on_one_data_dir_refuses(server_factory: Callable[..., ServerProc], tmp_path: Path) -> None:
    first = server_factory("--engine", "echo")
    result = _serve("--port", "0", "--data-dir", str(first.data_dir), home=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"error: another llmbatch server is using --data-dir {first.data_dir}: stop it, or give this server "
        "another --data-dir (two servers on one directory would run the same batches)"
    ]
    assert first.http().get("/health").status_code == 200  # the first one serves on, unharmed
    # The lock dies with its process: after a SIGKILL the directory is free at once.
    first.kill()
    again = server_factory("--engine", "echo", data_dir=first.data_dir)
    assert again.http().get("/health").json()["status"] == "ok"
