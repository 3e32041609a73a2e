"""Progress of a running job: a live display on a terminal, plain log lines elsewhere."""

from __future__ import annotations

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


class _Rate:
    """Rows per second since the first snapshot, for the ETA."""

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
        secs = int((snap.total - snap.done) / rate)
        return f"{secs // 3600}h{secs % 3600 // 60:02d}m" if secs >= 3600 else f"{secs // 60}m{secs % 60:02d}s"


def _describe(snap: Snapshot, eta: str) -> str:
    batches = ", ".join(f"{n} {s}" for s, n in sorted(snap.batches.items())) or "none in flight"
    cap = f" of ${snap.cap:.2f} cap" if snap.cap is not None else ""
    return (
        f"{snap.done}/{snap.total} rows done ({snap.failed} failed); batches: {batches}; "
        f"spent ${snap.spent:.4f}{cap}; ETA {eta}"
    )


class PlainProgress:
    """One log line whenever something changed (not a terminal: CI logs, cron mail)."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self._rate = _Rate()
        self._last = ""

    def update(self, snap: Snapshot) -> None:
        line = _describe(snap, "")
        if line != self._last:
            self._last = line
            self.say(_describe(snap, self._rate.eta(snap)))

    def message(self, text: str) -> None:
        self.say(text)

    def close(self) -> None:
        pass


class LiveProgress:
    """A live status block on a terminal; messages scroll above it."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self._rate = _Rate()
        self._live = Live(Text("starting..."), console=self.console, refresh_per_second=4, transient=False)
        self._live.start()

    def update(self, snap: Snapshot) -> None:
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
        self._live.stop()


def make_progress(say: Callable[[str], None], *, live: bool) -> PlainProgress | LiveProgress:
    return LiveProgress() if live else PlainProgress(say)
