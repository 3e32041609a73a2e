"""Providers: batch APIs behind one seam (see `Provider`).

Adapters are imported only when chosen: each may need an optional SDK
(`pip install "llmbatch[anthropic]"`), and a missing one is a `ConfigError` that names the
install command, not an ImportError at startup.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._exceptions import ConfigError
from ._base import JOB_KEY, TAG_KEY, Provider, ProviderLimits, RemoteBatch, RemoteStatus

__all__ = [
    "JOB_KEY",
    "TAG_KEY",
    "PROVIDERS",
    "PROVIDER_NAMES",
    "Provider",
    "ProviderLimits",
    "ProviderSpec",
    "RemoteBatch",
    "RemoteStatus",
    "create_provider",
    "provider_class",
    "split_model",
]


@dataclass(frozen=True)
class ProviderSpec:
    """Where a provider's adapter lives and what it needs."""

    name: str
    module: str
    cls: str
    #: The pip extra holding its SDK (None: the base install has it).
    extra: str | None = None
    #: The Python package the extra installs, imported to check it is there.
    sdk: str | None = None


PROVIDERS: dict[str, ProviderSpec] = {
    s.name: s
    for s in (
        ProviderSpec("local", "._local", "LocalProvider"),
        ProviderSpec("openai", "._openai", "OpenAIBatchProvider"),
        ProviderSpec("azure", "._openai", "AzureBatchProvider"),
        ProviderSpec("groq", "._openai", "GroqBatchProvider"),
        ProviderSpec("anthropic", "._anthropic", "AnthropicBatchProvider", extra="anthropic", sdk="anthropic"),
        ProviderSpec("gemini", "._gemini", "GeminiBatchProvider", extra="gemini", sdk="google.genai"),
        ProviderSpec("together", "._together", "TogetherBatchProvider", extra="together", sdk="together"),
        ProviderSpec("mistral", "._mistral", "MistralBatchProvider", extra="mistral", sdk="mistralai"),
        ProviderSpec("bedrock", "._bedrock", "BedrockBatchProvider", extra="bedrock", sdk="boto3"),
        ProviderSpec("vertex", "._vertex", "VertexBatchProvider", extra="vertex", sdk="google.cloud.storage"),
    )
}

#: Names accepted by `--provider`.
PROVIDER_NAMES = tuple(PROVIDERS)


def provider_class(name: str) -> type[Provider]:
    """The adapter class for `name`; a missing optional SDK names the command that installs it."""
    spec = PROVIDERS.get(name)
    if spec is None:
        raise ConfigError(f"unknown provider {name!r}: choose one of {', '.join(PROVIDER_NAMES)}")
    if spec.sdk is not None:
        try:
            importlib.import_module(spec.sdk)
        except ImportError as exc:
            raise ConfigError(
                f"the {name} provider needs its SDK ({spec.sdk}), which is not installed: "
                f'pip install "llmbatch[{spec.extra}]"'
            ) from exc
    module = importlib.import_module(spec.module, __name__)
    cls: type[Provider] = getattr(module, spec.cls)
    return cls


def create_provider(
    name: str,
    *,
    api_key: str | None = None,
    base_url: str | None = None,
    job_dir: Path | None = None,
    engine: str = "echo",
    engine_config: dict[str, Any] | None = None,
    **options: Any,
) -> Provider:
    """An adapter ready to `start()`. Keys and base URLs default to each provider's environment.

    `engine` and `engine_config` (a dict of that engine's option fields, see `engines.ENGINE_OPTIONS`)
    set up the `local` provider's server.
    """
    cls = provider_class(name)
    if name == "local":
        if job_dir is None:
            raise ConfigError("the local provider needs a job directory")
        from ..engines import engine_options

        options = engine_options(engine, engine_config)
        return cls(job_dir / "local-server", engine=engine, engine_options=options)  # type: ignore[call-arg]
    return cls(api_key=api_key, base_url=base_url, **options)  # type: ignore[call-arg]


def split_model(model: str, provider: str | None) -> tuple[str | None, str]:
    """Splits a `provider/model` name: ("anthropic", "claude-sonnet-4-5") for "anthropic/claude-sonnet-4-5".

    With `provider` given (an explicit `--provider`), only that provider's own prefix is taken
    off, so that model names with slashes of their own ("openai/gpt-oss-120b" on Groq,
    "meta-llama/..." on Together) pass through unchanged. Without it, a prefix that names a
    known provider selects it.
    """
    head, sep, rest = model.partition("/")
    if not sep or not rest:
        return None, model
    if provider is not None:
        return (provider, rest) if head == provider else (None, model)
    return (head, rest) if head in PROVIDERS and head != "local" else (None, model)
