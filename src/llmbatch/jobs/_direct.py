"""The direct API: the last few pending rows (`--direct-below`) sent one request each instead
of waiting another batch cycle, and rows too few for one batch of a provider that has a
minimum per batch (Bedrock's 100 records per job)."""

from __future__ import annotations

import asyncio

import orjson

from ._cache import remember
from ._collect import classify
from ._context import RunContext
from ._outgoing import RequestLines
from ._planner import below_minimum
from ._records import DirectRow, Outcome

__all__ = ["run_direct"]


async def run_direct(ctx: RunContext) -> bool:
    """Sends the pending rows through the direct API when no more than `--direct-below` are
    left (and the rows of groups below the provider's minimum per batch, whatever is left), a
    bounded number at a time; returns whether it sent any.

    A row in flight when the process dies is sent again on resume: at most `direct_below`
    rows can be paid twice, which is the price of not waiting a batch cycle.
    """
    store, settings = ctx.store, ctx.settings
    limit = settings.direct_below
    pending = store.sendable_count()
    # Not before the audit: a lost batch (a rolled-back store) may hold these rows.
    if not pending or ctx.budget_blocked or not ctx.audited:
        return False
    groups: list[tuple[str, str]] | None = None  # None: every pending row
    if not limit or pending > limit:
        # Groups too small for one batch of the provider's go now: no batch can take them.
        small = below_minimum(ctx) if settings.direct else []
        if not small:
            return False
        groups = [(e, m) for e, m, _n in small]
        for _e, model, n in small:
            ctx.say(
                f"{n} rows of {model}: fewer than the {ctx.provider.name} provider's minimum of "
                f"{ctx.min_requests} requests per batch, so they go through the direct API, one request each"
            )
    if settings.max_cost is not None:
        # Few rows: priced one by one, at direct prices.
        chosen = None if groups is None else {m for _e, m in groups}
        estimates = [(m, i, o) for m, i, o in store.pending_estimates() if chosen is None or m in chosen]
        direct_cost = sum(ctx.tariff(m, batch=False)(i, o) for m, i, o in estimates)
        committed = store.totals()["cost"] + store.in_flight_cost()
        if committed + direct_cost > settings.max_cost:
            ctx.say(f"budget: the last {len(estimates)} rows at direct prices (est. ${direct_cost:.4f}) pass the cap")
            ctx.budget_blocked = True
            return False
    rows = store.start_direct(groups)
    # The lines a batch would carry (the job's model): the adapter translates them as it would a batch's.
    with RequestLines(store, ctx.inputs) as lines:
        bodies = {row.idx: orjson.loads(lines.line(row))["body"] for row in rows}
    if groups is None:
        ctx.say(f"sending the last {len(rows)} rows through the direct API")
    outcome = Outcome(settings.max_attempts)
    slots = asyncio.Semaphore(settings.direct_concurrency)

    async def one(row: DirectRow) -> None:
        async with slots:
            status, answer = await ctx.provider.direct(row.endpoint, bodies[row.idx])
        rec = {
            "id": None,  # no batch line's id: the export gives it one derived from job and row
            "custom_id": row.custom_id,
            "response": {"status_code": status, "request_id": None, "body": answer},
            "error": None,
        }
        classify(outcome, ctx.tariff(row.model, batch=False), row.idx, row.attempts, orjson.dumps(rec), rec)

    await asyncio.gather(*(one(r) for r in rows))
    store.finish_direct(outcome)
    remember(ctx, outcome)
    return True
