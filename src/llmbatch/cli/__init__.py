"""The `llmbatch` command line (`python -m llmbatch`): one private module per command."""

from __future__ import annotations

from ._main import cli, main

__all__ = ["cli", "main"]
