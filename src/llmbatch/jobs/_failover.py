"""Cross-provider failover: rows a provider could not answer go to the next one (`--fallback`).

A job runs on one provider at a time, its lane: 0 is the job's own provider, n its n-th
fallback. When nothing is left in flight, the rows that failed for good for a reason another
provider may not have (expired, cancelled, 5xx, quota: `Failure.failover`) move, in one
transaction, to the next lane as pending rows sent as its model, and the job goes on there:
planned, priced, submitted and collected as any rows, with the same exactly-once rules (the
chunk's tag, looked up at the provider that holds it). Rows fail over one lane at a time and
lanes only go up, so a row goes to each provider at most once. Rows refused for themselves
(a 400) stay failed: another provider would refuse them too.

`--fallback-after` cancels a batch not finished in time: what it answered is kept, the rest
fails over (`Outcome.cut`) instead of being tried at the same provider again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from .._exceptions import ConfigError, ProviderError
from ..pricing import PriceTable
from ..providers import Provider, RemoteStatus, provider_class
from ._context import RunContext
from ._ingest import remote_id_for
from ._outgoing import RequestLines
from ._settings import PROVIDER_OPTIONS, JobSettings
from ._store import JobStore

__all__ = ["Lane", "check_lanes", "cut_overdue", "lane_settings", "move_failed"]

#: Rows read per page when moving failed rows to the next provider.
_PAGE = 1000


@dataclass
class Lane:
    """A fallback provider of a job, ready to run (not started): its settings, adapter and prices."""

    settings: JobSettings
    provider: Provider
    prices: PriceTable


def lane_settings(settings: JobSettings, lane: int) -> JobSettings:
    """The settings lane `lane` runs under: the job's, with the fallback's provider and model.
    Another provider's base URL and key come from its own environment variables; the same
    provider as the job's keeps the job's base URL."""
    if lane == 0:
        return settings
    provider, model = settings.lane_provider(lane)
    same = provider == settings.provider
    keep = {"base_url", *PROVIDER_OPTIONS}
    return settings.model_copy(
        update={
            "provider": provider, "model": model, "engine": "echo", "engine_options": {}, "price_as": None,
            **{k: getattr(settings, k) if same else None for k in keep},
        }
    )  # fmt: skip


def move_failed(store: JobStore, inputs: list[Path], to: RunContext) -> tuple[int, int]:
    """Moves the failed rows of lane `to.lane - 1` that may fail over to lane `to.lane`, each
    checked against that provider's rules as ingest checks rows (its id pattern, what it can
    run); returns (moved, refused by it)."""
    cls = provider_class(to.settings.provider)
    model = to.settings.model
    assert model is not None
    moved = kept = 0
    after = -1
    with RequestLines(store, inputs) as lines:
        while page := store.failover_rows(to.lane - 1, after, _PAGE):
            after = page[-1].idx
            go: list[tuple[str | None, int | None, int]] = []
            stay: list[int] = []
            for row in page:
                rec = orjson.loads(lines.line(row._replace(remote_id=None, rewrite=0)))
                body = {**rec["body"], "model": model}
                remote_id = remote_id_for(row.custom_id, cls.custom_id_pattern)
                reasons, wire = cls.check_and_measure(remote_id or row.custom_id, row.endpoint, body)
                if reasons:
                    stay.append(row.idx)
                else:
                    go.append((remote_id, wire, row.idx))
            store.fail_over(to.lane, model, go, stay)
            moved, kept = moved + len(go), kept + len(stay)
    return moved, kept


def check_lanes(store: JobStore, settings: JobSettings) -> int:
    """The lane the job is on; ConfigError when its settings no longer name that fallback."""
    lane = store.active_lane()
    if lane > len(settings.fallbacks):
        raise ConfigError(
            f"this job's rows are with its fallback {lane}, and this run names {len(settings.fallbacks)} fallbacks: "
            "run it with the --fallback options it was started with"
        )
    # Its batches there are polled at the provider this run names for that lane: the same one.
    sent_as = [m for lane_no in range(1, lane + 1) for m in store.models(lane=lane_no)]
    named = [settings.lane_provider(n)[1] for n in range(1, lane + 1)]
    if any(m not in named for m in sent_as):
        raise ConfigError(
            f"this job's rows went to fallbacks as {', '.join(sorted(set(sent_as)))}, and this run names "
            f"{', '.join(settings.fallbacks[:lane])} first: run it with the --fallback options it was started with"
        )
    return lane


async def cut_overdue(ctx: RunContext, has_next: bool) -> None:
    """Cancels the batches of this lane that have run longer than `--fallback-after` (when a
    fallback follows): the rows they answered are kept, the rest fail over when collected. The
    cut is recorded before the cancel is asked for, and asked again until the batch says so."""
    after = ctx.settings.fallback_after
    if after is None or not has_next:
        return
    now = time.time()
    for chunk in ctx.store.chunks(("submitted",)):
        status = chunk.remote_status or ""
        if chunk.batch_id is None or status in (RemoteStatus.CANCELLING, RemoteStatus.CANCELLED):
            continue
        if status in {s.value for s in RemoteStatus if s.terminal}:
            continue
        if not chunk.cut:
            if chunk.submitted_at is None or now < chunk.submitted_at + after:
                continue
            ctx.store.update_chunk(chunk.id, cut=1)
            ctx.say(
                f"chunk {chunk.tag}: not finished after {after:g} s at {ctx.settings.provider}: cancelling it; "
                "the rows it has not answered go to the next fallback"
            )
        try:
            batch = await ctx.provider.cancel(chunk.batch_id)
        except ProviderError as exc:
            ctx.say(f"chunk {chunk.tag}: cancel failed: {exc}; will try again")
            continue
        ctx.store.update_chunk(chunk.id, remote_status=batch.status.value)
