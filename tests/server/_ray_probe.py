"""A Ray driver for the GPU placement tests, run as its own process (the test process imported
Ray before it could be told to stay on 127.0.0.1):

    python _ray_probe.py ADDRESS

prints one JSON line: "place", where replicas shaped by `_ray_gpu` (a probe actor in place of
the engine) landed, and "engine", the errors of vllm `RayEngine`s started without vLLM and their
groups' states after. One process for both: connecting a driver costs seconds. The caller sets
the environment as for `_ray_cluster.py`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import ray
from ray.util import get_current_placement_group, placement_group_table, remove_placement_group

from llmbatch.server._ray_gpu import place_replica, replica_shape


class Probe:
    """Stands in for a replica's engine: reports its placement group, its GPUs, and where workers
    started as vLLM starts its tensor-parallel ones (`num_cpus=0, num_gpus=1`) land."""

    def where(self, workers: int) -> dict[str, Any]:
        group = get_current_placement_group()

        @ray.remote(num_cpus=0, num_gpus=1)
        def worker() -> tuple[str | None, list[Any]]:
            child_group = get_current_placement_group()
            return (child_group.id.hex() if child_group else None), ray.get_gpu_ids()

        return {
            "group": group.id.hex() if group else None,
            "node": ray.get_runtime_context().get_node_id(),
            "gpus": ray.get_gpu_ids(),
            "workers": ray.get([worker.remote() for _ in range(workers)], timeout=20),
        }


def place() -> dict[str, Any]:
    probe = ray.remote(Probe)
    out: dict[str, Any] = {}
    for name, engine, options, resources in (
        ("tp2", "vllm", {"tensor_parallel_size": 2}, {}),
        ("tp1", "vllm", {}, {}),
        ("echo_gpu", "echo", {}, {"GPU": 1.0}),
        ("tp3", "vllm", {"tensor_parallel_size": 3}, {}),  # 3 GPUs on one node: none has them
    ):
        shape = replica_shape(engine, options, 1.0, resources)
        actor, group = place_replica(probe, shape)
        workers = shape.total().get("GPU", 0) if shape.bundles else 0
        ready, _ = ray.wait([ref := actor.where.remote(int(workers))], timeout=1 if name == "tp3" else 30)
        out[name] = {
            "engine_options": shape.engine_options,
            "bundles": placement_group_table(group)["bundles"] if group else None,
            "group": group.id.hex() if group else None,
            "group_state": placement_group_table(group)["state"] if group else None,
            "where": ray.get(ref) if ready else None,
        }
        ray.kill(actor)
        if group is not None:
            remove_placement_group(group)
    return out


def engine() -> dict[str, Any]:
    import asyncio
    import tempfile

    from llmbatch._exceptions import ConfigError, EngineError
    from llmbatch.server import ServerConfig
    from llmbatch.server._ray import RayEngine

    out: dict[str, Any] = {}
    for tp, wait in ((2, 30.0), (3, 1.0)):  # a group Ray places, and one no node can hold
        before = set(placement_group_table())
        config = ServerConfig(
            data_dir=Path(tempfile.mkdtemp()), engine="vllm", executor="ray", ray_address=sys.argv[1], replicas=2,
            engine_options={"model_path": "/models/m", "tensor_parallel_size": tp}, replica_placement_wait=wait,
        )  # fmt: skip
        try:
            asyncio.run(RayEngine(config).start())
            error = None
        except (ConfigError, EngineError) as exc:
            error = str(exc)
        # This driver still runs: only the engine's own aclose can have removed its groups.
        states = [info["state"] for pg_id, info in placement_group_table().items() if pg_id not in before]
        out[f"tp{tp}"] = {"error": error, "groups": states}
    return out


if __name__ == "__main__":
    ray.init(address=sys.argv[1], include_dashboard=False, log_to_driver=False)
    print(json.dumps({"place": place(), "engine": engine()}), flush=True)
    ray.shutdown()
