"""Providers: batch APIs behind one seam (see `Provider`)."""

from __future__ import annotations

from ._base import JOB_KEY, TAG_KEY, Provider, ProviderLimits, RemoteBatch, RemoteStatus

__all__ = [
    "JOB_KEY",
    "TAG_KEY",
    "PROVIDER_NAMES",
    "Provider",
    "ProviderLimits",
    "RemoteBatch",
    "RemoteStatus",
]

#: Names accepted by `--provider`.
PROVIDER_NAMES = ("openai", "local")
