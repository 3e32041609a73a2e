"""Object ids in OpenAI's style: a prefix and random hex."""

from __future__ import annotations

import secrets

__all__ = ["new_id"]


def new_id(prefix: str, nbytes: int = 12) -> str:
    """'file-' + 24 hex digits, 'batch_' + ..., 'batch_req_' + ..."""
    return prefix + secrets.token_hex(nbytes)
