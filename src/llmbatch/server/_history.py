"""What the dashboard charts: each running batch's counts over time, and the engine's rows and
tokens per 10 seconds. Kept in memory (bounded): after a restart a batch's chart starts again
from its recorded state changes."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque

__all__ = ["ProgressHistory", "RateWindow"]


class ProgressHistory:
    """(time, completed, failed) samples per batch, about one a second; when a long run has
    `per_batch` of them they are thinned to every other one and taken half as often from then
    on, so memory stays bounded and the samples stay evenly spread."""

    def __init__(self, batches: int = 500, per_batch: int = 600) -> None:
        self._samples: OrderedDict[str, list[tuple[float, int, int]]] = OrderedDict()
        self._gap: dict[str, float] = {}  # seconds between a batch's samples: 1, doubled at each thinning
        self._batches = batches
        self._per_batch = per_batch
        self._lock = threading.Lock()

    def record(self, batch_id: str, completed: int, failed: int, at: float | None = None) -> None:
        now = time.time() if at is None else at
        with self._lock:
            samples = self._samples.get(batch_id)
            if samples is None:
                samples = self._samples[batch_id] = []
                self._gap[batch_id] = 1.0
                while len(self._samples) > self._batches:
                    self._gap.pop(self._samples.popitem(last=False)[0], None)
            if len(samples) > 1 and now - samples[-2][0] < self._gap[batch_id]:
                samples[-1] = (now, completed, failed)  # within a second of the one before: the latest wins
            else:
                samples.append((now, completed, failed))
            if len(samples) > self._per_batch:
                samples[:-1] = samples[:-1:2]  # every other one, and from now on half as often:
                self._gap[batch_id] *= 2  # a long run's chart keeps its shape

    def samples(self, batch_id: str) -> list[tuple[float, int, int]]:
        with self._lock:
            return list(self._samples.get(batch_id, ()))


class RateWindow:
    """Rows and tokens answered per 10-second bucket over the last `minutes`."""

    BUCKET = 10.0

    def __init__(self, minutes: int = 10) -> None:
        self._buckets: deque[list[float]] = deque(maxlen=int(minutes * 60 / self.BUCKET))
        self._lock = threading.Lock()

    def add(self, rows: int, tokens: int, at: float | None = None) -> None:
        start = (time.time() if at is None else at) // self.BUCKET * self.BUCKET
        with self._lock:
            if not self._buckets or self._buckets[-1][0] != start:
                self._buckets.append([start, 0.0, 0.0])
            self._buckets[-1][1] += rows
            self._buckets[-1][2] += tokens

    def series(self, now: float | None = None) -> list[tuple[float, float, float]]:
        """(bucket start, rows/s, tokens/s) for every bucket of the window, empty ones as 0."""
        now = time.time() if now is None else now
        last = now // self.BUCKET * self.BUCKET
        n = self._buckets.maxlen or 0
        with self._lock:
            have = {b[0]: b for b in self._buckets}
        out = []
        for i in range(n - 1, -1, -1):
            start = last - i * self.BUCKET
            b = have.get(start)
            out.append((start, b[1] / self.BUCKET if b else 0.0, b[2] / self.BUCKET if b else 0.0))
        return out

    def per_second(self, seconds: float, now: float | None = None) -> tuple[float, float]:
        """Rows/s and tokens/s over the last `seconds` (whole buckets, the current one included)."""
        now = time.time() if now is None else now
        since = now - seconds
        with self._lock:
            rows = sum(b[1] for b in self._buckets if b[0] + self.BUCKET > since)
            tokens = sum(b[2] for b in self._buckets if b[0] + self.BUCKET > since)
        return rows / seconds, tokens / seconds
