"""llmbatch: run large numbers of LLM requests cheaply and reliably."""

from __future__ import annotations

from ._exceptions import ConfigError, EngineError, InputError, LLMBatchError, StateError

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "LLMBatchError",
    "ConfigError",
    "InputError",
    "EngineError",
    "StateError",
]
