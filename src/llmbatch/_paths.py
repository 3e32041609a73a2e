"""Where llmbatch keeps its data: one home directory, relocatable with $LLMBATCH_HOME."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

__all__ = ["llmbatch_home", "default_server_dir"]


def llmbatch_home() -> Path:
    """$LLMBATCH_HOME, or the per-user data directory (e.g. ~/.local/share/llmbatch)."""
    env = os.environ.get("LLMBATCH_HOME")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_data_dir("llmbatch", appauthor=False))


def default_server_dir() -> Path:
    """The server's default --data-dir."""
    return llmbatch_home() / "server"
