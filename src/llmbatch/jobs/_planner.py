"""Planning: pending rows packed into chunks (one endpoint and model each) under the limits."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .._exceptions import ConfigError
from ._context import RunContext
from ._records import PendingRow

__all__ = ["below_minimum", "plan"]


@dataclass
class _Pack:
    """The rows of one chunk being planned, and what they add up to."""

    rows: list[PendingRow] = field(default_factory=list)
    nbytes: int = 0
    est_in: int = 0
    est_out: int = 0
    #: Whether a limit (bytes or tokens) closed it before its count was reached.
    full: bool = False


def _take(ctx: RunContext, rows: deque[PendingRow], count: int) -> _Pack:
    """Takes up to `count` rows off the front of `rows`, as many as fit the byte and token limits."""
    pack = _Pack(nbytes=ctx.provider.wire_envelope)
    while rows and len(pack.rows) < count:
        row = rows[0]
        too_big = pack.nbytes + row.size > ctx.max_bytes
        too_heavy = ctx.max_enqueued is not None and pack.est_in + row.est_input > ctx.max_enqueued
        if pack.rows and (too_big or too_heavy):
            pack.full = True  # the row that did not fit starts the next chunk
            break
        rows.popleft()
        pack.rows.append(row)
        pack.nbytes += row.size
        pack.est_in += row.est_input
        pack.est_out += row.est_output
    return pack


def _put_back(rows: deque[PendingRow], pack: _Pack) -> None:
    rows.extendleft(reversed(pack.rows))


def _take_above_minimum(ctx: RunContext, rows: deque[PendingRow], left: int) -> _Pack:
    """The next chunk of a group with `left` pending rows, leaving no tail below the provider's
    minimum where that can be avoided: a short tail is folded into this chunk when the
    provider's maximum and the byte limit allow, else this chunk and the rest share the rows
    evenly. (A job whose batches are refused for being too small gains nothing from waiting.)"""
    low = ctx.min_requests
    pack = _take(ctx, rows, ctx.batch_size)
    tail = left - len(pack.rows)
    if low <= 1 or not 0 < tail < low:
        return pack
    _put_back(rows, pack)
    if left <= ctx.hard_max_requests:
        folded = _take(ctx, rows, left)
        if len(folded.rows) == left:
            return folded
        _put_back(rows, folded)
    half = max(low, (len(pack.rows) + tail + 1) // 2)
    return _take(ctx, rows, min(half, len(pack.rows)))


def below_minimum(ctx: RunContext) -> list[tuple[str, str, int]]:
    """The (endpoint, model, pending rows) groups too small for one batch of the provider's:
    no batch can take them, so the direct API sends them."""
    if ctx.min_requests <= 1:
        return []
    return [(e, m, n) for e, m, n in ctx.store.pending_group_counts() if n < ctx.min_requests]


def plan(ctx: RunContext, *, full_only: bool = False, limit: int | None = None, direct: bool = True) -> bool:
    """Packs pending rows into chunks; returns whether it planned any.

    `full_only`: only chunks that reached a limit (requests, bytes or tokens); the rest stays
    pending (the Python API's batching waits for more calls or its send delay).
    `limit`: at most this many chunks now (the first goes out before the rest are planned).
    `direct`: leave the rows to the direct API when no more than `--direct-below` are pending.
    Rows are read in pages of a chunk's size, so memory stays flat however large the job.
    Bytes are counted as the provider receives them (translated, where it translates), so a
    chunk within `--max-bytes` is a batch within it. Where the provider has a minimum per
    batch (`min_requests`), a group with fewer pending rows is left to the direct API
    (`run_direct`), or refused when direct calls are off.
    """
    store, settings = ctx.store, ctx.settings
    if direct and settings.direct_below and store.sendable_count() <= settings.direct_below:
        return False  # few enough left: the direct API sends them now instead
    planned = 0
    for endpoint, model, left in store.pending_group_counts():
        if left < ctx.min_requests:
            if not settings.direct:
                raise ConfigError(
                    f"{left} rows of {model} are left to send, fewer than the {ctx.provider.name} provider's "
                    f"minimum of {ctx.min_requests} requests per batch, and direct calls are off (--no-direct): "
                    "run without --no-direct to send them one request each"
                )
            continue  # `run_direct` sends them
        price = ctx.tariff(model)
        rows: deque[PendingRow] = deque()
        read_to, more = -1, True
        # Enough rows in hand to fold a short tail into the chunk before it.
        want = ctx.batch_size + ctx.min_requests
        while limit is None or planned < limit:
            if more and len(rows) < want:
                page = store.pending_rows(endpoint, model, read_to, want)
                more = len(page) == want
                if page:
                    rows.extend(page)
                    read_to = page[-1].idx
            if not rows or left < ctx.min_requests:
                break
            pack = _take_above_minimum(ctx, rows, left)
            if full_only and not (pack.full or len(pack.rows) >= ctx.batch_size):
                break
            left -= len(pack.rows)
            # Per row: a long prompt costs more per token.
            est_cost = sum(price(r.est_input, r.est_output) for r in pack.rows)
            # Past the highest tag the store knows, not its count: a tag is never used twice.
            prefix = f"{ctx.job_id}-c"
            tag = f"{prefix}{store.last_chunk_no(prefix) + 1:05d}"
            idxs = [r.idx for r in pack.rows]
            store.plan_chunk(tag, endpoint, model, idxs, pack.nbytes, pack.est_in, pack.est_out, est_cost, ctx.lane)
            planned += 1
    return planned > 0
