"""What the parts of a run share: the job, its provider and limits, prices, and run-time state."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .._exceptions import ConfigError
from ..pricing import PriceTable, Tariff
from ..providers import Provider, RemoteBatch
from ._settings import JobSettings
from ._store import JobStore

if TYPE_CHECKING:  # _cache reads result files through _export, whose checks import this module
    from ._cache import ResponseCache

__all__ = ["RunContext"]


@dataclass
class RunContext:
    """One run of one job against one provider: built by `JobRunner`, read by its parts
    (planning, submitting, collecting, the direct API)."""

    store: JobStore
    job_dir: Path
    settings: JobSettings
    provider: Provider
    prices: PriceTable
    #: Where messages for the user go (the progress display's `message`).
    say: Callable[[str], None]
    job_id: str
    inputs: list[Path]
    batch_size: int
    max_bytes: int
    max_in_flight: int
    max_enqueued: int | None
    #: Fewest requests a batch may hold (`ProviderLimits.min_requests`).
    min_requests: int = 1
    #: Most requests a batch may hold, whatever `--batch-size` says: a short tail is folded into
    #: the chunk before it up to this many.
    hard_max_requests: int = 50_000
    #: Whether the budget is holding back the next chunk (or the last rows' direct calls).
    budget_blocked: bool = False
    #: Batches refused in a row because the provider's token quota was full, and when to try again.
    quota_failures: int = 0
    quota_wait_until: float = 0.0
    #: Whether this run has compared the store with the job's batches at the provider (`audit`):
    #: nothing is submitted before it has.
    audited: bool = False
    #: Lost batches the audit found whose rows cannot be read until they end (tag -> batch):
    #: polled each round, adopted as they end; None before the audit's listing.
    audit_waiting: dict[str, RemoteBatch] | None = None
    #: Chunks whose earlier submission could not be looked up yet (tag -> why): said once each.
    lookups_waiting: dict[str, str] = field(default_factory=dict)
    #: Result files already downloaded this run (file id -> where), by the audit reading which
    #: rows a lost batch holds: collecting that batch uses them instead of downloading again.
    fetched: dict[str, Path] = field(default_factory=dict)
    #: Submitted chunks whose provider reports no progress before the batch ends (their
    #: completed counts stay 0 until then): the progress display says so.
    progress_unknown: set[int] = field(default_factory=set)
    #: Chunks the budget has held back, each said once (`_submit._over_budget`).
    budget_said: set[str] = field(default_factory=set)
    #: Seconds on a clock that only goes forward (pauses are measured on it; tests may set their own).
    clock: Callable[[], float] = time.monotonic
    #: The response cache, when the job runs with one: answers succeeded rows are kept in it.
    cache: ResponseCache | None = None
    #: Which of the job's providers this is: 0 its own, n its n-th fallback (`_failover.py`).
    lane: int = 0
    _tariffs: dict[tuple[str, bool], Tariff] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        store: JobStore,
        job_dir: Path,
        settings: JobSettings,
        provider: Provider,
        prices: PriceTable | None,
        say: Callable[[str], None],
        cache: ResponseCache | None = None,
        lane: int = 0,
    ) -> RunContext:
        if prices is None:
            prices = PriceTable.load(settings.price_file).for_provider(settings.provider)
            prices = prices.priced_as(store.models(), settings.price_as)
        job = store.job()
        assert job is not None
        limits = provider.limits
        if settings.batch_size is not None and settings.batch_size < limits.min_requests:
            raise ConfigError(
                f"--batch-size {settings.batch_size} is below the {provider.name} provider's minimum of "
                f"{limits.min_requests} requests per batch"
            )
        return cls(
            store=store,
            job_dir=job_dir,
            settings=settings,
            provider=provider,
            prices=prices,
            say=say,
            job_id=job["id"],
            inputs=[Path(i["path"]) for i in job["inputs"]],
            batch_size=min(settings.batch_size or limits.max_requests, limits.max_requests),
            max_bytes=min(settings.max_bytes or limits.max_bytes, limits.max_bytes),
            max_in_flight=settings.max_in_flight or limits.max_in_flight,
            max_enqueued=settings.max_enqueued_tokens or limits.max_enqueued_tokens,
            cache=cache,
            min_requests=limits.min_requests,
            hard_max_requests=limits.max_requests,
            lane=lane,
        )

    @property
    def most_rows_planned(self) -> int:
        """The most rows the planner puts in a chunk: `batch_size`, plus a tail too short for a
        batch of its own (below the provider's minimum) folded in."""
        return min(self.batch_size + self.min_requests - 1, max(self.hard_max_requests, self.batch_size))

    def tariff(self, model: str, *, batch: bool = True) -> Tariff:
        """Prices one request of `model` at batch or direct prices (0 for a provider that bills
        nothing, or a model without a price)."""
        key = (model, batch)
        found = self._tariffs.get(key)
        if found is None:
            price = self.prices.lookup(model) if self.provider.billed else None
            found = self._tariffs[key] = Tariff(price, batch=batch)
        return found

    def unpriced_models(self) -> list[str]:
        if not self.provider.billed:
            return []
        # A fallback is sent as its one model; the job's own provider, as its rows' models.
        models = [self.settings.model] if self.lane and self.settings.model else self.store.models(lane=self.lane)
        return [m for m in models if self.prices.lookup(m) is None]
