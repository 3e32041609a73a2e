"""The Ray executor: rows run on engine replicas that are Ray actors, anywhere in a Ray cluster.

`RayEngine` is an `Engine`, so the batch worker does not change: it journals every result,
shares the row budget fairly, cancels, expires and pauses on a full disk exactly as with a local
engine. Only `handle` differs: a request goes into one queue, and one dispatcher sends slices of
it (a list of requests per actor call, so Ray's per-call cost is paid once per slice) to the
ready replica with the fewest rows in flight, while one has room, and hands the answers back.
Rows in flight stay bounded by the worker's slots, which `max_concurrency` (the replicas'
concurrency summed) sets: that is the backpressure.

A replica (`_Replica`, one actor) wraps a real engine built by `create_engine` from the same
name and options as a local one. When its process dies, the slice it held goes back to the front
of the queue for a live replica, and Ray restarts the actor (`max_restarts=-1`); a row's caller
is answered once, so no row is journaled twice. A replica Ray cannot place (no resources) just
takes no work, with a log line, until it can; one whose engine cannot start fails the server
start with its error and node, or, placed after the start, stays down with that error logged.

GPUs: a vllm replica asks Ray for its GPU, or for a placement group of its own when its model is
split across GPUs (see `_ray_gpu`). The API process needs neither vLLM nor a GPU: when it cannot
build the engine for want of them (EngineUnavailable), the first replica placed sends the
engine's facts (`Engine.facts`: endpoints, model names and checks, rows in flight) instead.

Every Ray import happens in functions: the server imports this module without Ray installed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import os
import re
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from .._exceptions import ConfigError, EngineError, EngineUnavailable
from ..engines import Engine, EngineFacts, EngineRequest, EngineResponse, MetricFamily, create_engine, error_body
from ._config import ServerConfig
from ._ray_gpu import place_replica, replica_shape

__all__ = ["RayEngine", "is_loopback_address"]

log = logging.getLogger("llmbatch.server")

#: The largest slice is a replica's max_concurrency / SLICES_PER_REPLICA rows: every row of a
#: slice waits for its slowest, so a slice smaller than the replica's room lets the next slices
#: start while one finishes (continuous batching stays fed).
SLICES_PER_REPLICA = 4
#: How long a slice that is not full waits for more rows (see `_Queue.take`).
LINGER_S = 0.005
#: Rows/s per replica (/health, the log) are over this many most recent seconds.
RATE_WINDOW_S = 60
#: Seconds between the log lines of replica throughput (only while rows move).
LOG_EVERY_S = 30.0


def is_loopback_address(address: str | None) -> bool:
    """True for None (a local Ray instance) and addresses on 127.0.0.0/8 or localhost."""
    if address is None:
        return True
    host = address.removeprefix("ray://").rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "auto" or a host name: whatever the cluster advertises


def _check_reachable(address: str) -> None:
    """Fails at once, naming the address, when nothing listens at a HOST:PORT `--ray-address`
    (ray.init would retry for minutes). "auto" is left to Ray: it fails fast when no Ray runs."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise ConfigError(
            f"--ray-address {address}: no Ray answers there ({why}); start it with `ray start --head`"
        ) from None


class _ReplicaActor:
    """One engine replica, run by Ray as an async actor (see `_actor_class`)."""

    def __init__(self, engine: str, options: dict[str, Any] | None) -> None:
        self.engine = create_engine(engine, options)
        self._started: asyncio.Task[None] | None = None

    async def _start(self) -> None:
        if self._started is None:
            self._started = asyncio.ensure_future(self.engine.start())
        await asyncio.shield(self._started)

    async def facts(self) -> EngineFacts:
        """The engine's facts as built, before its start (which may take minutes for vLLM)."""
        return self.engine.facts()

    async def ready(self) -> tuple[int, str, str | None]:
        """Starts the engine: its process id, Ray node id (what /health shows) and why the engine
        could not start (None when it did), the node named, as a model may be missing on one node."""
        import ray

        node_id = ray.get_runtime_context().get_node_id()
        try:
            await self._start()
        except Exception as exc:
            known = isinstance(exc, (ConfigError, EngineError))
            why = f"{'' if known else type(exc).__name__ + ': '}{exc}"
            return os.getpid(), node_id, f"on node {ray.util.get_node_ip_address()} ({node_id[:8]}): {why}"
        return os.getpid(), node_id, None

    async def handle_many(self, requests: list[EngineRequest]) -> list[EngineResponse]:
        await self._start()
        return list(await asyncio.gather(*(self._one(r) for r in requests)))

    async def _one(self, request: EngineRequest) -> EngineResponse:
        try:
            return await self.engine.handle(request)
        except Exception as exc:  # an engine bug fails its row, as in the local worker
            return EngineResponse(500, error_body(f"engine error: {exc}", "server_error"))

    async def list_models(self) -> list[dict[str, Any]]:
        await self._start()
        return await self.engine.list_models()


