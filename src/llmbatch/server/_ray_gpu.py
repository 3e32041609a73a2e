"""What one Ray executor replica asks of Ray: CPUs, GPUs, and for a tensor-parallel vLLM engine
a placement group of its own.

A vllm replica with `tensor_parallel_size` 1 is one actor with one GPU (`num_gpus=1` unless
`--replica-resources` names a GPU count): without it Ray would place the actor where no GPU is
visible to it, and vLLM would fail. With `tensor_parallel_size` N > 1 the replica gets a
placement group of N bundles of one GPU each on one node (STRICT_PACK: tensor-parallel traffic
stays on the node's own links), the replica's CPUs in the first bundle. The actor runs in that
first bundle without a GPU and captures its child tasks, and vLLM is told
`distributed_executor_backend="ray"`: vLLM then finds the group with
`ray.util.get_current_placement_group()` (`EngineArgs.create_engine_config` in the actor, handed
on to its engine-core process) and starts one worker per GPU bundle in it
(`initialize_ray_cluster` accepts bundles of at most one GPU and needs N of them;
`RayDistributedExecutor._init_workers_ray` gives each worker `num_cpus=0, num_gpus=1` in its
bundle). Ray Data LLM and OpenRLHF schedule their vLLM actors the same way.

A group Ray cannot place (no node with N free GPUs) leaves its actor unplaced: the executor
treats it as any unplaced replica (a log line; batches wait; it joins once placed). Groups live
as long as the server (and die with its process); `aclose` removes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._exceptions import ConfigError

__all__ = ["ReplicaShape", "place_replica", "replica_shape"]


@dataclass(frozen=True)
class ReplicaShape:
    """The resources of one replica, and the engine options it is built with."""

    cpus: float
    #: GPUs of the actor itself (0 when its GPUs are in `bundles`).
    gpus: float
    #: Custom resources of the actor (never CPU or GPU: Ray takes those as num_cpus / num_gpus).
    resources: dict[str, float]
    #: A placement group per replica, one bundle per tensor-parallel worker; None: the actor alone.
    bundles: list[dict[str, float]] | None
    engine_options: dict[str, Any] | None

    def total(self) -> dict[str, float]:
        """Everything one replica takes from the cluster, by resource name."""
        if self.bundles is None:
            need = {"CPU": self.cpus, "GPU": self.gpus, **self.resources}
        else:
            need = {}
            for bundle in self.bundles:
                for name, amount in bundle.items():
                    need[name] = need.get(name, 0.0) + amount
        return {name: amount for name, amount in need.items() if amount > 0}

    def describe(self) -> str:
        """For log lines: what a replica waits for."""
        if self.bundles is None:
            return str(self.total())
        return f"a placement group of {len(self.bundles)} GPUs on one node ({self.total()})"


def replica_shape(
    engine: str, options: dict[str, Any] | None, cpus: float, resources: dict[str, float]
) -> ReplicaShape:
    """The shape of a replica of `engine` with `options` (the fields the user set), `cpus` CPUs
    (`--replica-cpus`) and `resources` (`--replica-resources`, where "GPU" is Ray's num_gpus)."""
    custom = dict(resources)
    if "CPU" in custom:
        raise ConfigError('--replica-resources: give the CPUs per replica with --replica-cpus, not "CPU"')
    gpus = custom.pop("GPU", None)
    tp = int((options or {}).get("tensor_parallel_size", 1)) if engine == "vllm" else 1
    if tp == 1:
        # A vllm replica without a GPU of its own would land where vLLM cannot run.
        default = 1.0 if engine == "vllm" else 0.0
        return ReplicaShape(cpus, default if gpus is None else gpus, custom, None, options)
    if gpus is not None and gpus != tp:
        raise ConfigError(
            f"--replica-resources asks {gpus:g} GPUs per replica, but --tensor-parallel-size {tp} "
            f"needs {tp}: leave GPU out (each replica gets {tp}, one per tensor-parallel worker)"
        )
    first = {"GPU": 1.0, **({"CPU": cpus} if cpus > 0 else {}), **custom}
    bundles = [first] + [{"GPU": 1.0} for _ in range(tp - 1)]
    return ReplicaShape(cpus, 0.0, custom, bundles, {**(options or {}), "distributed_executor_backend": "ray"})


def place_replica(actor_class: Any, shape: ReplicaShape, *args: Any, **actor_options: Any) -> tuple[Any, Any]:
    """Starts one replica actor of `actor_class` (a `ray.remote` class) with `args`; returns it
    and its placement group (None without one). It does not wait for Ray to place either."""
    options: dict[str, Any] = {"num_cpus": shape.cpus, "num_gpus": shape.gpus, **actor_options}
    if shape.resources:
        options["resources"] = shape.resources
    group = None
    if shape.bundles is not None:
        from ray.util import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = placement_group(shape.bundles, strategy="STRICT_PACK")
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=group,
            placement_group_bundle_index=0,  # the bundle that holds the replica's CPUs
            # vLLM's workers, started by the actor (and its engine-core process), land in the group.
            placement_group_capture_child_tasks=True,
        )
    return actor_class.options(**options).remote(*args), group
