"""The direct API: the last few pending rows (`--direct-below`) sent one request each instead
of waiting another batch cycle."""

from __future__ import annotations

import asyncio

import orjson

from ._cache import remember
from ._collect import classify
from ._context import RunContext
from ._outgoing import RequestLines
from ._records import DirectRow, Outcome

__all__ = ["run_direct"]


async def run_direct(ctx: RunContext) -> bool:
    """Sends the pending rows through the direct API when no more than `--direct-below` are
    left, a bounded number at a time; returns whether it sent any.

    A row in flight when the process dies is sent again on resume: at most `direct_below`
    rows can be paid twice, which is the price of not waiting a batch cycle.
    """
    store, settings = ctx.store, ctx.settings
    limit = settings.direct_below
    pending = store.pending_count()
    # Not before the audit: a lost batch (a rolled-back store) may hold these rows.
    if not limit or not pending or pending > limit or ctx.budget_blocked or not ctx.audited:
        return False
    if settings.max_cost is not None:
        # Few rows: priced one by one, at direct prices.
        direct_cost = sum(ctx.tariff(m, batch=False)(i, o) for m, i, o in store.pending_estimates())
        committed = store.totals()["cost"] + store.in_flight_cost()
        if committed + direct_cost > settings.max_cost:
            ctx.say(f"budget: the last {pending} rows at direct prices (est. ${direct_cost:.4f}) pass the cap")
            ctx.budget_blocked = True
            return False
    rows = store.start_direct()
    # The lines a batch would carry (the job's model): the adapter translates them as it would a batch's.
    with RequestLines(store, ctx.inputs) as lines:
        bodies = {row.idx: orjson.loads(lines.line(row))["body"] for row in rows}
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
