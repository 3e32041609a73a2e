"""The provider seam: one adapter per provider batch API, all with the same operations.

The job runner knows nothing about any one provider. It asks an adapter to upload a chunk,
create a batch, find either again by the chunk's tag after a crash, poll, download results
and cancel. Adapters translate to and from the provider's wire format; results always come
back as OpenAI batch output lines.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar

from .._exceptions import ConfigError

__all__ = ["Provider", "ProviderLimits", "RemoteBatch", "RemoteStatus", "TAG_KEY", "JOB_KEY"]

#: Metadata keys llmbatch puts on every remote batch (OpenAI-style metadata).
TAG_KEY = "llmbatch_chunk"
JOB_KEY = "llmbatch_job"


class RemoteStatus(StrEnum):
    """One status enum for every provider's batch states."""

    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (RemoteStatus.COMPLETED, RemoteStatus.FAILED, RemoteStatus.EXPIRED, RemoteStatus.CANCELLED)


@dataclass
class RemoteBatch:
    """A provider's batch, as the runner sees it."""

    id: str
    status: RemoteStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    #: Validation errors of a failed batch: OpenAI's `{code, message, param, line}` dicts.
    errors: list[dict[str, Any]] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    created_at: int = 0
    #: The upload the batch runs (None where the provider does not say).
    input_file_id: str | None = None
    #: Whether `completed` and `failed` count the rows answered so far while the batch runs
    #: (OpenAI-compatible `request_counts`, Gemini's `batchStats`, Mistral's counts). False where
    #: the provider says nothing before the end: the progress display then says so instead of
    #: showing a 0 that looks hung. An adapter whose poll carries counts sets it (a new adapter,
    #: e.g. Bedrock's or Vertex's, fills `completed`/`failed` and sets it, or leaves both alone).
    counts_live: bool = False
    #: The share of the batch's requests answered (0 to 1) where the provider gives a percentage
    #: instead of counts (Together's `progress`); the runner turns it into rows.
    fraction_done: float | None = None


@dataclass(frozen=True)
class ProviderLimits:
    """What one batch may hold and how much may be in flight; every field is overridable."""

    max_requests: int = 50_000
    #: Fewest requests a batch may hold (Bedrock refuses smaller jobs): the planner makes no
    #: smaller chunk where it can avoid it, and rows too few for one go through the direct API.
    min_requests: int = 1
    #: Bytes per batch as the provider receives it (translated where it translates:
    #: `Provider.check_and_measure`).
    max_bytes: int = 200 * 1024 * 1024
    #: Prompt tokens enqueued across in-flight batches, per model; None: no limit known.
    max_enqueued_tokens: int | None = None
    max_in_flight: int = 20


