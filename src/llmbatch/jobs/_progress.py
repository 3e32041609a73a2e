"""Progress of a running job: a live display on a terminal, plain log lines elsewhere."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rich.console import Console
from rich.live import Live
from rich.text import Text

__all__ = ["Snapshot", "PlainProgress", "LiveProgress", "make_progress"]


@dataclass
class Snapshot:
    """Where a job stands: rows, remote batches by status, spend."""

    total: int
    done: int
    failed: int
    #: Remote batches by status ("in_progress", "finalizing", ...) and local ones ("planned").
    batches: dict[str, int] = field(default_factory=dict)
    spent: float = 0.0
    cap: float | None = None
    #: Batches in flight whose provider reports no progress until they end (their rows count
    #: as done only then).
    unknown: int = 0


class _Rate:
    """Rows per second since the first snapshot, for the ETA: the rows still to do at the rate
    observed so far (rows answered inside running batches count as they are reported)."""

    def __init__(self) -> None:
        self._start: tuple[float, int] | None = None

    def eta(self, snap: Snapshot) -> str:
        now = time.monotonic()
        if self._start is None:
            self._start = (now, snap.done)
            return "?"
        t0, d0 = self._start
        rate = (snap.done - d0) / (now - t0) if now > t0 else 0
        if rate <= 0:
            return "?"
        secs = math.ceil((snap.total - snap.done) / rate)  # rows left: at least a second, never 0m00s
        return f"{secs // 3600}h{secs % 3600 // 60:02d}m" if secs >= 3600 else f"{secs // 60}m{secs % 60:02d}s"


def _describe(snap: Snapshot, eta: str) -> str:
    batches = ", ".join(f"{n} {s}" for s, n in sorted(snap.batches.items())) or "none in flight"
    if snap.unknown:
        batches += f" ({snap.unknown} with progress unknown until the end: the provider reports none before)"
    cap = f" of ${snap.cap:.2f} cap" if snap.cap is not None else ""
    return (
        f"{snap.done}/{snap.total} rows done ({snap.failed} failed); batches: {batches}; "
        f"spent ${snap.spent:.4f}{cap}; ETA {eta}"
    )


class PlainProgress:
    """Log lines as the job moves (not a terminal: CI logs, cron mail): one whenever its batches,
    failures or spend change, and as rows finish, one per tenth of the rows done or per
    `every` seconds, whichever comes first, so that a long job logs tens of lines, not one a poll."""

    def __init__(self, say: Callable[[str], None], *, every: float = 60.0) -> None:
        self.say = say
        self.every = every
        self._rate = _Rate()
        self._last: tuple[object, ...] | None = None
        self._last_at = 0.0

    def update(self, snap: Snapshot) -> None:
        eta = self._rate.eta(snap)  # every snapshot, so the rate is measured from the first
        tenth = snap.done * 10 // snap.total if snap.total else 0
        shape = (tuple(sorted(snap.batches.items())), snap.failed, snap.spent, snap.unknown, tenth)
        now = time.monotonic()
        if self._last is not None and (snap.done, *shape) == self._last:
            return  # nothing moved
        if self._last is None or shape != self._last[1:] or now - self._last_at >= self.every:
            self._last = (snap.done, *shape)
            self._last_at = now
            self.say(_describe(snap, eta))

    def message(self, text: str) -> None:
        self.say(text)

    def close(self) -> None:
        pass


class LiveProgress:
    """A live status block on a terminal; messages scroll above it."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True, log_path=False)  # no "_progress.py:116" beside each message
        self._rate = _Rate()
        self._live = Live(Text("starting..."), console=self.console, refresh_per_second=4, transient=False)
        self._live.start()
        self._shown = False

    def update(self, snap: Snapshot) -> None:
        self._shown = True
        width = 30
        filled = int(width * snap.done / snap.total) if snap.total else width
        bar = "#" * filled + "-" * (width - filled)
        text = Text()
        text.append(f"[{bar}] ", style="green")
        text.append(_describe(snap, self._rate.eta(snap)))
        if snap.batches.get("finalizing"):
            text.append("\n(a batch in 'finalizing' is the provider writing its results: not a hang)", style="dim")
        self._live.update(text)

    def message(self, text: str) -> None:
        self.console.log(text)

    def close(self) -> None:
        # A run with nothing to wait for (every row answered from the cache) never showed
        # progress: its "starting..." goes instead of staying on the screen.
        self._live.transient = not self._shown
        self._live.stop()


def make_progress(say: Callable[[str], None], *, live: bool) -> PlainProgress | LiveProgress:
    return LiveProgress() if live else PlainProgress(say)
