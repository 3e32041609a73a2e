"""A job's settings: what `llmbatch run` was told, stored with the job so `resume` needs nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator

from .._exceptions import ConfigError

__all__ = ["JobSettings", "PROVIDER_OPTIONS"]

#: Settings passed to the provider's adapter as they are, where given (one provider reads each).
PROVIDER_OPTIONS = ("api_version", "s3_uri", "role_arn", "gcs_uri")


class JobSettings(BaseModel):
    """Everything that decides how a job runs."""

    provider: str = "local"
    """A name from `llmbatch.providers.PROVIDERS` (`local`: an in-process llmbatch server)."""
    base_url: str | None = None
    """The provider's API base URL (default: its environment variable, then its own)."""
    model: str | None = None
    """Sent as every row's model (an Azure deployment name, or one model for a whole file)."""
    api_version: str | None = None
    """azure: the dated API version (default OPENAI_API_VERSION; unset: the v1 API)."""
    s3_uri: str | None = None
    """bedrock: where chunk inputs and job outputs go, s3://bucket/prefix (default LLMBATCH_BEDROCK_S3_URI)."""
    role_arn: str | None = None
    """bedrock: the IAM role its jobs run as (default LLMBATCH_BEDROCK_ROLE_ARN)."""
    gcs_uri: str | None = None
    """vertex: where chunk inputs and job outputs go, gs://bucket/prefix (default LLMBATCH_VERTEX_GCS_URI)."""
    engine: str = Field("auto", validate_default=True)
    """local: the engine of the in-process server; "auto" is resolved when the settings are made
    (llamacpp with the packaged model when installed, else echo; see `engines.resolve_engine`).
    Other providers store "echo", as before engines were chosen."""
    engine_options: dict[str, Any] = Field(default_factory=dict)
    """local: the engine's options (`engines.ENGINE_OPTIONS[engine]` fields: model path, adapters, ...)."""
    completion_window: str = "24h"
    """The window asked of the provider (OpenAI accepts only 24h; Groq up to 7d)."""
    batch_size: int | None = Field(None, gt=0)
    """Most requests per remote batch (default: the provider's limit)."""
    max_bytes: int | None = Field(None, gt=0)
    """Largest chunk file in bytes (default: the provider's limit)."""
    max_in_flight: int | None = Field(None, gt=0)
    """Most remote batches in flight at once (default: the provider's)."""
    max_enqueued_tokens: int | None = Field(None, gt=0)
    """Most estimated prompt tokens enqueued per model across in-flight batches."""
    direct_below: int = Field(0, ge=0)
    """When this many pending rows or fewer are left, send them through the direct API."""
    direct: bool = True
    """Whether rows may go through the direct API when no batch can take them (fewer than the
    provider's minimum per batch, as on Bedrock); False refuses such a job instead."""
    direct_concurrency: int = Field(16, gt=0)
    """Direct requests in flight at once (with `direct_below`)."""
    max_attempts: int = Field(3, gt=0)
    """Tries per row before a retryable failure becomes final."""
    max_cost: float | None = Field(None, ge=0)
    """USD cap: no chunk is submitted whose estimate would take spend past it."""
    keep_uploads: bool = False
    """Keep each chunk's uploaded input at the provider after collecting it (default: delete it)."""
    skip_invalid: bool = False
    """Run the valid rows even when some rows are invalid (those are reported)."""
    default_output_tokens: int = Field(1024, gt=0)
    """Output-token estimate for rows that set no max_tokens."""
    poll_interval: float = Field(2.0, gt=0)
    """First wait between polls, in seconds; it grows to `max_poll_interval`."""
    max_poll_interval: float = Field(60.0, gt=0)
    """Longest wait between polls."""
    price_file: Path | None = None
    """A JSON file of prices that overrides the bundled table."""
    price_as: str | None = None
    """Price every row as this model (an Azure deployment's underlying model, say)."""
    price_input: float | None = None
    """USD per 1M input tokens for models the table lacks (with `price_output`)."""
    price_output: float | None = None
    """USD per 1M output tokens for models the table lacks."""
    cache: Literal["off", "deterministic", "all"] = "off"
    """The response cache shared by jobs (`_cache.py`): `deterministic` answers rows from it and
    keeps their answers, for rows whose answer is not sampled (temperature 0, or a seed);
    `all` sampled rows too; `off` neither."""
    cache_path: Path | None = None
    """The cache's SQLite file (default `$LLMBATCH_HOME/cache.sqlite`)."""
    cache_max_size: int | None = Field(None, gt=0)
    """Bytes the cache may store before it evicts the answers used least recently (default 2 GB)."""
    fallbacks: list[str] = Field(default_factory=list)
    """Providers to fail over to, in order, as `provider/model` (`--fallback`): rows that fail
    for good at one provider for a reason another may not have (expired, cancelled, 5xx, quota)
    are sent to the next (`_failover.py`). Not part of the job's identity: a re-run may add them."""
    fallback_after: float | None = Field(None, gt=0)
    """Seconds after which a batch not finished is cancelled and the rows it has not answered
    go to the next fallback (`--fallback-after`); None: batches run their whole window."""
    output: Path | None = None
    """Where results go (default: next to the first input, `NAME.results.jsonl`)."""
    errors: Path | None = None
    """Where final failures go (default: next to the first input, `NAME.errors.jsonl`)."""

    def lane_provider(self, lane: int) -> tuple[str, str | None]:
        """(provider, model) of lane `lane`: 0 the job's own (its `--model`, if any), n its n-th fallback."""
        if lane == 0:
            return self.provider, self.model
        provider, _, model = self.fallbacks[lane - 1].partition("/")
        return provider, model

    def answered_by(self, lane: int, model: str | None) -> str:
        """`provider/model` of a row sent as `model` to lane `lane`, as its result line records it."""
        return f"{self.lane_provider(lane)[0]}/{model}" if model else self.lane_provider(lane)[0]

    def local_engine_options(self) -> dict[str, Any]:
        """The stored engine options the job's engine takes. A job made before options were
        checked per engine may hold options another engine takes (`--model-path` given while
        "auto" fell back to echo, which ignored it): those are left out, as they were then."""
        from ..engines import ENGINE_OPTIONS

        taken = ENGINE_OPTIONS[self.engine].model_fields if self.engine in ENGINE_OPTIONS else {}
        return {k: v for k, v in self.engine_options.items() if k in taken}

    @field_validator("fallbacks")
    @classmethod
    def _fallback_names(cls, value: list[str], info: ValidationInfo) -> list[str]:
        from ..providers import PROVIDERS

        for name in value:
            provider, sep, model = name.partition("/")
            if not sep or not model or provider not in PROVIDERS or provider == "local":
                raise ConfigError(
                    f"--fallback {name!r}: give a provider and a model, PROVIDER/MODEL, with PROVIDER one of "
                    f"{', '.join(p for p in PROVIDERS if p != 'local')} (e.g. anthropic/claude-sonnet-4-5)"
                )
        if len(set(value)) != len(value):
            raise ConfigError(f"--fallback: name each provider/model once, not {', '.join(value)}")
        return value

    @field_validator("fallback_after")
    @classmethod
    def _fallback_after_needs_one(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None and not info.data.get("fallbacks"):
            raise ConfigError("--fallback-after needs a --fallback to send the rows to")
        return value

    @field_validator("engine")
    @classmethod
    def _concrete_engine(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("provider") != "local":
            # Not used; fixed so that what is installed locally never changes a remote job's identity.
            return "echo"
        from ..engines import resolve_engine

        return resolve_engine(value)[0]
