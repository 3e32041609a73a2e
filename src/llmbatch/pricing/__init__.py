"""Costing: model prices, offline token counts, and the estimates made from them before a job spends.

- `PriceTable` and friends (`_prices`): the bundled price table (`prices.json`), overrides, cost
  arithmetic.
- `estimate_row` and `Estimate` (`_estimate`): a request's input tokens and output ceiling, and
  their priced totals over a job.
- `count_tokens` and friends (`_tokens`): offline tokenizers, chosen per model.
"""

from __future__ import annotations

from ._estimate import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    DEFAULT_OUTPUT_TOKENS,
    IMAGE_TOKENS,
    IMAGE_TOKENS_LOW,
    REASONING_OUTPUT_FACTOR,
    Estimate,
    RowEstimate,
    estimate_row,
    is_reasoning_model,
)
from ._prices import LONG_PROMPT_TOKENS, ModelPrice, PriceTable, Tariff, cost, cost_at, normalize_model

__all__ = [
    # prices
    "LONG_PROMPT_TOKENS",
    "ModelPrice",
    "PriceTable",
    "Tariff",
    "cost",
    "cost_at",
    "normalize_model",
    # estimates
    "COMPLETIONS_DEFAULT_MAX_TOKENS",
    "DEFAULT_OUTPUT_TOKENS",
    "IMAGE_TOKENS",
    "IMAGE_TOKENS_LOW",
    "REASONING_OUTPUT_FACTOR",
    "Estimate",
    "RowEstimate",
    "estimate_row",
    "is_reasoning_model",
]