class Provider(ABC):
    """A batch API. Adapters set `name` and `limits` and implement the operations.

    Constructors take keyword arguments only: `api_key` and `base_url` (None: the provider's
    environment variable, then its default) plus adapter options (`api_version`, ...). A
    missing key raises `ConfigError` naming the environment variable.

    The chunk files handed to `upload` hold OpenAI batch input lines
    (`{"custom_id", "method", "url", "body"}`), one model per file, whose `custom_id`s match
    `custom_id_pattern` (the runner maps those that do not, and maps them back). Result
    files written by `download` hold OpenAI batch output lines whatever the provider's own
    format; a provider whose results differ keeps its native result under `"native"`.
    """

    name: ClassVar[str]
    limits: ProviderLimits = ProviderLimits()
    #: Whether batch prices apply (False for a local server, which costs nothing).
    billed: bool = True
    #: The environment variable that holds the API key (None: no key needed).
    key_env: ClassVar[str | None] = None
    #: A second environment variable the key may be in (Gemini's GOOGLE_API_KEY).
    alt_key_env: ClassVar[str | None] = None
    #: The environment variable that overrides the API's base URL (None: none does).
    base_url_env: ClassVar[str | None] = None
    #: Endpoints this provider can batch.
    endpoints: ClassVar[frozenset[str]] = frozenset(
        {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/moderations"}
    )
    #: The ids the provider accepts per request; rows whose `custom_id` does not match are
    #: sent under an id the runner makes up (and keeps in the job store).
    custom_id_pattern: ClassVar[re.Pattern[str] | None] = None
    #: The output cap the adapter sends for a row that sets none (providers that require one);
    #: estimates use it instead of the generic guess, so budgets see the real ceiling.
    default_max_tokens: ClassVar[int | None] = None
    #: Whether the job's batches are told apart only by their uploads (no tag on the batch):
    #: the runner then keeps a collected chunk's upload until the job has finished, so that a
    #: store rolled back meanwhile still finds the batch (`list_job_batches`) instead of
    #: sending its rows again.
    batches_known_by_upload: ClassVar[bool] = False
    #: The longest wait between polls worth making (None: the job's poll settings alone). A
    #: poll of a remote API costs a request against its rate limits, so the wait grows while
    #: nothing changes; a poll of the local server is a call inside this process, and a longer
    #: wait would only delay the results.
    max_poll_interval: ClassVar[float | None] = None
    #: Whether result lines that come without a custom_id (`null`) are in the order of the
    #: chunk's requests, as the provider documents: when every line of a batch's results lacks
    #: one and there are as many as the chunk's rows, the runner matches them by position.
    #: Otherwise (and for other providers) such lines match no row; their usage still counts.
    unkeyed_results_in_order: ClassVar[bool] = False
    #: What is true of the job's batches when a run is interrupted (Ctrl+C), for the line that
    #: says how to resume.
    after_interrupt: ClassVar[str] = "remote batches keep running"
    #: Bytes a batch takes besides its requests (an envelope around them), so that a chunk's
    #: planned bytes are what the provider receives.
    wire_envelope: ClassVar[int] = 0

    @classmethod
    def api_key_from(cls, api_key: str | None) -> str:
        """The key given, else the one in the provider's environment variable; ConfigError naming it when none is."""
        names = [n for n in (cls.key_env, cls.alt_key_env) if n]
        for key in (api_key, *(os.environ.get(n) for n in names)):
            if key:
                return key
        where = f"{names[0]} (or {names[1]})" if len(names) > 1 else names[0] if names else "a key"
        raise ConfigError(f"the {cls.name} provider needs an API key: set {where} or pass --api-key")

    @classmethod
    def base_url_from(cls, base_url: str | None, default: str | None = None) -> str | None:
        """The base URL given, else the provider's environment variable, else `default`."""
        return base_url or (os.environ.get(cls.base_url_env) if cls.base_url_env else None) or default

    @classmethod
    def check_request(cls, endpoint: str, body: dict[str, Any]) -> list[str]:
        """Why this provider cannot run a (valid OpenAI-format) request; empty when it can.

        Called for every row before anything is sent, so that a feature the provider lacks
        is a row error naming the file and line, never a silent drop.
        """
        if endpoint not in cls.endpoints:
            return [f"the {cls.name} provider cannot batch {endpoint} (it batches {', '.join(sorted(cls.endpoints))})"]
        return []

    @classmethod
    def check_and_measure(cls, custom_id: str, endpoint: str, body: dict[str, Any]) -> tuple[list[str], int | None]:
        """`check_request`'s reasons, and for a request without any, the bytes it takes in a batch
        as this provider receives it (its separator included) where that is not its OpenAI
        line: `limits.max_bytes` then counts these, and chunks are planned on them. None: the
        OpenAI line and its newline are what the provider receives.

        Called for every row at ingest, with the id and body the batch will carry.
        """
        return cls.check_request(endpoint, body), None

    async def start(self) -> None:
        """Acquires resources (clients, an in-process server)."""

    async def aclose(self) -> None:
        """Releases what `start` acquired."""

    async def answered_by(self) -> str | None:
        """Once started, what answers the batches where the provider's name does not say it
        (the local provider: its engine and model); None: nothing worth saying."""
        return None

    @abstractmethod
    async def upload(self, tag: str, path: Path) -> str:
        """Uploads a chunk's JSONL file so that `find_upload(tag)` can find it; returns its id."""

    @abstractmethod
    async def find_upload(self, tag: str, since: int) -> str | None:
        """The id of a file uploaded for `tag` at or after Unix time `since`, if any."""

    @abstractmethod
    async def create_batch(
        self, tag: str, job: str, file_id: str, endpoint: str, completion_window: str = "24h"
    ) -> RemoteBatch:
        """Creates the batch for a chunk, tagged so that `find_batch(tag)` can find it."""

    @abstractmethod
    async def find_batch(self, tag: str, since: int, file_id: str | None = None) -> RemoteBatch | None:
        """The batch created for `tag` (from upload `file_id`) at or after Unix time `since`, if any.

        Called after a crash between asking for a batch and recording its id: answering None
        makes the runner create the batch, so an adapter that cannot tell for sure whether a
        batch is the chunk's must raise `ProviderError` (retryable) rather than answer None.
        """

    async def list_job_batches(
        self, job_id: str, since: int, chunks_dir: Path | None = None
    ) -> list[RemoteBatch] | None:
        """Every batch created for job `job_id` at or after Unix time `since`, in one listing,
        each with its chunk's tag under `TAG_KEY` in its metadata; None where the provider cannot
        list them (the run-start audit then has nothing to compare, and trusts the store).
        `chunks_dir`: the job's folder of chunk files (an adapter may keep its own records there).

        The audit reads the rows a lost batch holds from `input_file_id` (downloaded) or, once it
        has ended, from its result files; where neither is readable yet it polls the batch until
        it ends. Raises `ProviderError` when the listing fails: an answer that may be incomplete
        must not be given, as a chunk missing from it may be sent again.
        """
        return None

    @abstractmethod
    async def get_batch(self, batch_id: str) -> RemoteBatch:
        """The batch's current state."""

    @abstractmethod
    async def download(self, file_id: str, dest: Path) -> None:
        """Streams a result file (OpenAI batch output lines) to `dest`."""

    @abstractmethod
    async def cancel(self, batch_id: str) -> RemoteBatch:
        """Asks the provider to cancel; finished rows stay available."""

    async def direct(self, endpoint: str, body: dict[str, Any]) -> tuple[int, Any]:
        """Sends one request to the provider's direct (non-batch) API: (HTTP status, JSON body)."""
        raise ConfigError(f"the {self.name} provider has no direct API; drop --direct-below")

    async def delete_file(self, file_id: str) -> None:
        """Deletes an uploaded file (a duplicate upload after a crash, or a finished chunk's)."""
