"""`llmbatch serve --executor ray`: batches run on echo replicas that are Ray actors on a real
two-node Ray cluster (127.0.0.1 only), driven through the official openai SDK.

The cluster starts once for the module (a few seconds); skipped where Ray is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import ServerProc, chat_line, free_port, jsonl, read_jsonl, run_batch, upload, wait_batch

pytest.importorskip("ray")

# The server is a child of this process and inherits these; the cluster helper gets them too.
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",  # a ~/.ray/auth_token left by another run must not turn token auth on
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keeps 127.0.0.1 as the nodes' address (see _ray_cluster)
}
# Echo at 50 ms a row with 8 rows in flight per replica: a 400-row batch takes ~1.3 s on 2 replicas,
# long enough to kill a replica in the middle of it.
SERVER_ARGS = ["--engine", "echo", "--echo-latency", "0.05", "--max-concurrency", "8"]
SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("ray")
    # Ray's socket paths must fit in 107 bytes: pytest's temp dirs under xdist are too long.
    temp_dir = Path(tempfile.mkdtemp(prefix="lbray-", dir="/tmp"))
    (temp_dir / "ray").mkdir()
    saved = {k: os.environ.get(k) for k in (*RAY_ENV, "RAY_TMPDIR", "PYTHONPATH")}
    os.environ.update(RAY_ENV, RAY_TMPDIR=str(temp_dir))
    # Replicas run in Ray's worker processes: they must import this checkout's llmbatch.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, saved["PYTHONPATH"]) if p)
    helper = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("_ray_cluster.py")), str(temp_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=open(base / "cluster.log", "wb"),
        text=True,
    )
    try:
        assert helper.stdout is not None
        line = helper.stdout.readline()
        assert line, f"the Ray cluster did not start: {(base / 'cluster.log').read_text()[-3000:]}"
        info = json.loads(line)
        yield {**info, "temp_dir": temp_dir, "helper": helper}
    finally:
        assert helper.stdin is not None
        helper.stdin.close()
        try:
            helper.wait(30)
        except subprocess.TimeoutExpired:
            helper.kill()
        for proc in _ray_processes(temp_dir):  # whatever the shutdown left: ours only, by PID
            proc.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _ray_processes(temp_dir: Path) -> list[psutil.Process]:
    """The processes of this module's Ray cluster: their command lines name its temp dir."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(temp_dir) in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.fixture(scope="module")
