"""Engines: what answers the requests of the server's batches and direct endpoints."""

from __future__ import annotations

import os
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
    "resolve_engine",
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
    model_path: str | None = None
    """Model engines: the model (llamacpp: a GGUF file; transformers: a Hugging Face model directory
    or a GGUF file; vllm: a directory or model id). None: the packaged default where there is one."""
    served_model_name: str | None = None
    """Model engines: the name rows use in `body.model` (default: the model's file or directory name)."""
    adapters: dict[str, str] = Field(default_factory=dict)
    """Model engines: LoRA adapters by name (`--adapter NAME=PATH`); a row naming one runs on it."""
    embedding_model: str | None = None
    """Model engines: a sentence-transformers model directory for /v1/embeddings; None: the packaged
    all-MiniLM-L6-v2 when installed; "none": no embeddings."""
    embedding_batch_size: int = Field(64, ge=1)
    """Model engines: inputs embedded together."""
    n_parallel: int = Field(8, ge=1)
    """Model engines: sequences generated together (llamacpp slots, transformers batch size,
    vllm max_num_seqs)."""
    n_ctx: int | None = Field(None, ge=64)
    """Model engines: context length per sequence, prompt and answer together (default: llamacpp
    2048, others the model's own)."""
    n_threads: int | None = Field(None, ge=1)
    """llamacpp: CPU threads (default: all cores)."""
    device: str | None = None
    """transformers: "cpu", "cuda", "cuda:1", "mps" (default: cuda when available, else cpu)."""
    dtype: str | None = None
    """transformers / vllm: weight dtype, e.g. float32, bfloat16 (default: the library's choice)."""
    tensor_parallel_size: int = Field(1, ge=1)
    """vllm: GPUs the model is split across."""
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """vllm: share of GPU memory vLLM may take."""


def _echo(config: EngineConfig) -> Engine:
    from ._echo import EchoEngine

    return EchoEngine(config)


def _openai(config: EngineConfig) -> Engine:
    from ._openai import OpenAIForwardEngine

    return OpenAIForwardEngine(config)


def _llamacpp(config: EngineConfig) -> Engine:
    from ._llamacpp import LlamaCppEngine

    return LlamaCppEngine(config)


def _transformers(config: EngineConfig) -> Engine:
    from ._transformers import TransformersEngine

    return TransformersEngine(config)


def _vllm(config: EngineConfig) -> Engine:
    from ._vllm import VLLMEngine

    return VLLMEngine(config)


_FACTORIES: dict[str, Callable[[EngineConfig], Engine]] = {
    "echo": _echo,
    "openai": _openai,
    "llamacpp": _llamacpp,
    "transformers": _transformers,
    "vllm": _vllm,
}
ENGINE_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def resolve_engine(name: str) -> tuple[str, str | None]:
    """The engine `name` stands for, and a notice for the user when "auto" falls back to echo.

    "auto" is the environment's LLMBATCH_ENGINE when set, else `llamacpp` when llama-cpp-python
    and the packaged SmolLM2 model are installed, else `echo`.
    """
    if name != "auto":
        return name, None
    chosen = os.environ.get("LLMBATCH_ENGINE", "").strip()
    if chosen and chosen != "auto":
        return chosen, None
    from ._packaged import INSTALL_LOCAL, local_engine_available

    if local_engine_available():
        return "llamacpp", None
    return "echo", (
        "no local model is installed, so the echo engine answers (each reply repeats its request). "
        f"For real answers from SmolLM2-135M-Instruct on this machine: {INSTALL_LOCAL}"
    )


def create_engine(name: str, config: EngineConfig | None = None) -> Engine:
    """Builds the engine called `name`; raises ConfigError naming the choices when unknown."""
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ConfigError(f"unknown engine {name!r}: choose one of {', '.join(ENGINE_NAMES)}")
    return factory(config or EngineConfig())
