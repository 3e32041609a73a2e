"""Model prices: a maintained table of per-token prices and the cost arithmetic on top of it.

The table ships as package data (`prices.json`): USD per 1M tokens for each model, with the
Standard ("direct") and Batch prices side by side so a job can show what batching saves.
Users correct or extend it with an override file (`--price-file`) or per-model flags
(`--price-input/--price-output`), because prices change faster than releases.

Lookup is forgiving about model ids, since batch rows name models the way the API accepts
them: case is ignored, a `provider/` prefix ("openai/gpt-4o") is dropped, and a dated
snapshot ("gpt-4o-mini-2024-07-18") falls back to the longest table entry that is a prefix of
it ending at a dash ("gpt-4o-mini", not "gpt-4o"). Snapshots priced differently from their
base ("gpt-4o-2024-05-13") have their own entries, which win because they match exactly.
Fine-tuned ids ("ft:gpt-4o-mini:...") match only an exact entry: they cost more than their
base model, and a silent base price would understate the spend.

Some models cost more per token when a request's prompt is long (Gemini 2.5 and 3 Pro, Claude
Sonnet 4 and 4.5 with the 1M context: above 200,000 prompt tokens). Their entries carry the
higher rates as `above_200k`, applied to each request whose prompt exceeds that, whole
(input and output), which is how those providers bill.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from functools import lru_cache
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .._exceptions import ConfigError, InputError

__all__ = ["LONG_PROMPT_TOKENS", "ModelPrice", "PriceTable", "Tariff", "cost", "cost_at", "normalize_model"]

#: Prompts longer than this many tokens are billed at a model's `above_200k` rates, where it has them.
LONG_PROMPT_TOKENS = 200_000

_BUNDLED = "prices.json"
_PRICE_FIELDS = ("input", "cached_input", "output", "batch_input", "batch_cached_input", "batch_output")
# What a price file entry may hold, for error messages.
_ENTRY_HELP = (
    'each model maps to {"input": USD per 1M input tokens, "output": USD per 1M output tokens} '
    "and optionally cached_input, batch_input, batch_cached_input, batch_output, provider, and above_200k "
    "(the same fields for prompts over 200,000 tokens)"
)
# Lookups are per model, not per row, but a long job asks for the same few ids many times.
_LOOKUP_CACHE_SIZE = 4096


class ModelPrice(BaseModel):
    """One model's prices in USD per 1M tokens.

    Only `input` and `output` are required. The optional rates fall back so that a missing
    one never makes a job look cheaper than it is: `cached_input` to `input`;
    `batch_input`/`batch_output` to the direct prices (no batch discount assumed unless
    stated); `batch_cached_input` to the batch input rate.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: str | None = None
    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cached_input: float | None = Field(default=None, ge=0)
    batch_input: float | None = Field(default=None, ge=0)
    batch_cached_input: float | None = Field(default=None, ge=0)
    batch_output: float | None = Field(default=None, ge=0)
    #: The prices of a request whose prompt exceeds `LONG_PROMPT_TOKENS` (same fallbacks, within).
    above_200k: ModelPrice | None = None

    @model_validator(mode="after")
    def _one_tier(self) -> ModelPrice:
        if self.above_200k is not None and self.above_200k.above_200k is not None:
            raise ValueError("above_200k prices cannot have an above_200k of their own")
        return self

    def tier(self, input_tokens: int) -> ModelPrice:
        """The price a request with this many prompt tokens pays."""
        long = self.above_200k
        return long if long is not None and input_tokens > LONG_PROMPT_TOKENS else self

    def rates(self, *, batch: bool) -> tuple[float, float, float]:
        """(uncached input, cached input, output) USD per 1M tokens after the fallbacks."""
        if batch:
            inp = self.input if self.batch_input is None else self.batch_input
            cached = inp if self.batch_cached_input is None else self.batch_cached_input
            out = self.output if self.batch_output is None else self.batch_output
            return inp, cached, out
        cached = self.input if self.cached_input is None else self.cached_input
        return self.input, cached, self.output


def cost(
    price: ModelPrice, input_tokens: int, output_tokens: int, cached_tokens: int = 0, *, batch: bool = True
) -> float:
    """USD for one request at `price` (its long-prompt tier when the prompt is over 200k tokens).

    `cached_tokens` is the part of `input_tokens` served from the prompt cache, as in
    OpenAI's usage (`prompt_tokens` includes `cached_tokens`); it is billed at the cached rate
    and the rest of the input at the full rate. `batch` picks Batch or Standard prices. For a
    sum of requests, price the ones with long prompts apart (see `Estimate.cost`).
    """
    return cost_at(price.tier(input_tokens).rates(batch=batch), input_tokens, output_tokens, cached_tokens)


