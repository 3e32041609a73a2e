"""A two-node Ray cluster on 127.0.0.1 for the Ray executor's tests, run as its own process.

    python _ray_cluster.py TEMP_DIR

starts a head and a second node (1 CPU each) with `ray.cluster_utils.Cluster`, prints one JSON
line {"address": ..., "pids": [...]}, then reads commands from stdin, one JSON object a line,
answering each with one JSON line:

    {"add": {"num_cpus": 0, "resources": {"x": 1}}}  -> {"node": 3, "pids": [...]}  (a node joins)
    {"remove": 3}                                    -> {"removed": 3}  (its processes SIGKILLed)

and when stdin closes it shuts the cluster down. The caller sets the environment (RAY_TMPDIR,
RAY_AUTH_MODE, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: Ray's own `ray start` swaps 127.0.0.1 for
the routable address, so the tests do not use it).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from ray.cluster_utils import Cluster

COMMON: dict[str, Any] = {"node_ip_address": "127.0.0.1", "num_cpus": 1, "object_store_memory": 80 * 1024 * 1024}


def _pids(node: Any) -> list[int]:
    return [p.process.pid for ps in node.all_processes.values() for p in ps]


def main(temp_dir: str) -> None:
    cluster = Cluster(
        initialize_head=True,
        shutdown_at_exit=False,
        head_node_args={
            **COMMON,
            "include_dashboard": False,
            "temp_dir": temp_dir,
            # A killed node is declared dead after ~3 s instead of Ray's default ~15 s (5 missed
            # checks 3 s apart): until then replicas Ray was placing there wait for it.
            "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
        },
    )
    nodes = {1: cluster.head_node, 2: cluster.add_node(**COMMON)}
    print(json.dumps({"address": cluster.address, "pids": _pids(nodes[1]) + _pids(nodes[2])}), flush=True)
    try:
        for line in sys.stdin:  # until the test closes it
            command = json.loads(line)
            if "add" in command:
                index = max(nodes) + 1
                nodes[index] = cluster.add_node(**{**COMMON, **command["add"]})
                answer: dict[str, Any] = {"node": index, "pids": _pids(nodes[index])}
            else:
                cluster.remove_node(nodes.pop(command["remove"]), allow_graceful=False)
                answer = {"removed": command["remove"]}
            print(json.dumps(answer), flush=True)
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