@dataclass
class _Item:
    request: EngineRequest
    future: asyncio.Future[EngineResponse]


class _Rate:
    """Rows answered per second over the last RATE_WINDOW_S seconds, in one-second buckets."""

    def __init__(self) -> None:
        self._buckets: collections.deque[list[int]] = collections.deque()  # [second, rows]
        self._first: float | None = None

    def add(self, rows: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self._first is None:
            self._first = now
        second = int(now)
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += rows
        else:
            self._buckets.append([second, rows])
        self._prune(now)

    def per_second(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self._prune(now)
        if self._first is None or not self._buckets:
            return 0.0
        # A replica that started answering 5 s ago has a 5 s window, not 60.
        span = min(float(RATE_WINDOW_S), max(1.0, now - self._first))
        return sum(rows for _, rows in self._buckets) / span

    def _prune(self, now: float) -> None:
        while self._buckets and self._buckets[0][0] <= now - RATE_WINDOW_S:
            self._buckets.popleft()


@dataclass
class _Replica:
    index: int
    actor: Any
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    pid: int | None = None
    node_id: str | None = None
    restarts: int = 0
    #: Why its engine could not start (it then takes no rows).
    error: str | None = None
    rows: int = 0
    #: Rows sent back to the queue because this replica died with them.
    rows_requeued: int = 0
    rate: _Rate = field(default_factory=_Rate)
    #: Rows sent and not answered yet; at most the engine's max_concurrency.
    inflight: int = 0
    #: When it was last sent a slice: of equally loaded replicas the one idle longest goes first.
    last_sent: float = 0.0


class _Queue:
    """Rows waiting for a replica; a dead replica's slice goes back to the front."""

    def __init__(self) -> None:
        self._items: collections.deque[_Item] = collections.deque()
        self._nonempty = asyncio.Event()
        self._grew = asyncio.Event()

    def put(self, item: _Item) -> None:
        self._items.append(item)
        self._nonempty.set()
        self._grew.set()

    def put_back(self, items: list[_Item]) -> None:
        self._items.extendleft(reversed(items))
        if self._items:
            self._nonempty.set()

    async def take(self, most: int) -> list[_Item]:
        """Up to `most` rows whose caller still waits (a cancelled row is dropped here). When
        fewer are waiting, it lingers up to LINGER_S for more: the worker queues rows one by one, and
        a slice per row costs a Ray call per row (1-row slices ran at half the local rate)."""
        while True:
            while not self._items:
                self._nonempty.clear()
                await self._nonempty.wait()
            deadline = time.monotonic() + LINGER_S
            while len(self._items) < most and (left := deadline - time.monotonic()) > 0:
                self._grew.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._grew.wait(), left)
            out: list[_Item] = []
            while self._items and len(out) < most:
                item = self._items.popleft()
                if not item.future.done():
                    out.append(item)
            if out:
                return out


class RayEngine(Engine):
    """The configured engine, run as `config.replicas` Ray actors (see the module's docstring)."""

    def __init__(self, config: ServerConfig) -> None:
        self._config = config
        self._options = config.engine_options.model_dump(exclude_unset=True) if config.engine_options else None
        self._shape = replica_shape(config.engine, self._options, config.replica_cpus, config.replica_resources)
        # Built here too, never started: what the API process asks an engine without running it
        # (endpoints, model checks for validation) is answered as a local engine would. Where this
        # process lacks the engine's library or a GPU, a replica answers instead (see `start`);
        # any other ConfigError (a bad option) fails here, as with the local executor.
        self._local: Engine | None = None
        self._unavailable = ""
        try:
            self._local = create_engine(config.engine, config.engine_options)
        except EngineUnavailable as exc:
            self._unavailable = str(exc)
        self._about: Engine | EngineFacts | None = self._local
        self.name = config.engine  # type: ignore[misc]
        self.endpoints = frozenset()
        self._per_replica = 0
        self._slice = 1
        if self._local is not None:
            self._learn(self._local.facts())
        self._queue = _Queue()
        self._replicas: list[_Replica] = []
        self._groups: list[Any] = []  # the replicas' placement groups, if any
        self._tasks: list[asyncio.Task[None]] = []
        self._room = asyncio.Event()
        self._started_ray = False
        self.max_concurrency = self._per_replica * (config.replicas or 1)

    def _learn(self, facts: EngineFacts) -> None:
        self.name = facts.name  # type: ignore[misc]
        self.endpoints = facts.endpoints
        self._per_replica = facts.max_concurrency
        self._slice = max(1, self._per_replica // SLICES_PER_REPLICA)

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self._init_ray()
        import ray

        count = self._config.replicas or self._replicas_that_fit(ray.cluster_resources())
        actor_class = ray.remote(_ReplicaActor)
        for index in range(count):
            actor, group = place_replica(
                actor_class,
                self._shape,
                self._config.engine,
                self._shape.engine_options,
                max_restarts=-1,  # Ray brings a killed replica back; its slice was re-queued
                # A slice may be one row; + ready/list_models/facts. Not known yet without a local
                # engine: Ray's own default for async actors then.
                max_concurrency=self._per_replica + 4 if self._per_replica else 1000,
            )
            self._replicas.append(_Replica(index, actor))
            if group is not None:
                self._groups.append(group)
        if self._about is None:
            await self._ask_replicas()
        self.max_concurrency = self._per_replica * count
        await self._await_replicas()
        self._tasks.append(asyncio.create_task(self._dispatch(), name="ray-dispatch"))
        self._tasks.append(asyncio.create_task(self._log_rates(), name="ray-replica-rates"))
        alive = sum(r.ready.is_set() for r in self._replicas)
        log.info(
            "ray executor: %d of %d %s replicas ready, %d rows in flight",
            alive, count, self.name, self.max_concurrency,
        )  # fmt: skip

    def _init_ray(self) -> None:
        # Before Ray is imported: it reads these once, at import.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phoning home
        address = self._config.ray_address
        if is_loopback_address(address):
            # Ray swaps 127.0.0.1 for the machine's routable address unless told this is a
            # one-machine setup; with it, every Ray socket of this driver binds to 127.0.0.1.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        import ray

        if ray.is_initialized():
            return
        if address is not None:
            _check_reachable(address)
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        if address is None:
            kwargs.update(_node_ip_address="127.0.0.1", num_cpus=os.cpu_count() or 1)
            self._started_ray = True
        # ray.init takes SIGTERM for itself (it exits at once); the server's own handler must stay,
        # so that a stop finishes gracefully: rows in flight end, replicas and Ray shut down.
        sigterm = signal.getsignal(signal.SIGTERM)
        try:
            ray.init(address=address, **kwargs)
        except Exception as exc:
            raise ConfigError(f"--ray-address {address or '(none: a local Ray)'}: cannot reach Ray ({exc})") from None
        finally:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, sigterm)

    def _replicas_that_fit(self, resources: dict[str, float]) -> int:
        fits = [int(resources.get(k, 0.0) // v) for k, v in self._shape.total().items()]
        return max(1, min(fits) if fits else 1)

    @staticmethod
    async def _answers(pending: list[Any], deadline: float) -> AsyncIterator[Any]:
        """Yields each Ray ref of `pending` as it completes, until `deadline`; the refs still
        pending then are left in `pending`."""
        import ray

        while pending and time.monotonic() < deadline:
            done, pending[:] = await asyncio.to_thread(
                ray.wait, pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic())
            )
            for ref in done:
                yield ref

    async def _ask_replicas(self) -> None:
        """This process cannot build the engine (no library or GPU here): the first replica Ray
        places describes it. One whose engine cannot be built fails the start with its error."""
        refs = {r.actor.facts.remote(): r for r in self._replicas}
        wait = self._config.replica_placement_wait
        async with contextlib.aclosing(self._answers(list(refs), time.monotonic() + wait)) as answers:
            async for ref in answers:
                try:
                    facts: EngineFacts = await ref
                except Exception as exc:
                    await self.aclose()
                    raise EngineError(f"replica {refs[ref].index} could not be created: {_cause(exc)}") from None
                self._learn(facts)
                self._about = facts
                log.info("ray executor: replica %d describes the engine (%s)", refs[ref].index, self._unavailable)
                return
        await self.aclose()
        raise ConfigError(
            f"no {self.name} replica was placed within {wait:g} s (the cluster has no room for "
            f"{self._needs()} per replica), and this process cannot stand in to describe the engine "
            f"({self._unavailable}): free room, or give a longer --replica-placement-wait"
        )

    async def _await_replicas(self) -> None:
        """Waits for every replica's engine to start; one that fails to start fails the server.
        Replicas not placed within `replica_placement_wait` join later (see `_revive`)."""
        refs = {r.actor.ready.remote(): r for r in self._replicas}
        pending = list(refs)
        wait = self._config.replica_placement_wait
        async for ref in self._answers(pending, time.monotonic() + wait):
            replica = refs[ref]
            try:
                replica.pid, replica.node_id, replica.error = await ref
            except Exception as exc:  # the actor itself failed (e.g. llmbatch not importable there)
                replica.error = f"could not be created: {_cause(exc)}"
            if replica.error is not None:
                await self.aclose()
                raise EngineError(f"replica {replica.index} {replica.error}") from None
            replica.ready.set()
        for ref in pending:
            log.warning(
                "ray executor: replica %d not ready after %g s: not placed (the cluster has no room for %s "
                "per replica) or its engine still starting; batches wait for it",
                refs[ref].index, wait, self._needs(),
            )  # fmt: skip
            self._tasks.append(asyncio.create_task(self._revive(refs[ref], first=ref)))

    def _needs(self) -> str:
        return self._shape.describe()

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        try:
            import ray
        except ImportError:
            return
        for replica in self._replicas:
            try:
                ray.kill(replica.actor)
            except Exception:
                pass
        self._replicas.clear()
        from ray.util import remove_placement_group

        for group in self._groups:  # their GPUs are free for others at once, not when this process ends
            with contextlib.suppress(Exception):
                remove_placement_group(group)
        self._groups.clear()
        if self._started_ray and ray.is_initialized():
            ray.shutdown()

    # -- requests ------------------------------------------------------------------------

    async def handle(self, request: EngineRequest) -> EngineResponse:
        future: asyncio.Future[EngineResponse] = asyncio.get_running_loop().create_future()
        self._queue.put(_Item(request, future))
        return await future

    def _changed(self) -> None:
        """A replica came up, went down or answered: the dispatcher looks again."""
        self._room.set()

    async def _next_replica(self) -> _Replica:
        """The ready replica with the fewest rows in flight (room for one more at least)."""
        while True:
            ready = [r for r in self._replicas if r.ready.is_set() and r.inflight < self._per_replica]
            if ready:
                return min(ready, key=lambda r: (r.inflight, r.last_sent))
            self._room.clear()
            await self._room.wait()

    async def _dispatch(self) -> None:
        """Sends slices of the queue to the least loaded replica while one has room (see the
        module's docstring): the rows spread over replicas even when each answers fast."""
        calls: set[asyncio.Task[None]] = set()
        try:
            while True:
                replica = await self._next_replica()
                items = await self._queue.take(min(self._slice, self._per_replica - replica.inflight))
                if not replica.ready.is_set():  # it died while this waited for rows
                    self._queue.put_back(items)
                    continue
                replica.inflight += len(items)
                replica.last_sent = time.monotonic()
                call = asyncio.create_task(self._call(replica, items))
                calls.add(call)
                call.add_done_callback(calls.discard)
        finally:
            for call in list(calls):
                call.cancel()

    async def _call(self, replica: _Replica, items: list[_Item]) -> None:
        from ray.exceptions import RayActorError

        try:
            answers = await replica.actor.handle_many.remote([i.request for i in items])
        except RayActorError as exc:
            self._queue.put_back(items)
            replica.rows_requeued += len(items)
            if replica.ready.is_set():
                replica.ready.clear()
                log.warning(
                    "ray executor: replica %d (pid %s) died (%s); its rows went back to the queue",
                    replica.index, replica.pid, type(exc).__name__,
                )  # fmt: skip
                self._tasks.append(asyncio.create_task(self._revive(replica)))
            return
        except asyncio.CancelledError:
            self._queue.put_back(items)
            raise
        finally:
            replica.inflight -= len(items)
            self._changed()
        replica.rows += len(items)
        replica.rate.add(len(items))
        for item, answer in zip(items, answers, strict=True):
            if not item.future.done():
                item.future.set_result(answer)

    async def _revive(self, replica: _Replica, first: Any = None) -> None:
        """Waits until Ray has restarted (or placed) the replica, then lets its dispatcher go on."""
        delay = 0.1
        ref = first
        while not replica.ready.is_set():
            try:
                replica.pid, replica.node_id, replica.error = await (
                    ref if ref is not None else replica.actor.ready.remote()
                )
            except Exception as exc:
                ref = None
                log.debug("ray executor: replica %d not back yet: %s", replica.index, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            if replica.error is not None:  # it stays down: its engine would fail the same way again
                log.error("ray executor: replica %d %s; it takes no rows", replica.index, replica.error)
                return
            replica.restarts += first is None
            replica.ready.set()
            self._changed()
            log.info("ray executor: replica %d ready (pid %s)", replica.index, replica.pid)

    # -- what the API process asks -------------------------------------------------------

    # The local engine, or a replica's facts once `start` has them: plain lookups, no Ray call
    # (validate_model runs on the event loop for direct requests, and per model in validation).

    def validate_model(self, model: str) -> str | None:
        assert self._about is not None, "the Ray executor answers once started"
        return self._about.validate_model(model)

    def model_family(self, model: str) -> str:
        assert self._about is not None, "the Ray executor answers once started"
        return self._about.model_family(model)

    def served_models(self) -> tuple[str, ...] | None:
        assert self._about is not None, "the Ray executor answers once started"
        return self._about.served_models()

    async def list_models(self) -> list[dict[str, Any]]:
        for replica in self._replicas:
            if replica.ready.is_set():
                try:
                    models: list[dict[str, Any]] = await replica.actor.list_models.remote()
                    return models
                except Exception:
                    continue
        if self._local is not None:
            return await self._local.list_models()
        return self._about.listing() if isinstance(self._about, EngineFacts) else []

    async def _log_rates(self) -> None:
        """Every LOG_EVERY_S, while rows move, one log line of each replica's rows/s and state."""
        done = 0
        while True:
            await asyncio.sleep(LOG_EVERY_S)
            total = sum(r.rows for r in self._replicas)
            if total == done:
                continue
            done = total
            log.info(
                "ray executor: %d of %d %s replicas alive; rows/s over the last minute: %s",
                sum(r.ready.is_set() for r in self._replicas), len(self._replicas), self.name,
                ", ".join(
                    f"replica {r.index} {r.rate.per_second():.1f}"
                    f" ({'node ' + r.node_id[:8] if r.node_id else 'not placed'}{'' if r.ready.is_set() else ', down'})"
                    for r in self._replicas
                ),
            )  # fmt: skip

    def health(self) -> dict[str, Any]:
        """What /health shows of the replicas."""
        return {
            "replicas_alive": sum(r.ready.is_set() for r in self._replicas),
            "replicas": [
                {
                    "index": r.index,
                    "alive": r.ready.is_set(),
                    "engine": self.name,
                    "pid": r.pid,
                    "node_id": r.node_id,
                    "restarts": r.restarts,
                    "error": r.error,
                    "rows": r.rows,
                    "rows_per_second": round(r.rate.per_second(), 2),
                    "rows_in_flight": r.inflight,
                    "rows_requeued": r.rows_requeued,
                }
                for r in self._replicas
            ],
        }

    def metric_families(self) -> list[MetricFamily]:
        """Per-replica series for /metrics (process state: no tenant, batch or file is named)."""
        labels = [{"replica": str(r.index), "node_id": r.node_id or ""} for r in self._replicas]
        series = list(zip(labels, self._replicas, strict=True))
        return [
            MetricFamily("llmbatch_replica_up", "gauge", "1 while the Ray replica's engine is ready.",
                         [(lab, float(r.ready.is_set())) for lab, r in series]),
            MetricFamily("llmbatch_replica_rows_total", "counter", "Rows answered by the Ray replica.",
                         [(lab, float(r.rows)) for lab, r in series]),
            MetricFamily("llmbatch_replica_rows_requeued_total", "counter",
                         "Rows the Ray replica died with, sent to the queue again.",
                         [(lab, float(r.rows_requeued)) for lab, r in series]),
            MetricFamily("llmbatch_replica_restarts_total", "counter", "Times Ray restarted the replica.",
                         [(lab, float(r.restarts)) for lab, r in series]),
            MetricFamily("llmbatch_replica_rows_in_flight", "gauge", "Rows sent to the replica, not answered yet.",
                         [(lab, float(r.inflight)) for lab, r in series]),
        ]  # fmt: skip


def _cause(exc: BaseException) -> str:
    """The engine's own message out of Ray's wrapping (a RayTaskError names the remote error; an
    actor whose constructor failed ends its message with "module.ErrorClass: message")."""
    cause = getattr(exc, "cause", None)
    if cause is not None:
        return str(cause)
    return re.sub(r"^[\w.]+\.[A-Z]\w*: ", "", str(exc).strip().splitlines()[-1])
