"""Each engine's options, as a typed object with a docstring per field.

Field names are part of stored state: a job made with `--provider local` keeps its engine
options as a flat dict of these names, and its id hashes that dict, so a name never changes.
Every model forbids fields it does not define; `create_engine` turns that into a ConfigError
naming the engine and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .._exceptions import ConfigError

__all__ = [
    "EngineOptions",
    "EchoOptions",
    "OpenAIOptions",
    "ModelOptions",
    "LlamaCppOptions",
    "TransformersOptions",
    "VLLMOptions",
    "parse_adapters",
]


class EngineOptions(BaseModel):
    """What every engine takes."""

    model_config = ConfigDict(extra="forbid")

    max_concurrency: int = Field(64, ge=1)
    """Requests in flight at once (echo: rows per batch; openai: upstream requests; model engines:
    a floor, raised to keep the model's batch full)."""


class EchoOptions(EngineOptions):
    """The echo engine: answers without a model, for tests, demos and benchmarks."""

    echo_latency: float = Field(0.0, ge=0)
    """Seconds of added latency per request."""
    echo_fail_rate: float = Field(0.0, ge=0, le=1)
    """Fraction of requests that fail with a retryable 500 (deterministic per row)."""


class OpenAIOptions(EngineOptions):
    """The openai engine: forwards each request to an OpenAI-compatible direct API."""

    upstream_url: str | None = None
    """Base URL of the OpenAI-compatible API to forward to, including /v1."""
    upstream_api_key: str | None = None
    """Bearer key sent upstream."""
    request_timeout: float = Field(600.0, gt=0)
    """Seconds before one upstream attempt times out."""
    max_retries: int = Field(5, ge=0)
    """Retries of 429, 5xx, timeouts and connection errors, with backoff."""


class ModelOptions(EngineOptions):
    """What the in-process model engines (llamacpp, transformers, vllm) share."""

    model_path: str | None = None
    """The model (llamacpp: a GGUF file; transformers: a Hugging Face model directory or a GGUF
    file; vllm: a directory or model id). None: the packaged default where there is one."""
    served_model_name: str | None = None
    """The name rows use in `body.model` (default: the model's file or directory name)."""
    adapters: dict[str, str] = Field(default_factory=dict)
    """LoRA adapters by name (`--adapter NAME=PATH`); a row naming one runs on it."""
    embedding_model: str | None = None
    """A sentence-transformers model directory for /v1/embeddings; None: the packaged
    all-MiniLM-L6-v2 when installed; "none": no embeddings."""
    embedding_batch_size: int = Field(64, ge=1)
    """Inputs embedded together."""
    n_parallel: int = Field(8, ge=1)
    """Sequences generated together (llamacpp slots, transformers batch size, vllm max_num_seqs)."""
    n_ctx: int | None = Field(None, ge=64)
    """Context length per sequence, prompt and answer together (default: llamacpp 2048, others
    the model's own)."""


class LlamaCppOptions(ModelOptions):
    """The llamacpp engine: a GGUF model through llama-cpp-python."""

    n_threads: int | None = Field(None, ge=1)
    """CPU threads (default: all cores)."""


class TransformersOptions(ModelOptions):
    """The transformers engine: a Hugging Face model through transformers (and peft for adapters)."""

    device: str | None = None
    """"cpu", "cuda", "cuda:1", "mps" (default: cuda when available, else cpu)."""
    dtype: str | None = None
    """Weight dtype, e.g. float32, bfloat16 (default: the library's choice)."""


class VLLMOptions(ModelOptions):
    """The vllm engine: a Hugging Face model through vLLM, on CUDA GPUs."""

    dtype: str | None = None
    """Weight dtype, e.g. bfloat16 (default: vLLM's choice)."""
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs the model is split across."""
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """Share of GPU memory vLLM may take."""
    distributed_executor_backend: Literal["mp", "ray"] | None = None
    """How vLLM runs its tensor-parallel workers: "mp" (processes on this machine), "ray" (Ray
    actors in the current placement group; what the Ray executor sets for its replicas when
    tensor_parallel_size > 1: their GPUs are then the workers', not this process's), None: vLLM's choice."""


def parse_adapters(values: list[str] | tuple[str, ...] | dict[str, str]) -> dict[str, str]:
    """`["name=path", ...]` (the `--adapter` option) into {name: path}, checking each path exists."""
    if isinstance(values, dict):
        pairs = list(values.items())
    else:
        pairs = []
        for value in values:
            name, sep, path = value.partition("=")
            if not sep or not name.strip() or not path.strip():
                raise ConfigError(f"invalid --adapter {value!r}: use NAME=PATH (a PEFT / LoRA adapter directory)")
            pairs.append((name.strip(), path.strip()))
    adapters: dict[str, str] = {}
    for name, path in pairs:
        if name in adapters:
            raise ConfigError(f"adapter name {name!r} is given twice")
        if not Path(path).exists():
            raise ConfigError(f"adapter {name!r}: {path} does not exist")
        adapters[name] = str(path)
    return adapters