def cost_at(rates: tuple[float, float, float], input_tokens: int, output_tokens: int, cached_tokens: int = 0) -> float:
    """USD at `rates` (`ModelPrice.rates`), whatever the prompt's length."""
    inp, cached_rate, out = rates
    cached = min(max(cached_tokens, 0), input_tokens)
    return ((input_tokens - cached) * inp + cached * cached_rate + output_tokens * out) / 1_000_000


class Tariff:
    """`cost` for many requests of one model at batch or direct prices, its rates looked up once.

    Calling it prices one request; a model without a price (or on a provider that bills
    nothing: `price` None) costs 0.
    """

    __slots__ = ("_base", "_long")

    def __init__(self, price: ModelPrice | None, *, batch: bool) -> None:
        self._base = price.rates(batch=batch) if price is not None else None
        long = price.above_200k if price is not None else None
        self._long = long.rates(batch=batch) if long is not None else None

    def __call__(self, input_tokens: int, output_tokens: int, cached_tokens: int = 0) -> float:
        rates = self._long if self._long is not None and input_tokens > LONG_PROMPT_TOKENS else self._base
        return cost_at(rates, input_tokens, output_tokens, cached_tokens) if rates is not None else 0.0


#: A Bedrock cross-region inference profile's region (`us.anthropic.claude-...`): it costs the
#: model's own price (the source region's), so prices are looked up without it.
_BEDROCK_PROFILE = re.compile(r"^(us|eu|apac|us-gov|global|jp|au|ca)\.(?=(anthropic|meta|mistral|amazon)\.)")


def normalize_model(model: str) -> str:
    """The table key form of a model id: lower case, without a `provider/` prefix (or a Bedrock
    inference profile's region)."""
    key = model.strip().lower()
    slash = key.rfind("/")
    key = key[slash + 1 :] if slash != -1 else key
    return _BEDROCK_PROFILE.sub("", key)