def ray_server(cluster: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    base = tmp_path_factory.mktemp("ray-server")
    args = [*SERVER_ARGS, "--executor", "ray", "--ray-address", cluster["address"], "--replicas", "2"]
    srv = ServerProc(port=free_port(), data_dir=base / "data", args=args, log_path=base / "server.log")
    srv.start(timeout=60)
    yield srv
    srv.stop()


def _health(srv: ServerProc) -> dict[str, Any]:
    health: dict[str, Any] = httpx.get(f"http://127.0.0.1:{srv.port}/health", timeout=5).json()
    return health


def _bodies(lines: list[dict[str, Any]]) -> dict[str, Any]:
    """custom_id -> the answer, without what differs between two runs (ids, timestamps)."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in ("id", "created", "request_id")}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return {line["custom_id"]: strip(line["response"]) for line in lines}


def test_replicas_on_both_nodes_and_health(ray_server: ServerProc) -> None:
    health = _health(ray_server)
    assert health["executor"] == "ray" and health["engine"] == "echo"
    assert health["replicas_alive"] == 2
    # One CPU per node and one per replica: Ray must place the second replica on the second node.
    assert len({r["node_id"] for r in health["replicas"]}) == 2
    assert all(psutil.pid_exists(r["pid"]) for r in health["replicas"])


def test_outputs_equal_the_local_executors(ray_server: ServerProc, server_factory: Callable[..., ServerProc]) -> None:
    rows = [chat_line(i, f"row {i} " + "x" * (i % 7)) for i in range(60)]
    rows.append({**chat_line("bad"), "body": {"model": "gpt-4o-mini", "messages": "not a list"}})
    local = server_factory(*SERVER_ARGS)
    assert _health(local)["executor"] == "local"
    results = []
    for srv in (ray_server, local):
        client = srv.client()
        b = run_batch(client, rows)
        assert b.status == "completed", b
        results.append((_bodies(read_jsonl(client, b.output_file_id)), _bodies(read_jsonl(client, b.error_file_id))))
    assert len(results[0][0]) + len(results[0][1]) == len(rows)
    assert results[0] == results[1]


def test_a_killed_replica_loses_no_row(ray_server: ServerProc) -> None:
    client = ray_server.client()
    n = 400
    before = {r["index"]: r for r in _health(ray_server)["replicas"]}
    f = upload(client, jsonl([chat_line(i) for i in range(n)]))
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 20
    while client.batches.retrieve(b.id).request_counts.completed < 40:  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the batch did not start"
        time.sleep(0.02)
    victim = before[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    done = wait_batch(client, b.id, timeout=60)
    assert done.status == "completed", done
    assert done.request_counts.completed == n and done.request_counts.failed == 0  # type: ignore[union-attr]
    out = read_jsonl(client, done.output_file_id)
    assert sorted(line["custom_id"] for line in out) == sorted(f"row-{i}" for i in range(n))  # each once
    assert not read_jsonl(client, done.error_file_id)
    # Ray restarts the replica (under load the other one may have finished the batch first).
    deadline = time.monotonic() + 30
    while not (after := _health(ray_server)["replicas"][0])["alive"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert after["alive"] and after["pid"] != victim and after["restarts"] >= 1, after
    assert "replica 0" in ray_server.log() and "died" in ray_server.log()


def test_ray_listens_on_loopback_only(cluster: dict[str, Any], ray_server: ServerProc) -> None:
    procs = _ray_processes(cluster["temp_dir"])
    assert ray_server.proc is not None
    procs += [psutil.Process(ray_server.proc.pid), *psutil.Process(ray_server.proc.pid).children(recursive=True)]
    listening = []
    for proc in procs:
        try:
            conns = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        listening += [(proc.pid, c.laddr.ip) for c in conns if c.status == psutil.CONN_LISTEN]
    assert listening  # the check saw Ray's sockets
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for _, ip in listening), listening


def test_an_unplaceable_replica_makes_batches_wait(
    cluster: dict[str, Any], server_factory: Callable[..., ServerProc]
) -> None:
    srv = server_factory(
        *SERVER_ARGS, "--executor", "ray", "--ray-address", cluster["address"], "--replicas", "1",
        "--replica-resources", '{"no_such_accelerator": 1}', "--replica-placement-wait", "0.5",
    )  # fmt: skip
    assert _health(srv)["replicas_alive"] == 0
    assert "replica 0 not ready after 0.5 s: not placed" in srv.log()
    client = srv.client()
    f = upload(client, jsonl([chat_line(i) for i in range(3)]))
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    time.sleep(1.0)
    b = client.batches.retrieve(b.id)
    assert b.status == "in_progress" and b.request_counts.completed == 0, b  # type: ignore[union-attr]
    client.batches.cancel(b.id)  # rows waiting for a replica are cancelled like any others
    done = wait_batch(client, b.id, timeout=20)
    assert done.status == "cancelled" and done.request_counts.failed == 3, done  # type: ignore[union-attr]


def test_kill_9_of_the_api_process_mid_batch_loses_no_row(
    cluster: dict[str, Any], server_factory: Callable[..., ServerProc]
) -> None:
    # --replica-cpus 0: the module's server holds both CPUs of the cluster.
    args = [*SERVER_ARGS, "--executor", "ray", "--ray-address", cluster["address"], "--replicas", "2"]
    srv = server_factory(*args, "--replica-cpus", "0")
    client = srv.client()
    n = 400
    f = upload(client, jsonl([chat_line(i) for i in range(n)]))
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 20
    while client.batches.retrieve(b.id).request_counts.completed < 40:  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the batch did not start"
        time.sleep(0.02)
    old = [r["pid"] for r in _health(srv)["replicas"]]
    srv.kill()  # its replicas die with it (Ray ties an actor to the process that created it)
    srv.start(timeout=60)  # new replicas; the journal says which rows are still owed
    done = wait_batch(client, b.id, timeout=60)
    assert done.status == "completed", done
    assert done.request_counts.completed == n and done.request_counts.failed == 0  # type: ignore[union-attr]
    out = read_jsonl(client, done.output_file_id)
    assert sorted(line["custom_id"] for line in out) == sorted(f"row-{i}" for i in range(n))  # each once
    deadline = time.monotonic() + 20
    while any(psutil.pid_exists(pid) for pid in old) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(psutil.pid_exists(pid) for pid in old), "the killed server's replicas outlived it"
