"""The engine seam: anything that answers individual OpenAI-format requests.

The server's batch worker and its direct endpoints both call `Engine.handle`. An engine
never raises for a bad request or an upstream failure: it answers with an HTTP status and
an OpenAI-format body, which the worker writes to the output or error file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, ClassVar

from ._facts import EngineFacts

__all__ = [
    "CHAT",
    "COMPLETIONS",
    "EMBEDDINGS",
    "RESPONSES",
    "MODERATIONS",
    "KNOWN_ENDPOINTS",
    "Engine",
    "MetricFamily",
    "EngineRequest",
    "EngineResponse",
    "TextDelta",
    "Usage",
    "error_body",
    "usage_from_body",
]

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
RESPONSES = "/v1/responses"
MODERATIONS = "/v1/moderations"
#: Endpoints OpenAI's Batch API accepts for text models; an engine serves a subset.
KNOWN_ENDPOINTS: frozenset[str] = frozenset({CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, MODERATIONS})


@dataclass(slots=True)
class Usage:
    """Token usage of one answered request, normalised across endpoints."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0


@dataclass(slots=True)
class EngineRequest:
    """One request: the endpoint path (e.g. "/v1/chat/completions") and its JSON body."""

    endpoint: str
    body: dict[str, Any]
    #: The batch row's custom_id; None for direct API calls.
    custom_id: str | None = None
    #: Bytes of the request's JSON as received (0: not known). Engines use it to tell cheap
    #: requests, answered on the event loop, from heavy ones, worked on in a thread.
    size: int = 0


@dataclass(slots=True)
class EngineResponse:
    """An answer: an HTTP status and an OpenAI-format JSON body.

    `body` is a dict, or the raw JSON bytes of an upstream answer passed through unchanged, or a
    big answer's JSON already serialised in parts (`json_parts`): concatenated, they are the
    answer; the server sends them one by one, so no 100 MB copy holds the GIL.
    `usage` is set for successful answers that report token usage.
    """

    status_code: int
    body: dict[str, Any] | bytes | list[bytes]
    usage: Usage | None = None
    #: Extra response headers for direct calls (e.g. Retry-After); not part of batch output.
    headers: dict[str, str] | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status_code < 300


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of an answer being streamed: `text` to append to choice `index`'s text."""

    index: int
    text: str


def error_body(message: str, type: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error envelope."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def usage_from_body(body: dict[str, Any]) -> Usage | None:
    """Reads usage from a chat / completions / embeddings / responses body, if present."""
    u = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(u, dict):
        return None
    if "input_tokens" in u:  # Responses API shape
        inp = u.get("input_tokens") or 0
        out = u.get("output_tokens") or 0
        cached = (u.get("input_tokens_details") or {}).get("cached_tokens") or 0
        reasoning = (u.get("output_tokens_details") or {}).get("reasoning_tokens") or 0
    else:
        inp = u.get("prompt_tokens") or 0
        out = u.get("completion_tokens") or 0
        cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        reasoning = (u.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return Usage(int(inp), int(out), int(cached), int(reasoning))


@dataclass(frozen=True, slots=True)
class MetricFamily:
    """One Prometheus metric an engine adds to /metrics: its samples are (labels, value)."""

    name: str
    type: str  # "counter" or "gauge"
    help: str
    samples: list[tuple[dict[str, str], float]]


class Engine(ABC):
    """Answers individual requests. Subclasses set `name` and `endpoints` and implement `handle`."""

    #: The name used with `--engine`.
    name: ClassVar[str]
    #: The endpoints this engine serves; a batch for any other endpoint fails validation.
    endpoints: frozenset[str]
    #: How many requests the batch worker keeps in flight with this engine.
    max_concurrency: int = 64

    async def start(self) -> None:
        """Acquires resources (HTTP clients, models). Called once before the first request."""

    async def aclose(self) -> None:
        """Releases what `start` acquired."""

    @abstractmethod
    async def handle(self, request: EngineRequest) -> EngineResponse:
        """Answers one request. Never raises for bad input or upstream failure."""

    async def stream(self, request: EngineRequest) -> AsyncIterator[TextDelta | EngineResponse]:
        """Answers like `handle` (the request's body holds no `stream`), yielding text as it is
        generated and then the whole answer, last. This default yields only the answer, which the
        server then streams in one piece; engines that generate token by token override it."""
        yield await self.handle(request)

    def validate_model(self, model: str) -> str | None:
        """Returns why `model` cannot be served by this engine, or None when it can."""
        return None

    async def list_models(self) -> list[dict[str, Any]]:
        """Models for GET /v1/models, as OpenAI model objects."""
        return []

    def facts(self) -> EngineFacts:
        """What the API process asks this engine without running a row (endpoints, model checks,
        rows in flight), picklable: a Ray replica sends it to an API process that cannot build the
        engine itself (one that lacks the engine's library or a GPU: a model engine, which gives its
        own with its model names)."""
        return EngineFacts(self.name, self.endpoints, self.max_concurrency)

    def health(self) -> dict[str, Any]:
        """What /health shows of the engine besides its name (process state, nothing of any tenant)."""
        return {}

    def metric_families(self) -> list[MetricFamily]:
        """What /metrics shows of the engine (process state only: it must name no tenant's objects)."""
        return []

    def model_family(self, model: str) -> str:
        """What must be the same across a batch's rows: the model itself, unless the engine can mix
        models in one batch (a base model and its LoRA adapters share the base's family)."""
        return model

    def served_models(self) -> tuple[str, ...] | None:
        """The `body.model` values this engine answers, or None when it takes any name."""
        return None
