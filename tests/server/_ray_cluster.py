"""A two-node Ray cluster on 127.0.0.1 for the Ray executor's tests, run as its own process.

    python _ray_cluster.py TEMP_DIR [CPUS GPUS]

starts a head and a second node (1 CPU each, or CPUS and GPUS each: Ray takes declared GPUs at
their word, so a test can place GPU actors where there is none) with `ray.cluster_utils.Cluster`,
prints one JSON line {"address": ..., "pids": [...]} and runs until its stdin closes, then shuts
both down.
The caller sets the environment (RAY_TMPDIR, RAY_AUTH_MODE, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0:
Ray's own `ray start` swaps 127.0.0.1 for the routable address, so the tests do not use it).
"""

from __future__ import annotations

import json
import sys

from ray.cluster_utils import Cluster


def main(temp_dir: str, cpus: int = 1, gpus: int = 0) -> None:
    common = {
        "node_ip_address": "127.0.0.1",
        "num_cpus": cpus,
        **({"num_gpus": gpus} if gpus else {}),
        "object_store_memory": 80 * 1024 * 1024,
    }
    cluster = Cluster(
        initialize_head=True,
        shutdown_at_exit=False,
        head_node_args={**common, "include_dashboard": False, "temp_dir": temp_dir},
    )
    node = cluster.add_node(**common)
    pids = [p.process.pid for n in (cluster.head_node, node) for ps in n.all_processes.values() for p in ps]
    print(json.dumps({"address": cluster.address, "pids": pids}), flush=True)
    try:
        sys.stdin.read()  # until the test closes it
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], *(int(n) for n in sys.argv[2:4]))
