"""llmbatch from Python: batching clients for ordinary calls, and job handles."""

from __future__ import annotations

from ._client import AsyncBatchClient, BatchClient, BatchConfig

__all__ = ["AsyncBatchClient", "BatchClient", "BatchConfig"]
