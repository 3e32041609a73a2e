"""Fairness between API keys: one key's backlog must not hold back another key's batch."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import openai

from conftest import ServerProc, chat_line, jsonl, upload, wait_batch
from llmbatch.server._fair import EngineSlots, Share, admit

CHAT = "/v1/chat/completions"
LATENCY = 0.05  # seconds per row on the echo engine
CONCURRENCY = 4


def submit(client: openai.OpenAI, rows: int, tag: str) -> str:
    f = upload(client, jsonl([chat_line(f"{tag}-{i}") for i in range(rows)]))
    return client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h").id


def timed_batch(client: openai.OpenAI, tag: str) -> float:
    """Seconds from creating a 1-row batch to seeing it completed (uploaded beforehand)."""
    f = upload(client, jsonl([chat_line(f"{tag}-0")]))
    t0 = time.monotonic()
    b = client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    final = wait_batch(client, b.id, timeout=30)
    assert final.status == "completed" and final.request_counts.completed == 1, final
    return time.monotonic() - t0


def test_small_batch_of_one_key_is_not_stuck_behind_another_keys_backlog(
    server_factory: Callable[..., ServerProc],
) -> None:
    srv = server_factory(
        "--echo-latency", str(LATENCY), "--max-concurrency", str(CONCURRENCY), "--max-active-batches", "2",
        keys=["key-a", "key-b"],
    )  # fmt: skip
    a, b = srv.client("key-a"), srv.client("key-b")
    alone = timed_batch(b, "alone")

    # Key A queues 4 batches of 160 rows: 640 rows x 50 ms at 4 in flight is 8 s of engine time
    # (4 s before the last of A's batches even starts when each batch has its own 4 slots).
    backlog = [submit(a, 160, f"a{n}") for n in range(4)]
    wait_batch(a, backlog[0], timeout=30, until=("in_progress",))
    behind = timed_batch(b, "behind")

    # Within a small multiple of its time alone: admitted at once and first to the next free slot.
    assert behind < 2 * alone + 1.0, f"B's 1-row batch took {behind:.2f} s behind A's backlog, {alone:.2f} s alone"
    progress = [a.batches.retrieve(i) for i in backlog]
    assert progress[0].request_counts.completed < 160, "A's backlog must still be running (else nothing was shown)"

    # Cancelling A's batches stops them promptly, including those waiting for an engine slot.
    t0 = time.monotonic()
    for batch_id in backlog:
        a.batches.cancel(batch_id)
    ends = [wait_batch(a, batch_id, timeout=10) for batch_id in backlog]
    assert [e.status for e in ends] == ["cancelled"] * 4
    assert time.monotonic() - t0 < 3.0
    assert all(e.request_counts.total == 160 for e in ends)


# -- the choice logic, without a server ----------------------------------------------------


@dataclass
class Batch:
    id: str
    owner: str


def ids(batches: list[Batch]) -> list[str]:
    return [b.id for b in batches]


def test_admit_starts_an_idle_owners_oldest_batch_past_the_limit() -> None:
    waiting = [Batch("a3", "A"), Batch("a4", "A"), Batch("b1", "B"), Batch("b2", "B")]
    assert ids(admit(waiting, {"A": 2}, limit=2)) == ["b1"]
    assert ids(admit(waiting, {"A": 2}, limit=2, scheduling="fifo")) == []
    # places left go to the owner with the fewest running, oldest batch first
    assert ids(admit(waiting, {"A": 1}, limit=4)) == ["a3", "b1", "b2"]
    assert ids(admit(waiting, {"A": 1}, limit=4, scheduling="fifo")) == ["a3", "a4", "b1"]
    assert ids(admit(waiting, {}, limit=1)) == ["a3", "b1"]
    assert ids(admit(waiting, {}, limit=1, scheduling="fifo")) == ["a3"]
    assert ids(admit([], {"A": 9}, limit=1)) == []


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_engine_slots_go_to_the_owner_with_fewest_rows_in_flight() -> None:
    async def go() -> None:
        slots = EngineSlots(2)
        a1, a2, b = slots.join("A"), slots.join("A"), slots.join("B")
        assert await slots.acquire(a1) and await slots.acquire(a1)  # free slots: no waiting
        order: list[str] = []

        async def want(share: object, name: str) -> None:
            assert await slots.acquire(share)  # type: ignore[arg-type]
            order.append(name)

        waits = [asyncio.create_task(want(a2, "a2")), asyncio.create_task(want(b, "b"))]
        await asyncio.sleep(0)
        slots.release(a1)  # A holds 1, B none: B first, though A's batch asked first
        await asyncio.sleep(0)
        assert order == ["b"]
        slots.release(a1)
        await asyncio.gather(*waits)
        assert order == ["b", "a2"] and slots.in_flight == 2
        assert slots.owner_in_flight("A") == slots.owner_in_flight("B") == 1

    run(go())


def test_engine_slots_round_robin_and_fifo() -> None:
    async def grants(scheduling: str) -> list[str]:
        slots = EngineSlots(1, scheduling)  # type: ignore[arg-type]
        shares = {name: slots.join(name[0]) for name in ("a1", "a2", "b1")}
        holder = slots.join("C")
        assert await slots.acquire(holder)
        order: list[str] = []

        async def loop(name: str) -> None:  # a batch's row loop: one slot at a time, 3 rows
            for _ in range(3):
                assert await slots.acquire(shares[name])
                order.append(name)
                asyncio.get_running_loop().call_soon(slots.release, shares[name])

        tasks = [asyncio.create_task(loop(name)) for name in shares]
        await asyncio.sleep(0)
        slots.release(holder)
        await asyncio.gather(*tasks)
        return order

    async def go() -> None:
        # B gets every other slot while it waits; A's two batches take turns with A's half.
        assert await grants("fair") == ["a1", "b1", "a2", "b1", "a1", "b1", "a2", "a1", "a2"]
        assert await grants("fifo") == ["a1"] * 3 + ["a2"] * 3 + ["b1"] * 3

    run(go())


def test_withdraw_ends_a_wait_and_cancel_hands_the_slot_on() -> None:
    async def go() -> None:
        slots = EngineSlots(1)
        a, b, c = slots.join("A"), slots.join("B"), slots.join("C")
        assert await slots.acquire(a)
        waiting_b = asyncio.create_task(slots.acquire(b))
        waiting_c = asyncio.create_task(slots.acquire(c))
        await asyncio.sleep(0)
        slots.withdraw(b)
        assert await waiting_b is False
        waiting_c.cancel()
        await asyncio.sleep(0)
        slots.release(a)  # nobody waits any more: the slot is free again
        assert slots.in_flight == 0
        assert await slots.acquire(c)

    run(go())


def test_engine_slots_share_rows_by_weight() -> None:
    async def in_flight(weights: dict[str, float]) -> tuple[int, int]:
        slots = EngineSlots(8, weights=weights)
        holder = slots.join("C")
        for _ in range(8):
            assert await slots.acquire(holder)
        a, b = slots.join("A"), slots.join("B")

        async def loop(share: Share) -> None:  # rows that never end: each takes a slot for good
            while await slots.acquire(share):
                pass

        tasks = [asyncio.create_task(loop(a)), asyncio.create_task(loop(b))]
        for _ in range(8):  # free the slots one by one; both batches wait for each
            await asyncio.sleep(0)
            slots.release(holder)
        await asyncio.sleep(0)
        counts = slots.owner_in_flight("A"), slots.owner_in_flight("B")
        for share in (a, b):
            slots.withdraw(share)
        await asyncio.gather(*tasks)
        return counts

    async def go() -> None:
        assert await in_flight({}) == (4, 4)
        assert await in_flight({"A": 3}) == (6, 2)
        assert await in_flight({"B": 0.5, "A": 1.5}) == (6, 2)

    run(go())


def test_a_slot_freed_while_a_waiter_is_being_cancelled_goes_to_the_next() -> None:
    async def go() -> None:
        slots = EngineSlots(1)
        a, b, c = slots.join("A"), slots.join("B"), slots.join("C")
        assert await slots.acquire(a)
        waiting_b = asyncio.create_task(slots.acquire(b))
        waiting_c = asyncio.create_task(slots.acquire(c))
        await asyncio.sleep(0)
        waiting_b.cancel()  # its future is cancelled now, its task sees it only later
        slots.release(a)  # B is first in line but gone: C gets the slot
        assert await waiting_c is True
        assert waiting_b.cancelled()
        assert slots.in_flight == 1 and slots.owner_in_flight("C") == 1

    run(go())
