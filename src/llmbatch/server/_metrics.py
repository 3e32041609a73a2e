"""/metrics through prometheus_client, and the meter every engine call goes through.

What a scrape shows depends on who asks (README, "/metrics"):

- anyone, even without a key: process-level series (CPU, memory, file descriptors, Python,
  `llmbatch_build_info`), which say nothing about any tenant;
- with a valid key (or on an open server): also the server's load, the same for every key
  (requests by endpoint and status, engine latency, requests in flight, rows queued, the Ray
  replicas), and the caller's own batches: by status, their state changes, rows and tokens.
  Another key's batches never appear: those series are read from the store for the caller's
  owner tag at each scrape (and so survive restarts).
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.responses import Response

from .. import __version__
from ..engines import Engine, EngineRequest, EngineResponse
from ._eta import Throughput
from ._history import RateWindow

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from ._state import ServerState

__all__ = ["EngineMeter", "HTTPMeter", "router"]

# Our counters are read as rates; the `_created` series would double every counter's lines.
disable_created_metrics()

#: Engine latency buckets, seconds: an echo row (sub-millisecond) to a long generation.
_LATENCY = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

router = APIRouter()


class EngineMeter:
    """Counts and times every engine call: batch rows (`source="batch"`) and direct requests."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "llmbatch_requests",
            "Requests answered by the engine.",
            ["source", "endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "llmbatch_engine_latency_seconds",
            "Seconds the engine took to answer a request.",
            ["source", "endpoint"],
            buckets=_LATENCY,
            registry=self.registry,
        )
        self._in_flight = Gauge(
            "llmbatch_engine_requests_in_flight", "Requests the engine is answering now.", ["source"],
            registry=self.registry,
        )  # fmt: skip
        self.tokens = Counter(
            "llmbatch_tokens", "Tokens of the engine's answers.", ["source", "direction"], registry=self.registry
        )
        #: Rows and tokens per 10 s, for the dashboard's engine panel.
        self.rates = RateWindow()
        #: Requests in the engine now, by source (what the dashboard shows).
        self.in_flight: Tally[str] = Tally()
        #: Output tokens per second of busy time, by source (the estimate of a long batch's time).
        self.throughput: defaultdict[str, Throughput] = defaultdict(Throughput)

    async def handle(self, engine: Engine, source: str, request: EngineRequest) -> EngineResponse:
        """`engine.handle(request)`, counted and timed."""
        t0 = time.perf_counter()
        throughput = self.throughput[source]
        throughput.begin()
        resp: EngineResponse | None = None
        try:
            with self.busy(source):
                try:
                    resp = await engine.handle(request)
                except BaseException:
                    self.requests.labels(source, request.endpoint, "500").inc()
                    raise
        finally:
            usage = resp.usage if resp is not None and resp.ok else None
            throughput.end(usage.output_tokens if usage is not None else None)
        assert resp is not None  # handle returned (an exception went up above)
        self.record(source, request.endpoint, resp, time.perf_counter() - t0)
        return resp

    @contextmanager
    def busy(self, source: str) -> Iterator[None]:
        """Counts a request in flight while the block runs (a streamed answer runs outside `handle`)."""
        gauge = self._in_flight.labels(source)
        gauge.inc()
        self.in_flight[source] += 1
        try:
            yield
        finally:
            gauge.dec()
            self.in_flight[source] -= 1

    def record(self, source: str, endpoint: str, resp: EngineResponse, seconds: float) -> None:
        """Counts one answered request: its status, latency and tokens."""
        self.latency.labels(source, endpoint).observe(seconds)
        self.requests.labels(source, endpoint, str(resp.status_code)).inc()
        tokens = 0
        if resp.usage is not None:
            self.tokens.labels(source, "input").inc(resp.usage.input_tokens)
            self.tokens.labels(source, "output").inc(resp.usage.output_tokens)
            tokens = resp.usage.input_tokens + resp.usage.output_tokens
        self.rates.add(1, tokens)


