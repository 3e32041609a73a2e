"""Planning: pending rows packed into chunks (one endpoint and model each) under the limits."""

from __future__ import annotations

from collections import deque

from ._context import RunContext
from ._records import PendingRow

__all__ = ["plan"]


def plan(ctx: RunContext, *, full_only: bool = False, limit: int | None = None, direct: bool = True) -> bool:
    """Packs pending rows into chunks; returns whether it planned any.

    `full_only`: only chunks that reached a limit (requests, bytes or tokens); the rest stays
    pending (the Python API's batching waits for more calls or its send delay).
    `limit`: at most this many chunks now (the first goes out before the rest are planned).
    `direct`: leave the rows to the direct API when no more than `--direct-below` are pending.
    Rows are read in pages of a chunk's size, so memory stays flat however large the job.
    Bytes are counted as the provider receives them (translated, where it translates), so a
    chunk within `--max-bytes` is a batch within it.
    """
    store, settings = ctx.store, ctx.settings
    envelope = ctx.provider.wire_envelope
    if direct and settings.direct_below and store.pending_count() <= settings.direct_below:
        return False  # few enough left: the direct API sends them now instead
    planned = 0
    for endpoint, model in store.pending_groups():
        price = ctx.tariff(model)
        rows: deque[PendingRow] = deque()
        read_to, more = -1, True
        while limit is None or planned < limit:
            if more and len(rows) < ctx.batch_size:
                page = store.pending_rows(endpoint, model, read_to, ctx.batch_size)
                more = len(page) == ctx.batch_size
                if page:
                    rows.extend(page)
                    read_to = page[-1].idx
            if not rows:
                break
            idxs: list[int] = []
            nbytes, est_in, est_out = envelope, 0, 0
            est_cost = 0.0
            full = False
            while rows and len(idxs) < ctx.batch_size:
                row = rows[0]
                too_big = nbytes + row.size > ctx.max_bytes
                too_heavy = ctx.max_enqueued is not None and est_in + row.est_input > ctx.max_enqueued
                if idxs and (too_big or too_heavy):
                    full = True  # the row that did not fit starts the next chunk
                    break
                rows.popleft()
                idxs.append(row.idx)
                nbytes += row.size
                est_in += row.est_input
                est_out += row.est_output
                est_cost += price(row.est_input, row.est_output)  # per row: a long prompt costs more per token
            if full_only and not (full or len(idxs) >= ctx.batch_size):
                break
            # Past the highest tag the store knows, not its count: a tag is never used twice.
            prefix = f"{ctx.job_id}-c"
            tag = f"{prefix}{store.last_chunk_no(prefix) + 1:05d}"
            store.plan_chunk(tag, endpoint, model, idxs, nbytes, est_in, est_out, est_cost)
            planned += 1
    return planned > 0
