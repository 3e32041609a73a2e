"""Sharing the engine between API keys: which batches run, and whose row goes next.

Two decisions, both fair between owners (API keys) by default, or first come first served:

- Admission (`admit`): which waiting `in_progress` batches start executing. FIFO starts them in
  creation order up to `max_active_batches`. Fair starts, first, the oldest batch of every owner
  that has nothing running, even past the limit; then, while the limit allows, the oldest batch
  of the owner with the fewest batches running. So a tenant whose batches occupy every slot for
  hours cannot keep another tenant's batch waiting: the other tenant's batch starts at once and
  gets its share of the engine's rows (below). Going past the limit costs little, since the
  limit on work is the engine's: at most one extra batch per key, whose rows come out of the
  same engine-wide budget. Running batches are never paused to make room.

- Rows (`EngineSlots`): one budget of `engine.max_concurrency` rows in flight, shared by every
  running batch (not one budget per batch, which put N times the engine's concurrency in flight
  and let the oldest batches' rows queue ahead of everyone in the engine). When rows wait for a
  slot, a freed slot goes to the owner with the fewest rows in flight per unit of its weight,
  then to that owner's batch with the fewest rows in flight, then round-robin; FIFO gives it to
  the oldest batch. Rows in flight are counted per batch only; an owner's are summed when
  batches compete for a slot. So a lone batch, the hot case, costs what a semaphore costs.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from typing import Literal, Protocol, TypeVar

__all__ = ["Scheduling", "EngineSlots", "Share", "admit"]

Scheduling = Literal["fair", "fifo"]


class _Owned(Protocol):
    @property
    def owner(self) -> str: ...


B = TypeVar("B", bound=_Owned)


def admit(waiting: Sequence[B], running: Mapping[str, int], limit: int, scheduling: Scheduling = "fair") -> list[B]:
    """The waiting batches to start now, in the order to start them.

    `waiting` holds the batches that could start, oldest first; `running` counts the batches
    executing per owner.
    """
    total = sum(running.values())
    if scheduling == "fifo":
        return list(waiting[: max(0, limit - total)])
    queues: dict[str, deque[tuple[int, B]]] = {}
    for i, b in enumerate(waiting):
        queues.setdefault(b.owner, deque()).append((i, b))
    counts = Counter(running)
    chosen: list[tuple[int, B]] = []
    for owner, queue in queues.items():  # owners with nothing running: their oldest, past the limit if need be
        if counts[owner] == 0:
            chosen.append(queue.popleft())
            counts[owner] += 1
            total += 1
    while total < limit:
        owners = [o for o, q in queues.items() if q]
        if not owners:
            break
        owner = min(owners, key=lambda o: (counts[o], queues[o][0][0]))
        chosen.append(queues[owner].popleft())
        counts[owner] += 1
        total += 1
    chosen.sort(key=lambda item: item[0])
    return [b for _, b in chosen]


class Share:
    """A running batch's place in `EngineSlots`: its owner, its rows in flight, its waiting request."""

    __slots__ = ("owner", "order", "inflight", "turn", "waiter")

    def __init__(self, owner: str, order: int) -> None:
        self.owner = owner
        self.order = order  # when the batch joined: FIFO's order
        self.inflight = 0
        self.turn = 0  # when it last got a slot someone else also waited for (round-robin)
        # A batch's loop asks for one slot at a time, so it has at most one request waiting.
        self.waiter: asyncio.Future[bool] | None = None


class EngineSlots:
    """The engine's row budget, shared between running batches (see the module docstring).

    A batch `join`s, then `acquire`s a slot before each row and `release`s it when the row
    ends; `withdraw` makes its waiting `acquire` return False (cancelled or expired: stop now,
    not when a slot frees).
    """

    def __init__(
        self, capacity: int, scheduling: Scheduling = "fair", weights: Mapping[str, float] | None = None
    ) -> None:
        self.capacity = capacity
        self.scheduling = scheduling
        self._weights = dict(weights or {})
        self._free = capacity
        self._shares: dict[str, list[Share]] = {}  # owner -> its running batches
        self._waiting: list[Share] = []
        self._joined = 0
        self._turn = 0
        self._last_turn: dict[str, int] = {}  # owner -> turn of its last contended grant (round-robin)

    @property
    def in_flight(self) -> int:
        return self.capacity - self._free

    def owner_in_flight(self, owner: str) -> int:
        return sum(s.inflight for s in self._shares.get(owner, ()))

    def join(self, owner: str) -> Share:
        self._joined += 1
        share = Share(owner, self._joined)
        self._shares.setdefault(owner, []).append(share)
        return share

    def leave(self, share: Share) -> None:
        self.withdraw(share)
        shares = self._shares[share.owner]
        shares.remove(share)
        if not shares:  # both bounded by the owners with batches running
            del self._shares[share.owner]
            self._last_turn.pop(share.owner, None)

    async def acquire(self, share: Share) -> bool:
        """Waits for a slot; True once it is the batch's, False when withdrawn."""
        if self._free > 0 and not self._waiting:
            self._free -= 1
            share.inflight += 1
            return True
        waiter = asyncio.get_running_loop().create_future()
        share.waiter = waiter
        self._waiting.append(share)
        try:
            return await waiter
        except asyncio.CancelledError:
            if share.waiter is waiter:  # still waiting
                self._waiting.remove(share)
                share.waiter = None
            elif waiter.done() and not waiter.cancelled() and waiter.result():
                self.release(share)  # granted in the instant the task was cancelled: hand it on
            raise

    def release(self, share: Share) -> None:
        share.inflight -= 1
        while self._waiting:
            if self._grant(self._next()):
                return
        self._free += 1

    def withdraw(self, share: Share) -> None:
        """Ends the batch's wait, if it waits: its `acquire` returns False."""
        waiter = share.waiter
        if waiter is not None:
            self._waiting.remove(share)
            share.waiter = None
            if not waiter.done():
                waiter.set_result(False)

    def _next(self) -> Share:
        if len(self._waiting) == 1:  # a lone batch: the usual case, and the hot one
            return self._waiting[0]
        if self.scheduling == "fifo":
            return min(self._waiting, key=lambda s: s.order)
        # Rows in flight per owner, counted here rather than on every row: this runs only when
        # batches compete, and then over a handful of them.
        load = {o: self.owner_in_flight(o) / self._weights.get(o, 1.0) for o in {s.owner for s in self._waiting}}
        last = self._last_turn
        return min(
            self._waiting,
            key=lambda s: (
                load[s.owner],
                s.inflight,
                last.get(s.owner, 0),
                s.turn,
                s.order,
            ),
        )

    def _grant(self, share: Share) -> bool:
        """Hands the slot to `share`'s waiting request; False if that was cancelled meanwhile."""
        self._waiting.remove(share)
        waiter, share.waiter = share.waiter, None
        if waiter is None or waiter.done():  # its task was cancelled and has not run since
            return False
        self._turn += 1
        self._last_turn[share.owner] = share.turn = self._turn
        share.inflight += 1
        waiter.set_result(True)
        return True