class HTTPMeter:
    """ASGI middleware: every HTTP request by route template (never a raw path: ids would make
    a series per object and name them) and status."""

    def __init__(self, app: ASGIApp, registry: CollectorRegistry) -> None:
        self.app = app
        self.requests = Counter(
            "llmbatch_http_requests", "HTTP requests answered, by route and status.", ["method", "route", "status"],
            registry=registry,
        )  # fmt: skip
        self.duration = Histogram(
            "llmbatch_http_request_duration_seconds", "Seconds from a request's arrival to its answer's start.",
            ["route"], buckets=_LATENCY, registry=registry,
        )  # fmt: skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                route = scope.get("route")
                name = getattr(route, "path", None) or "other"
                self.duration.labels(name).observe(time.perf_counter() - t0)
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            route = scope.get("route")
            self.requests.labels(scope["method"], getattr(route, "path", None) or "other", str(status)).inc()


class _ServerCollector(Collector):
    """The series read at scrape time: the engine's own (Ray replicas), rows queued, and the
    caller's batches (None: none, for a caller without a key)."""

    def __init__(self, srv: ServerState, owner: str | None) -> None:
        self.srv = srv
        self.owner = owner

    def collect(self) -> Iterator[Metric]:
        srv = self.srv
        for family in srv.engine.metric_families():
            make = CounterMetricFamily if family.type == "counter" else GaugeMetricFamily
            labels = list(family.samples[0][0]) if family.samples else []
            m = make(family.name, family.help, labels=labels)
            for sample_labels, value in family.samples:
                m.add_metric([sample_labels[k] for k in labels], value)
            yield m
        if srv.store is None:
            return
        queued = GaugeMetricFamily(
            "llmbatch_queue_rows", "Rows of running batches not answered yet (all keys: the engine's backlog)."
        )
        queued.add_metric([], srv.store.rows_pending())
        yield queued
        if self.owner is None:
            return
        batches = GaugeMetricFamily("llmbatch_batches", "Your batches by status.", labels=["status"])
        for status, n in sorted(srv.store.count_by_status(self.owner).items()):
            batches.add_metric([status], n)
        yield batches
        moves = CounterMetricFamily(
            "llmbatch_batch_transitions", "Your batches' state changes.", labels=["from_status", "to_status"]
        )
        # from_status="none": the batch's creation (it enters validating from nothing).
        moved = {(frm or "none", to): n for (frm, to), n in srv.store.transition_counts(self.owner).items()}
        for (frm, to), n in sorted(moved.items()):
            moves.add_metric([frm, to], n)
        yield moves
        totals = srv.store.usage_totals(self.owner)
        rows = CounterMetricFamily("llmbatch_batch_rows", "Rows of your batches answered.", labels=["outcome"])
        tokens = CounterMetricFamily("llmbatch_batch_tokens", "Tokens of your batches' rows.", labels=["direction"])
        for outcome in ("completed", "failed"):
            rows.add_metric([outcome], totals[outcome])
        for direction in ("input", "output"):
            tokens.add_metric([direction], totals[f"{direction}_tokens"])
        yield rows
        yield tokens


class _View:
    """What one scrape shows: the registries' and collectors' series, in order."""

    def __init__(self, sources: Iterable[CollectorRegistry | Collector]) -> None:
        self.sources = list(sources)

    def collect(self) -> Iterator[Metric]:
        for source in self.sources:
            yield from source.collect()


def public_registry(srv: ServerState) -> CollectorRegistry:
    """Process-level series, shown to anyone."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    Info("llmbatch_build", "The server's version, engine and executor.", registry=registry).info(
        {"version": __version__, "engine": srv.engine.name, "executor": srv.config.executor}
    )
    return registry


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    srv: ServerState = request.app.state.server
    sources: list[CollectorRegistry | Collector] = [srv.public_metrics]
    if request.headers.get("authorization") or not srv.has_keys:
        owner = srv.owner(request)  # a wrong key is refused (401), not taken for no key
        sources += [srv.meter.registry, srv.http_metrics, _ServerCollector(srv, owner)]
    # else no key on a server with keys: process-level series only
    return Response(generate_latest(_View(sources)), media_type="text/plain; version=0.0.4; charset=utf-8")
