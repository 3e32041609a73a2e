"""Token counts against outside truth: tiktoken's published vectors and tiktoken itself."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
from tiktoken_reference import CL100K, O200K, ntok

from llmbatch.pricing import CL100K_BASE, O200K_BASE, count_tokens, encoding_for_model, get_tokenizer, tokenizer_for

REFERENCE = {CL100K_BASE: CL100K, O200K_BASE: O200K}

# Counted differently by the two vocabularies (checked below), so a row counted with the wrong one fails.
MIXED = "The naïve café served 日本語のテキスト and 42,195 emojis 😀👍🏽 — ¿verdad? def f(x): return x**2"

TEXTS = [
    "hello world",
    MIXED,
    "",
    " ",
    "\n\n\n",
    "   leading and trailing   \t\n",
    "<|endoftext|> is only text here",
    "Ünïcödé ｆｕｌｌｗｉｄｔｈ ﬁ ligature ℌ",
    "한국어와 ภาษาไทย และ العربية",
    "lone surrogate \ud800 in JSON text",
    "1234567890" * 50,
    "x" * 5000,
    '{"name": "get_weather", "parameters": {"type": "object"}}',
    "it's we'll THEY'RE I'M you've she'd",
]


@pytest.mark.parametrize(
    ("name", "text", "ids"),
    [
        # tiktoken's own tests (tests/test_encoding.py, test_simple): known ids of "hello world".
        (CL100K_BASE, "hello world", [15339, 1917]),
        (O200K_BASE, "hello world", [24912, 2375]),
    ],
)
def test_published_vectors(name: str, text: str, ids: list[int]) -> None:
    assert REFERENCE[name].encode_ordinary(text) == ids  # the vector is tiktoken's
    assert get_tokenizer(name).encode(text) == ids
    assert get_tokenizer(name).count(text) == len(ids)
    assert get_tokenizer(name).decode(ids) == text


@pytest.mark.parametrize("name", [CL100K_BASE, O200K_BASE])
def test_counts_and_ids_equal_tiktoken(name: str) -> None:
    tok, ref = get_tokenizer(name), REFERENCE[name]
    for text in TEXTS:
        assert tok.encode(text) == ref.encode_ordinary(text), text
        assert tok.count(text) == len(ref.encode_ordinary(text)), text
    long = MIXED * 4000  # ~ 130,000 tokens: no length limit below the long-prompt threshold's size
    assert tok.count(long) == len(ref.encode_ordinary(long))


@pytest.mark.parametrize("name", [CL100K_BASE, O200K_BASE])
def test_decode_equals_tiktoken_also_for_split_characters(name: str) -> None:
    tok, ref = get_tokenizer(name), REFERENCE[name]
    ids = ref.encode_ordinary(MIXED)
    for end in range(len(ids) + 1):  # prefixes that cut multi-byte characters end in U+FFFD
        assert tok.decode(ids[:end]) == ref.decode(ids[:end])
    eot = ref.eot_token
    assert tok.decode([eot]) == ref.decode([eot]) == "<|endoftext|>"
    for bad in (-1, ref.n_vocab, 10**9):
        with pytest.raises(KeyError):
            tok.decode([bad])


def test_the_mixed_text_tells_the_vocabularies_apart() -> None:
    assert ntok(MIXED, CL100K) != ntok(MIXED, O200K)


@pytest.mark.parametrize(
    "model",
    ["gpt-4o", "gpt-4o-mini-2024-07-18", "openai/gpt-4.1", "GPT-4.1-nano", "gpt-4.5-preview", "gpt-5", "gpt-5.1",
     "gpt-5-mini", "o1", "o1-mini", "o3", "o3-2025-04-16", "o4-mini", "gpt-oss-120b", "groq/openai/gpt-oss-20b",
     "chatgpt-4o-latest", "ft:gpt-4o-mini-2024-07-18:org::abc"],
)  # fmt: skip
def test_gpt4o_generation_counts_with_o200k(model: str) -> None:
    assert encoding_for_model(model) == O200K_BASE
    assert count_tokens(MIXED, model) == ntok(MIXED, O200K)


@pytest.mark.parametrize(
    "model",
    ["gpt-4-turbo", "gpt-4", "gpt-4-0613", "gpt-3.5-turbo", "gpt-3.5-turbo-0125", "text-embedding-3-small",
     "claude-sonnet-4-5", "gemini-2.5-pro", "my-azure-deployment", "o10", "gpt-40", "", None, 5],
)  # fmt: skip
def test_older_and_unknown_models_count_with_cl100k(model: Any) -> None:
    assert encoding_for_model(model) == CL100K_BASE
    assert count_tokens(MIXED, model) == ntok(MIXED, CL100K)


def test_one_tokenizer_per_vocabulary_per_process() -> None:
    assert tokenizer_for("gpt-4o") is tokenizer_for("openai/gpt-4o-2024-08-06") is get_tokenizer(O200K_BASE)
    assert tokenizer_for("gpt-4") is tokenizer_for(None) is get_tokenizer(CL100K_BASE)


def test_counting_needs_no_network_and_no_tiktoken(tmp_path: Any) -> None:
    """In a fresh process whose sockets fail: both vocabularies count, and tiktoken (which would
    download o200k_base) is never imported."""
    code = (
        "import socket\n"
        "def _blocked(*a, **k):\n"
        "    raise OSError('network access attempted')\n"
        "socket.socket.connect = _blocked\n"
        "socket.create_connection = _blocked\n"
        "socket.getaddrinfo = _blocked\n"
        "import sys\n"
        "from llmbatch.pricing import count_tokens, get_tokenizer\n"
        "print(count_tokens('hello world', 'gpt-4o'), count_tokens('hello world', 'gpt-4'),\n"
        "      get_tokenizer('o200k_base').decode([24912, 2375]), 'tiktoken' in sys.modules)\n"
    )
    env = {
        **os.environ,
        "HTTP_PROXY": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "TIKTOKEN_CACHE_DIR": str(tmp_path / "no-cache"),
    }
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["2", "2", "hello", "world", "False"]


@pytest.mark.parametrize("name", [CL100K_BASE, O200K_BASE])
def test_long_texts_counted_in_pieces_count_like_one_call(name: str) -> None:
    """Texts over 256K characters are counted and encoded in pieces (so a server counting them in a
    thread does not hold the GIL for the whole text); the pieces must give the encoder's own answer
    for the whole text in one call."""
    import random

    rng = random.Random(7)
    words = ["hello", "World", "it's", "42", "x1y2", "/path/to", "naïve", "日本語", "😀", "...", "\t", "A/B", "'s"]
    seps = [" ", "\n", "\n\n", "", ". ", ",\n", "\r\n", " \n", "/"]
    texts = [
        "".join(rng.choice(words) + rng.choice(seps) for _ in range(200_000)),
        "aGVsbG8gd29ybGQ9PQ" * 40_000,  # base64-like: no spaces or newlines
        ("lorem ipsum dolor sit amet\n" * 40_000) + "tail",
    ]
    tok = get_tokenizer(name).load()
    bpe = tok._bpe
    for text in texts:
        assert len(text) > 600_000
        assert tok.count(text) == bpe.count(text)
        assert tok.encode(text) == bpe.encode(text)
