"""Engines: what answers the requests of the server's batches and direct endpoints."""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel, Field

from .._exceptions import ConfigError
from ._base import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    KNOWN_ENDPOINTS,
    MODERATIONS,
    RESPONSES,
    Engine,
    EngineRequest,
    EngineResponse,
    Usage,
    error_body,
    usage_from_body,
)

__all__ = [
    "CHAT",
    "COMPLETIONS",
    "EMBEDDINGS",
    "RESPONSES",
    "MODERATIONS",
    "KNOWN_ENDPOINTS",
    "Engine",
    "EngineConfig",
    "EngineRequest",
    "EngineResponse",
    "Usage",
    "ENGINE_NAMES",
    "create_engine",
    "error_body",
    "usage_from_body",
]


class EngineConfig(BaseModel):
    """Settings for every engine; each engine reads the fields that concern it."""

    echo_latency: float = Field(0.0, ge=0)
    """echo: seconds of added latency per request."""
    echo_fail_rate: float = Field(0.0, ge=0, le=1)
    """echo: fraction of requests that fail with a retryable 500 (deterministic per row)."""
    upstream_url: str | None = None
    """openai: base URL of the OpenAI-compatible API to forward to, including /v1."""
    upstream_api_key: str | None = None
    """openai: Bearer key sent upstream."""
    max_concurrency: int = Field(64, ge=1)
    """Requests in flight at once (openai: upstream requests; echo: rows per batch)."""
    request_timeout: float = Field(600.0, gt=0)
    """openai: seconds before one upstream attempt times out."""
    max_retries: int = Field(5, ge=0)
    """openai: retries of 429, 5xx, timeouts and connection errors, with backoff."""


def _echo(config: EngineConfig) -> Engine:
    from ._echo import EchoEngine

    return EchoEngine(config)


def _openai(config: EngineConfig) -> Engine:
    from ._openai import OpenAIForwardEngine

    return OpenAIForwardEngine(config)


_FACTORIES: dict[str, Callable[[EngineConfig], Engine]] = {"echo": _echo, "openai": _openai}
ENGINE_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def create_engine(name: str, config: EngineConfig | None = None) -> Engine:
    """Builds the engine called `name`; raises ConfigError naming the choices when unknown."""
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ConfigError(f"unknown engine {name!r}: choose one of {', '.join(ENGINE_NAMES)}")
    return factory(config or EngineConfig())
