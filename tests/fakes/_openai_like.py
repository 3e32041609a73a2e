"""What the Together and Mistral fakes share (tests/fakes/together.py, tests/fakes/mistral.py).

Both APIs take batch input lines `{custom_id, body}` and answer with OpenAI-like result lines;
both fakes keep the same state and controls, and find their row markers (`FAIL400`, `FAIL429`,
...) in the last user message.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

__all__ = ["OpenAILikeFake", "jsonl", "user_text"]


def user_text(body: dict[str, Any]) -> str | None:
    """The text of the request's last user message (its text parts joined); None without one."""
    for m in reversed(body.get("messages") or []):
        if m.get("role") == "user":
            c = m.get("content")
            if isinstance(c, str):
                return c
            return "".join(p.get("text", "") for p in c or [] if isinstance(p, dict) and p.get("type") == "text")
    return None


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


@dataclass
class OpenAILikeFake:
    """The state and controls both fakes have; each adds its own, and sets `app`, the ASGI app to serve."""

    api_key: str = "test-key"
    #: The root URL the fake is served at (set by whoever serves it; the tests read it back).
    url: str = ""
    #: The next N batches to end expire, with only the first half of their rows done.
    expire_next: int = 0
    #: The next N batch creations happen, but their answer is lost (HTTP 500).
    lose_create_answers: int = 0
    seed: int = 1234
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    contents: dict[str, bytes] = field(default_factory=dict)
    batches: dict[str, dict[str, Any]] = field(default_factory=dict)
    polls: dict[str, int] = field(default_factory=dict)
    #: The input lines of every batch, as received.
    lines: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    seen_429: set[str] = field(default_factory=set)
    #: Bodies sent to the direct (non-batch) endpoints.
    direct_bodies: list[dict[str, Any]] = field(default_factory=list)
    #: Every call: "METHOD /path" (Mistral's fake adds "?query").
    calls: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def file_lines(self, fid: str) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.contents[fid].splitlines() if x.strip()]

    def _done_rows(self, b: dict[str, Any], partial: bool) -> list[dict[str, Any]]:
        """The input lines a batch that ends now has done: all, or the first half when it ends `partial`."""
        rows = self.lines.get(b["id"], [])
        return rows[: len(rows) // 2] if partial else rows
