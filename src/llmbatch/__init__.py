"""llmbatch: run large numbers of LLM requests cheaply and reliably."""

from __future__ import annotations

from ._exceptions import (
    BudgetExceeded,
    ConfigError,
    EngineError,
    InputError,
    LLMBatchError,
    ProviderError,
    StateError,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "LLMBatchError",
    "ConfigError",
    "InputError",
    "EngineError",
    "StateError",
    "ProviderError",
    "BudgetExceeded",
]
