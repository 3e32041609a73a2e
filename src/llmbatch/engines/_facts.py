"""What the server asks an engine without running a row, as a small picklable object.

The Ray executor's API process answers these questions itself: which endpoints a batch may use,
whether a row's `body.model` is served and which rows may share a batch, how many rows to keep
in flight. When it cannot build the engine in its own process (no vLLM or no GPU there), one of
its replicas builds it and sends `Engine.facts()` back. A model engine answers the same
questions with the same `ModelCatalog`, so the answers cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._request import MODEL_CREATED

__all__ = ["EngineFacts", "ModelCatalog"]


@dataclass(frozen=True, slots=True)
class ModelCatalog:
    """The names a model engine answers to: its base model's, its LoRA adapters', its embedding model's."""

    #: The base model's names (served name, file or directory name, path); the first is shown.
    base: tuple[str, ...]
    adapters: tuple[str, ...] = ()
    #: The sentence-embedding model's names, if one is configured; the first is shown.
    embedding: tuple[str, ...] = ()

    def validate(self, model: str) -> str | None:
        if model in self.base or model in self.adapters or model in self.embedding:
            return None
        known = [*self.base[:1], *self.adapters, *self.embedding[:1]]
        what = "adapter or model" if self.adapters else "model"
        return f"unknown {what} {model!r}: this server serves {', '.join(repr(k) for k in known)}"

    def family(self, model: str) -> str:
        # The base model and its adapters run side by side: a batch may mix them.
        if model in self.adapters or model in self.base:
            return self.base[0] if self.base else model
        return model

    def served(self) -> tuple[str, ...]:
        return (*self.base, *self.adapters, *self.embedding)

    def listing(self) -> list[dict[str, Any]]:
        """GET /v1/models: the base model, each adapter (its parent the base), the embedding model."""

        def entry(name: str, **extra: str) -> dict[str, Any]:
            return {"id": name, "object": "model", "created": MODEL_CREATED, "owned_by": "llmbatch", **extra}

        out = [entry(self.base[0])] if self.base else []
        out += [entry(name, parent=self.base[0]) if self.base else entry(name) for name in self.adapters]
        out += [entry(self.embedding[0])] if self.embedding else []
        return out


@dataclass(frozen=True, slots=True)
class EngineFacts:
    """An engine's answers to what the API process asks it (see the module's docstring)."""

    name: str
    endpoints: frozenset[str]
    max_concurrency: int
    #: A model engine's names; None: the engine takes any model name (the `Engine` defaults).
    models: ModelCatalog | None = None

    def validate_model(self, model: str) -> str | None:
        return None if self.models is None else self.models.validate(model)

    def model_family(self, model: str) -> str:
        return model if self.models is None else self.models.family(model)

    def served_models(self) -> tuple[str, ...] | None:
        return None if self.models is None else self.models.served()

    def listing(self) -> list[dict[str, Any]]:
        return [] if self.models is None else self.models.listing()
