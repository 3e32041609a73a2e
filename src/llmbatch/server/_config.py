"""The server's settings, as one typed object built by the CLI (or by tests)."""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator

from .._exceptions import ConfigError
from .._text import parse_size
from ..engines import EngineOptions, engine_options
from ._fair import Scheduling

__all__ = ["ServerConfig", "key_owner", "parse_window", "parse_size"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_window(text: str) -> int:
    """'24h' -> 86400. Accepts an integer followed by s, m, h or d."""
    m = re.fullmatch(r"\s*(\d+)\s*([smhd])\s*", text)
    if not m or int(m.group(1)) <= 0:
        raise ConfigError(f"invalid completion window {text!r}: use a positive number and a unit, like 24h, 30m or 7d")
    return int(m.group(1)) * _UNITS[m.group(2)]


def key_owner(key: str) -> str:
    """The owner tag of an API key: what the store records instead of the key itself."""
    return hashlib.sha256(key.encode()).hexdigest()[:24]


class ServerConfig(BaseModel):
    """Everything `llmbatch serve` can be told."""

    data_dir: Path
    """Where the metadata database and the files live."""
    api_keys: list[str] = Field(default_factory=list)
    """Accepted Bearer keys; empty means the server is open. Each key sees only its own objects.
    A key that is empty or has spaces around it is refused: an empty key would let in any caller
    who sends `Authorization: Bearer ` with nothing after it."""
    completion_windows: dict[str, int] = Field(default_factory=lambda: {"24h": 86400})
    """Accepted `completion_window` values and their length in seconds."""
    max_file_bytes: int = Field(200 * 1024 * 1024, gt=0)
    """Largest accepted upload, in bytes."""
    max_request_bytes: int = Field(8 * 1024 * 1024, gt=0)
    """Largest JSON body of a direct request (chat, completions, responses, embeddings), in bytes;
    a larger one is a 413 before it is read. OpenAI takes a few MB of text in a request; this
    leaves room for images sent inline."""
    max_file_lines: int = Field(50_000, gt=0)
    """Most requests a batch input file may hold."""
    max_active_batches: int = Field(4, gt=0)
    """Batches executed at once; later ones wait in `in_progress`. With `scheduling="fair"` the
    oldest waiting batch of a key that has nothing running starts even past this limit (so at
    most one batch more per key), and free places go to the key with the fewest batches running;
    with "fifo", batches start in creation order."""
    scheduling: Scheduling = "fair"
    """How running batches share the engine's `max_concurrency` rows in flight (one budget for
    all of them, see `_fair`): "fair" gives a free slot to the API key with the fewest rows in
    flight, then to its batch with the fewest, and validates one batch per key at a time; "fifo"
    gives it to the oldest batch and validates every batch at once. With no keys every batch has
    the same owner, so "fair" shares rows between the running batches."""
    key_weights: dict[str, float] = Field(default_factory=dict)
    """API key -> its weight under fair scheduling (others weigh 1): while keys have rows
    waiting, a key of weight 2 gets twice the rows in flight of a key of weight 1. Each must be
    one of `api_keys`. Weights share rows, not the batch places of `max_active_batches`."""
    max_validation_errors: int = Field(20, gt=0)
    """Most errors listed in a failed batch's `errors.data`; the rest are counted in a last
    `too_many_errors` entry. Small like OpenAI's, since every GET of the batch (and of the
    batch list) carries the list."""
    engine: str = "echo"
    """The engine's name (see `llmbatch serve --help`)."""
    engine_options: EngineOptions | None = None
    """The engine's options (`engines.EchoOptions`, ...; a dict of their fields is validated into
    the engine's own); None: its defaults."""
    checkpoint_interval: float = Field(0.25, gt=0)
    """Seconds between writes of a running batch's counts to the database."""
    executor: Literal["local", "ray"] = "local"
    """Where rows run: "local", the engine in this process; "ray", engine replicas that are Ray
    actors (see `_ray`; needs the `ray` extra). The API, store and journal stay in this process."""
    ray_address: str | None = None
    """ray: the cluster to join ("auto", "HOST:6379", "ray://HOST:10001"); None starts a Ray
    instance in this process, bound to 127.0.0.1."""
    replicas: int | None = Field(None, gt=0)
    """ray: engine replicas; None: as many as the cluster's resources fit (`replica_cpus`,
    `replica_resources` each)."""
    replica_cpus: float = Field(1.0, ge=0)
    """ray: CPUs Ray reserves for each replica."""
    replica_resources: dict[str, float] = Field(default_factory=dict)
    """ray: other resources each replica needs, e.g. {"GPU": 1}."""
    replica_placement_wait: float = Field(20.0, ge=0)
    """ray: seconds the server start waits for replicas to be placed and their engines started;
    replicas placed later join then (batches wait for one, with a log line)."""

    @field_validator("engine_options", mode="before")
    @classmethod
    def _options_of_engine(cls, value: Any, info: ValidationInfo) -> EngineOptions | None:
        # Raises ConfigError (not a ValidationError) naming the engine and a field it does not take.
        return None if value is None else engine_options(info.data.get("engine", "echo"), value)

    @field_validator("api_keys")
    @classmethod
    def _no_empty_keys(cls, keys: list[str]) -> list[str]:
        for key in keys:
            if not key.strip():
                raise ConfigError("--api-key: an empty key would let in callers who send no key; give a real key")
            if key != key.strip():
                raise ConfigError("--api-key: a key must not start or end with spaces (callers' keys are trimmed)")
        return keys

    @field_validator("key_weights")
    @classmethod
    def _weights_of_known_keys(cls, weights: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        keys = info.data.get("api_keys", [])
        for key, weight in weights.items():
            if key not in keys:  # the key itself is not repeated: messages end up in logs
                raise ConfigError("--key-weight: that key is not one of the --api-key keys; weigh a key given there")
            if not (math.isfinite(weight) and weight > 0):
                raise ConfigError(f"--key-weight: the weight must be a positive number, not {weight}")
        return weights

    def owner_weights(self) -> dict[str, float]:
        """`key_weights` by owner tag (see `key_owner`), as the scheduler sees batches."""
        return {key_owner(key): weight for key, weight in self.key_weights.items()}
