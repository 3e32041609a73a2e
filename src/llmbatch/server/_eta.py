"""How long a batch will take on this server's engine, said in the log when it is long.

A batch of 1,000 open-ended rows on a CPU model runs for hours; nothing in OpenAI's batch object
says so. The server measures its engine's generation rate (output tokens per second while rows
are in flight, all batches and keys together) and, once a batch is validated, or as soon as a
rate is measured for one that started before, logs once

    batch batch_...: 1,000 rows, up to 1,024,000 output tokens (1,000 rows without max_tokens,
    1,024 tokens each assumed); at the 98.5 tokens/s measured on this engine: up to 2.9 h

when that is over `SAY_ABOVE_S`. The estimate is an upper bound where rows give their
`max_tokens` (a row may stop sooner), rows without one count as the measured mean per row (or
1,024 tokens before any row was measured, as `llmbatch estimate` guesses), and rows run with
others on the same engine share its rate.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["SAY_ABOVE_S", "OutputBudget", "Throughput", "estimate_line"]

#: Batches estimated to take longer than this get their line in the log ("more than a few minutes").
SAY_ABOVE_S = 180.0
#: A rate is trusted after this much busy time and this many tokens (a first row's prompt dominates).
_MIN_BUSY_S = 2.0
_MIN_TOKENS = 20
#: Output tokens assumed for a row without a cap, before the engine has answered any.
_GUESS_PER_ROW = 1024
#: The fields that cap a row's output, by endpoint family (OpenAI's names).
CAP_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")


@dataclass
class OutputBudget:
    """What a batch's rows may generate: the sum of their caps, and how many rows have none."""

    rows: int = 0
    capped_tokens: int = 0
    uncapped_rows: int = 0

    def add(self, body: object) -> None:
        self.rows += 1
        cap, choices = None, 1
        if isinstance(body, dict):
            cap = next((body[k] for k in CAP_FIELDS if isinstance(body.get(k), int) and body[k] > 0), None)
            n = body.get("n")
            choices = n if isinstance(n, int) and 0 < n <= 128 else 1
        if cap is None:
            self.uncapped_rows += 1
        else:
            self.capped_tokens += cap * choices


class Throughput:
    """Output tokens per second of busy time (time with at least one row in flight)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._in_flight = 0
        self._busy = 0.0
        self._since: float | None = None
        self.tokens = 0
        self.rows = 0

    def begin(self) -> None:
        if self._in_flight == 0:
            self._since = self._clock()
        self._in_flight += 1

    def end(self, output_tokens: int | None) -> None:
        self._in_flight -= 1
        if output_tokens is not None:
            self.tokens += output_tokens
            self.rows += 1
        if self._in_flight == 0 and self._since is not None:
            self._busy += self._clock() - self._since
            self._since = None

    def tokens_per_second(self) -> float | None:
        busy = self._busy + (self._clock() - self._since if self._since is not None else 0.0)
        if busy < _MIN_BUSY_S or self.tokens < _MIN_TOKENS:
            return None
        return self.tokens / busy


def estimate_line(batch_id: str, budget: OutputBudget, rows_left: int, meter: Throughput) -> str | None:
    """The log line for a batch with `rows_left` of its rows to run, or None while no rate is
    measured or when it would take less than SAY_ABOVE_S."""
    rate = meter.tokens_per_second()
    if rate is None or budget.rows == 0 or rows_left <= 0:
        return None
    per_uncapped = round(meter.tokens / meter.rows) if meter.rows else _GUESS_PER_ROW
    share = rows_left / budget.rows  # the rows left are taken as a fair share of the caps
    tokens = round((budget.capped_tokens + budget.uncapped_rows * per_uncapped) * share)
    seconds = tokens / rate
    if seconds <= SAY_ABOVE_S:
        return None
    rows = f"{rows_left:,} rows" + (" left" if rows_left < budget.rows else "")
    uncapped = (
        f" ({budget.uncapped_rows:,} rows without max_tokens, {per_uncapped:,} tokens each assumed)"
        if budget.uncapped_rows
        else ""
    )
    return (
        f"batch {batch_id}: {rows}, up to {tokens:,} output tokens{uncapped}; "
        f"at the {rate:,.1f} tokens/s measured on this engine: up to {_duration(seconds)}"
    )


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
