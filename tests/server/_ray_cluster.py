"""A two-node Ray cluster on 127.0.0.1 for the Ray executor's tests, run as its own process.

    python _ray_cluster.py TEMP_DIR [CPUS GPUS]

starts a head and a second node (1 CPU each, or CPUS and GPUS each: Ray takes declared GPUs at
their word, so a test can place GPU actors where there is none) with `ray.cluster_utils.Cluster`,
prints one JSON line {"address": ..., "pids": [...]}, then reads commands from stdin, one JSON
object a line, answering each with one JSON line:

    {"add": {"num_cpus": 0, "resources": {"x": 1}}}  -> {"node": 3, "pids": [...]}  (a node joins)
    {"remove": 3}                                    -> {"removed": 3}  (its processes SIGKILLed)

and when stdin closes it shuts the cluster down. The tests start it with `running_cluster`, which
sets the environment (RAY_TMPDIR, RAY_AUTH_MODE, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: Ray's own
`ray start` swaps 127.0.0.1 for the routable address, so the tests do not use it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

# The servers a test starts are children of the test process and inherit these; so does the helper.
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",  # a ~/.ray/auth_token left by another run must not turn token auth on
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keeps 127.0.0.1 as the nodes' address (see the docstring)
}
SRC = str(Path(__file__).resolve().parents[2] / "src")


@contextlib.contextmanager
def running_cluster(log_dir: Path, *args: str) -> Iterator[dict[str, Any]]:
    """This script run as a helper process (`args`: CPUS GPUS): yields {"address", "pids",
    "temp_dir", "helper"}; at the end stops it, kills whatever Ray process of it is left (by PID)
    and restores the environment. Meanwhile the environment is set for Ray on 127.0.0.1, and
    PYTHONPATH lets Ray's worker processes (the replicas) import this checkout's llmbatch."""
    # Ray's socket paths must fit in 107 bytes: pytest's temp dirs under xdist are too long.
    temp_dir = Path(tempfile.mkdtemp(prefix="lbray-", dir="/tmp"))
    (temp_dir / "ray").mkdir()
    saved = {k: os.environ.get(k) for k in (*RAY_ENV, "RAY_TMPDIR", "PYTHONPATH")}
    os.environ.update(RAY_ENV, RAY_TMPDIR=str(temp_dir))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, saved["PYTHONPATH"]) if p)
    log = log_dir / "cluster.log"
    helper = subprocess.Popen(
        [sys.executable, __file__, str(temp_dir), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=open(log, "wb"),
        text=True,
    )
    try:
        assert helper.stdout is not None
        line = helper.stdout.readline()
        assert line, f"the Ray cluster did not start: {log.read_text()[-3000:]}"
        yield {**json.loads(line), "temp_dir": temp_dir, "helper": helper}
    finally:
        assert helper.stdin is not None
        helper.stdin.close()
        try:
            helper.wait(30)
        except subprocess.TimeoutExpired:
            helper.kill()
        for proc in ray_processes(temp_dir):  # whatever the shutdown left: ours only, by PID
            proc.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def ray_processes(temp_dir: Path) -> list[psutil.Process]:
    """The processes of one of these clusters: their command lines name its temp dir."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(temp_dir) in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _pids(node: Any) -> list[int]:
    return [p.process.pid for ps in node.all_processes.values() for p in ps]


def main(temp_dir: str, cpus: int = 1, gpus: int = 0) -> None:
    from ray.cluster_utils import Cluster

    common: dict[str, Any] = {
        "node_ip_address": "127.0.0.1",
        "num_cpus": cpus,
        **({"num_gpus": gpus} if gpus else {}),
        "object_store_memory": 80 * 1024 * 1024,
    }
    cluster = Cluster(
        initialize_head=True,
        shutdown_at_exit=False,
        head_node_args={
            **common,
            "include_dashboard": False,
            "temp_dir": temp_dir,
            # A killed node is declared dead after ~3 s instead of Ray's default ~15 s (5 missed
            # checks 3 s apart): until then replicas Ray was placing there wait for it.
            "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
        },
    )
    nodes = {1: cluster.head_node, 2: cluster.add_node(**common)}
    print(json.dumps({"address": cluster.address, "pids": _pids(nodes[1]) + _pids(nodes[2])}), flush=True)
    try:
        for line in sys.stdin:  # until the test closes it
            command = json.loads(line)
            if "add" in command:
                index = max(nodes) + 1
                nodes[index] = cluster.add_node(**{**common, **command["add"]})
                answer: dict[str, Any] = {"node": index, "pids": _pids(nodes[index])}
            else:
                cluster.remove_node(nodes.pop(command["remove"]), allow_graceful=False)
                answer = {"removed": command["remove"]}
            print(json.dumps(answer), flush=True)
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], *(int(n) for n in sys.argv[2:4]))
