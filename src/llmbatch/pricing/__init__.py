"""Costing: model prices, offline token counts, and the estimates made from them before a job spends.

- `PriceTable` and friends (`_prices`): the bundled price table (`prices.json`), overrides, cost
  arithmetic.
- `estimate_row` and `Estimate` (`_estimate`): a request's input tokens and output ceiling, and
  their priced totals over a job.
- `tokenizer_for` and friends (`_tokens`): offline token counts in each model's vocabulary, and
  chat's framing rule, shared with the echo engine's usage.
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
from ._tokens import (
    CL100K_BASE,
    O200K_BASE,
    REPLY_PRIMING_TOKENS,
    TOKENS_PER_MESSAGE,
    TOKENS_PER_NAME,
    Tokenizer,
    count_tokens,
    encoding_for_model,
    get_tokenizer,
    tokenizer_for,
)

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
    # tokens
    "CL100K_BASE",
    "O200K_BASE",
    "REPLY_PRIMING_TOKENS",
    "TOKENS_PER_MESSAGE",
    "TOKENS_PER_NAME",
    "Tokenizer",
    "count_tokens",
    "encoding_for_model",
    "get_tokenizer",
    "tokenizer_for",
]