class PriceTable:
    """Prices by model id, with the date they were taken; immutable once built.

    Build one with `PriceTable.load()`; `with_override` returns a changed copy.
    """

    __slots__ = ("taken", "source", "_models", "_cache")

    def __init__(self, models: Mapping[str, ModelPrice], *, taken: str = "", source: str = "") -> None:
        #: When the bundled prices were taken (YYYY-MM-DD), so users can judge their age.
        self.taken = taken
        self.source = source
        self._models: dict[str, ModelPrice] = {normalize_model(k): v for k, v in models.items()}
        self._cache: dict[str, str | None] = {}

    @classmethod
    def load(cls, override: Path | None = None) -> PriceTable:
        """The bundled table, with the entries of the `override` price file replacing its own.

        The override file has the bundled table's shape (`{"models": {...}}`) or the simpler
        `{"<model>": {"input": .., "output": ..}}`. An overriding entry replaces the bundled
        entry of that model whole: a file states complete prices, so nothing bundled leaks
        into them (a missing batch price means no batch discount, not the bundled one).
        Raises InputError naming the file when it cannot be read or has the wrong shape.
        """
        taken, source, bundled = _bundled()
        models = dict(bundled)
        if override is not None:
            models.update(_read_override(Path(override)))
            source = f"{source}; overrides from {override}"
        return cls(models, taken=taken, source=source)

    def for_provider(self, provider: str | None) -> PriceTable:
        """The prices that apply on `provider`.

        An entry keyed `MODEL@PROVIDER` prices MODEL on that provider only (the same open
        model costs differently on Groq and on Together); it replaces a plain `MODEL` entry
        there. Entries for other providers are left out.
        """
        plain = {k: v for k, v in self._models.items() if "@" not in k}
        if provider:
            suffix = "@" + provider.lower()
            plain.update({k.removesuffix(suffix): v for k, v in self._models.items() if k.endswith(suffix)})
        return PriceTable(plain, taken=self.taken, source=self.source)

    def priced_as(self, models: Iterable[str], as_model: str | None) -> PriceTable:
        """A copy in which each of `models` costs what `as_model` costs (e.g. an Azure deployment
        name priced as the model it deploys). Raises ConfigError when `as_model` is unpriced."""
        if not as_model:
            return self
        price = self.lookup(as_model)
        if price is None:
            raise ConfigError(
                f"--price-as {as_model}: no price for that model in the table (prices as of {self.taken or 'unknown'})"
            )
        table = self
        for model in models:
            table = table.with_override(model, **price.model_dump(exclude={"provider"}, exclude_none=True))
        return table

    @property
    def models(self) -> Mapping[str, ModelPrice]:
        """Every entry, by normalised model id (read-only)."""
        return MappingProxyType(self._models)

    def __len__(self) -> int:
        return len(self._models)

    def resolve(self, model: str) -> str | None:
        """The table key that prices `model` (exact id, or its longest dash-boundary prefix)."""
        cache = self._cache
        if model in cache:
            return cache[model]
        key = normalize_model(model)
        found: str | None = None
        models = self._models
        if key in models:
            found = key
        elif not key.startswith("ft:"):
            # Cut at dashes from the right: "gpt-4o-mini-2024-07-18" tries "gpt-4o-mini-2024-07",
            # ..., "gpt-4o-mini" -- the first hit is the longest prefix ending at a dash.
            cut = key.rfind("-")
            while cut > 0:
                candidate = key[:cut]
                if candidate in models:
                    found = candidate
                    break
                cut = key.rfind("-", 0, cut)
        if len(cache) >= _LOOKUP_CACHE_SIZE:
            cache.clear()
        cache[model] = found
        return found

    def lookup(self, model: str) -> ModelPrice | None:
        """The price of `model`, or None when the table cannot price it."""
        key = self.resolve(model)
        return None if key is None else self._models[key]

    def with_override(
        self,
        model: str,
        *,
        input: float | None = None,
        output: float | None = None,
        cached_input: float | None = None,
        batch_input: float | None = None,
        batch_cached_input: float | None = None,
        batch_output: float | None = None,
        above_200k: ModelPrice | Mapping[str, Any] | None = None,
    ) -> PriceTable:
        """A copy of this table with `model`'s prices set from CLI-style flags (USD per 1M).

        Given rates replace the model's current ones (its exact entry, or the entry it
        resolves to). A rate derived from one that changed is dropped unless also given, so
        it falls back to the new value: a new `input` drops `cached_input` and `batch_input`;
        a new `output` drops `batch_output`. A model the table cannot price needs both
        `input` and `output`. Flags cannot state long-prompt rates, so a new `input` or `output`
        also drops the entry's `above_200k` (unless given): use a price file for those. Raises
        ConfigError otherwise, or for negative prices.
        """
        given = {
            "input": input,
            "output": output,
            "cached_input": cached_input,
            "batch_input": batch_input,
            "batch_cached_input": batch_cached_input,
            "batch_output": batch_output,
            "above_200k": above_200k,
        }
        given = {k: v for k, v in given.items() if v is not None}
        if not given:
            raise ConfigError(f"No price given for model {model!r}: pass --price-input and/or --price-output.")
        current = self.lookup(model)
        if current is None:
            if input is None or output is None:
                raise ConfigError(
                    f"Model {model!r} is not in the price table (prices as of {self.taken or 'unknown'}); "
                    "give both --price-input and --price-output (USD per 1M tokens), or use --price-file."
                )
            fields: dict[str, Any] = {}
        else:
            fields = current.model_dump()
            if input is not None:
                fields.update(cached_input=None, batch_input=None, batch_cached_input=None)
            if output is not None:
                fields["batch_output"] = None
            if input is not None or output is not None:
                fields["above_200k"] = None
            if batch_input is not None:
                fields["batch_cached_input"] = None
        fields.update(given)
        try:
            price = ModelPrice(**fields)
        except ValidationError as e:
            raise ConfigError(
                f"Invalid price for model {model!r}: {_first_error(e)}. Prices are USD per 1M tokens, 0 or more."
            ) from None
        models = dict(self._models)
        models[normalize_model(model)] = price
        return PriceTable(models, taken=self.taken, source=f"{self.source}; {model} priced by flags")


@lru_cache(maxsize=1)
def _bundled() -> tuple[str, str, Mapping[str, ModelPrice]]:
    """The bundled table, parsed once per process (it never changes while running)."""
    raw = resources.files(__package__).joinpath(_BUNDLED).read_bytes()
    doc = json.loads(raw)
    models = {k: ModelPrice.model_validate(v) for k, v in doc["models"].items()}
    return str(doc.get("taken", "")), str(doc.get("source", "")), MappingProxyType(models)


def _read_override(path: Path) -> dict[str, ModelPrice]:
    """Entries of a user price file; every problem is an InputError naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"Price file {path} does not exist; check the --price-file path.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"Price file {path} cannot be read: {e}.") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(
            f"Price file {path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}."
        ) from None
    if not isinstance(doc, dict):
        raise InputError(f"Price file {path} must hold a JSON object; {_ENTRY_HELP}.")
    # The bundled shape nests entries under "models"; the simple shape is the entries alone.
    entries = doc["models"] if isinstance(doc.get("models"), dict) else doc
    out: dict[str, ModelPrice] = {}
    for model, entry in entries.items():
        if not isinstance(entry, dict):
            raise InputError(f"Price file {path}: the entry for {model!r} must be an object; {_ENTRY_HELP}.")
        try:
            out[model] = ModelPrice.model_validate(entry)
        except ValidationError as e:
            raise InputError(f"Price file {path}: bad entry for {model!r}: {_first_error(e)}; {_ENTRY_HELP}.") from None
    return out


def _first_error(e: ValidationError) -> str:
    """One readable line from a pydantic error: the field and what is wrong with it."""
    err = e.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "value"
    return f"{where}: {err.get('msg', 'invalid')}"
