"""`llmbatch serve`: the OpenAI-compatible Files + Batches API on your own engine."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from .. import __version__
from .._exceptions import EngineUnavailable
from .._paths import default_server_dir
from ._engine_options import ENGINE_HELP, EngineOptionsCommand, engine_config_options, engine_options, option_defaults

__all__ = ["serve"]


@click.command(cls=EngineOptionsCommand)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=int, help="Port to listen on.")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where metadata and files live [default: $LLMBATCH_HOME/server].",
)
@click.option("--engine", default="auto", show_default=True, help=ENGINE_HELP)
@engine_options
@click.option(
    "--api-key",
    "api_keys",
    multiple=True,
    envvar="LLMBATCH_API_KEYS",
    show_envvar=True,
    help="Accepted Bearer key (repeatable; the variable holds keys separated by spaces). None: the server is "
    "open. Each key sees only its own objects.",
)
@click.option("--echo-latency", type=float, default=0.0, show_default=True, help="echo: seconds added per request.")
@click.option(
    "--echo-fail-rate",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="echo: fraction of requests failing with a retryable 500 (deterministic per row).",
)
@click.option("--upstream-url", default=None, help="openai: base URL of an OpenAI-compatible API, with /v1.")
@click.option(
    "--upstream-api-key",
    envvar="LLMBATCH_UPSTREAM_API_KEY",
    show_envvar=True,
    default=None,
    help="openai: key sent upstream.",
)
@click.option(
    "--upstream-max-retries",
    "max_retries",
    type=click.IntRange(min=0),
    default=5,
    show_default=True,
    help="openai: retries of a 429, 5xx, timeout or connection error, with backoff (0.5 s, doubling).",
)
@click.option(
    "--max-concurrency", type=click.IntRange(min=1), default=64, show_default=True, help="Requests in flight at once."
)
@click.option(
    "--completion-window",
    "windows",
    multiple=True,
    default=("24h",),
    show_default=True,
    help="Accepted completion_window value (repeatable), e.g. 24h, 1h, 30m.",
)
@click.option("--max-file-size", default="200MB", show_default=True, help="Largest accepted upload, e.g. 200MB.")
@click.option(
    "--max-request-size",
    default="8MiB",
    show_default=True,
    help="Largest body of a direct request (chat, completions, responses, embeddings), e.g. 8MiB.",
)
@click.option(
    "--max-lines", type=click.IntRange(min=1), default=50_000, show_default=True, help="Most requests per batch."
)
@click.option(
    "--max-active-batches", type=click.IntRange(min=1), default=4, show_default=True, help="Batches run at once."
)
@click.option(
    "--scheduling",
    type=click.Choice(["fair", "fifo"]),
    default="fair",
    show_default=True,
    help="How API keys share the engine: fair (round-robin between keys) or fifo (oldest batch first).",
)
@click.option(
    "--key-weight",
    "key_weights",
    multiple=True,
    metavar="KEY=W",
    help="fair: the --api-key KEY's share of rows in flight, against 1 for other keys (repeatable).",
)
@click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="Where rows run: local (this process) or ray (engine replicas as Ray actors; needs llmbatch[ray]).",
)
@click.option(
    "--ray-address",
    default=None,
    help="ray: the cluster to join (auto, HOST:6379, ray://HOST:10001) [default: start a local Ray on 127.0.0.1].",
)
@click.option(
    "--replicas",
    type=click.IntRange(min=1),
    default=None,
    help="ray: engine replicas [default: as many as the cluster's resources fit].",
)
@click.option(
    "--replica-cpus", type=click.FloatRange(min=0), default=1.0, show_default=True, help="ray: CPUs per replica."
)
@click.option(
    "--replica-resources",
    default=None,
    metavar="JSON",
    help="ray: other resources per replica, e.g. '{\"GPU\": 1}'.",
)
@click.option(
    "--replica-placement-wait",
    type=click.FloatRange(min=0),
    default=20.0,
    show_default=True,
    help="ray: seconds the start waits for replicas; later ones join when Ray places them.",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="Least severe server log lines shown (info: one line per batch state change).",
)
def serve(
    host: str,
    port: int,
    data_dir: Path | None,
    engine: str,
    api_keys: tuple[str, ...],
    echo_latency: float,
    echo_fail_rate: float,
    upstream_url: str | None,
    upstream_api_key: str | None,
    max_retries: int,
    max_concurrency: int,
    windows: tuple[str, ...],
    max_file_size: str,
    max_request_size: str,
    max_lines: int,
    max_active_batches: int,
    scheduling: str,
    key_weights: tuple[str, ...],
    executor: str,
    ray_address: str | None,
    replicas: int | None,
    replica_cpus: float,
    replica_resources: str | None,
    replica_placement_wait: float,
    log_level: str,
    **model_options: Any,
) -> None:
    """Serve an OpenAI-compatible Files + Batches API (and the direct API) on your own engine."""
    from ..engines import ENGINE_OPTIONS, create_engine, resolve_engine
    from ..server import ServerConfig, bind_port, lock_data_dir, parse_size, parse_window
    from ..server import serve as run_server

    engine, notice = resolve_engine(engine)
    if notice:
        click.echo(f"note: {notice}", err=True)
    options = engine_config_options(model_options)
    given = {
        "echo_latency": echo_latency,
        "echo_fail_rate": echo_fail_rate,
        "upstream_url": upstream_url,
        "upstream_api_key": upstream_api_key,
        "max_retries": max_retries,
        "max_concurrency": max_concurrency,
    }
    ctx = click.get_current_context()
    defaults = option_defaults()
    takes = ENGINE_OPTIONS[engine].model_fields if engine in ENGINE_OPTIONS else {}
    for name, value in given.items():
        # A key in the environment is meant for the openai engine; it must not break another one.
        from_env = ctx.get_parameter_source(name) is ParameterSource.ENVIRONMENT
        if value != defaults[name] and (name in takes or not from_env):
            options[name] = value
    config = ServerConfig(
        data_dir=data_dir or default_server_dir(),
        api_keys=list(api_keys),
        completion_windows={w.strip(): parse_window(w) for w in windows},
        max_file_bytes=parse_size(max_file_size),
        max_request_bytes=parse_size(max_request_size),
        max_file_lines=max_lines,
        max_active_batches=max_active_batches,
        scheduling=scheduling,
        key_weights=dict(_key_weight(text) for text in key_weights),
        engine=engine,
        engine_options=options,
        executor=executor,
        ray_address=ray_address,
        replicas=replicas,
        replica_cpus=replica_cpus,
        replica_resources=_replica_resources(replica_resources),
        replica_placement_wait=replica_placement_wait,
    )
    if executor == "ray" and importlib.util.find_spec("ray") is None:
        raise click.UsageError('--executor ray needs Ray: pip install "llmbatch[ray]"')
    try:
        create_engine(config.engine, config.engine_options)  # fail fast, before binding the port
    except EngineUnavailable:
        if executor != "ray":
            raise
        # No vLLM or GPU here is fine with Ray: the replicas have them (checked at start).
    # Both before "starting on": a busy port or a data directory in use is one line, not a
    # traceback after the server said it was starting.
    lock = lock_data_dir(config.data_dir)
    try:
        sock = bind_port(host, port)
        port = sock.getsockname()[1]  # --port 0: the port the system chose
        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        click.echo(
            f"llmbatch {__version__}: starting on http://{host}:{port}/v1 (engine {engine}, executor {executor}, "
            f"data in {config.data_dir})",
            err=True,
        )
        with sock:
            run_server(config, sock=sock, log_level=log_level)
    finally:
        lock.release()


def _replica_resources(text: str | None) -> dict[str, float]:
    """'{"GPU": 1}' -> {"GPU": 1.0}, or a clear error naming the option."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON ({exc})", param_hint="--replica-resources") from None
    if not isinstance(value, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in value.values()
    ):
        raise click.BadParameter(
            'expected an object of resource names to non-negative amounts, such as {"GPU": 1}',
            param_hint="--replica-resources",
        )
    return {str(k): float(v) for k, v in value.items()}


def _key_weight(text: str) -> tuple[str, float]:
    """'KEY=2' -> ('KEY', 2.0); the key is never echoed back (it is a secret)."""
    key, _, weight = text.rpartition("=")
    try:
        value = float(weight)
    except ValueError:
        value = None
    if not key or value is None:
        raise click.BadParameter("expected KEY=WEIGHT, such as --key-weight sk-team-a=2", param_hint="--key-weight")
    return key, value
