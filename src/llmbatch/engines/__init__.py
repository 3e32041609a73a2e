"""Engines: what answers the requests of the server's batches and direct endpoints."""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from .._exceptions import ConfigError, EngineUnavailable
from ._base import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    KNOWN_ENDPOINTS,
    MODERATIONS,
    RESPONSES,
    Engine,
    EngineRequest,
    EngineResponse,
    MetricFamily,
    TextDelta,
    Usage,
    error_body,
    usage_from_body,
)
from ._facts import EngineFacts, ModelCatalog
from ._options import (
    EchoOptions,
    EngineOptions,
    LlamaCppOptions,
    ModelOptions,
    OpenAIOptions,
    TransformersOptions,
    VLLMOptions,
    parse_adapters,
)
from ._packaged import INSTALL_LOCAL, INSTALL_TRANSFORMERS, INSTALL_VLLM
from ._request import hex_id

__all__ = [
    "CHAT",
    "COMPLETIONS",
    "EMBEDDINGS",
    "RESPONSES",
    "MODERATIONS",
    "KNOWN_ENDPOINTS",
    "Engine",
    "EngineFacts",
    "ModelCatalog",
    "EngineOptions",
    "EchoOptions",
    "OpenAIOptions",
    "ModelOptions",
    "LlamaCppOptions",
    "TransformersOptions",
    "VLLMOptions",
    "ENGINE_OPTIONS",
    "engine_options",
    "parse_adapters",
    "EngineRequest",
    "EngineResponse",
    "MetricFamily",
    "TextDelta",
    "Usage",
    "ENGINE_NAMES",
    "create_engine",
    "resolve_engine",
    "error_body",
    "usage_from_body",
    "hex_id",
]


@dataclass(frozen=True)
class _Entry:
    """How to build one engine: imported only when it is asked for, after its extras are found."""

    #: "module:Class", the module relative to this package.
    target: str
    options: type[EngineOptions]
    #: Modules the engine cannot run without, checked before its module is imported.
    requires: tuple[str, ...] = ()
    #: Where to get them.
    install: str = ""


_REGISTRY: dict[str, _Entry] = {
    "echo": _Entry("_echo:EchoEngine", EchoOptions),
    "openai": _Entry("_openai:OpenAIForwardEngine", OpenAIOptions),
    "llamacpp": _Entry("_llamacpp:LlamaCppEngine", LlamaCppOptions, ("llama_cpp",), INSTALL_LOCAL),
    "transformers": _Entry(
        "_transformers:TransformersEngine", TransformersOptions, ("torch", "transformers"), INSTALL_TRANSFORMERS
    ),
    "vllm": _Entry("_vllm:VLLMEngine", VLLMOptions, ("vllm",), INSTALL_VLLM),
}
ENGINE_NAMES: tuple[str, ...] = tuple(_REGISTRY)
#: Each engine's options model, by engine name.
ENGINE_OPTIONS: dict[str, type[EngineOptions]] = {name: entry.options for name, entry in _REGISTRY.items()}


def resolve_engine(name: str) -> tuple[str, str | None]:
    """The engine `name` stands for, and a notice for the user when "auto" falls back to echo.

    "auto" is the environment's LLMBATCH_ENGINE when set, else `llamacpp` when llama-cpp-python
    and the packaged SmolLM2 model are installed, else `echo`.
    """
    if name != "auto":
        return name, None
    chosen = os.environ.get("LLMBATCH_ENGINE", "").strip()
    if chosen and chosen != "auto":
        return chosen, None
    from ._packaged import local_engine_available

    if local_engine_available():
        return "llamacpp", None
    return "echo", (
        "no local model is installed, so the echo engine answers (each reply repeats its request). "
        f"For real answers from SmolLM2-135M-Instruct on this machine: {INSTALL_LOCAL}"
    )


def _entry(name: str) -> _Entry:
    entry = _REGISTRY.get(name)
    if entry is None:
        raise ConfigError(f"unknown engine {name!r}: choose one of {', '.join(ENGINE_NAMES)}")
    return entry


def engine_options(name: str, options: EngineOptions | Mapping[str, Any] | None = None) -> EngineOptions:
    """`options` as the options of the engine called `name` (`EchoOptions`, `VLLMOptions`, ...).

    A mapping is validated field by field; a field that engine does not take, or a bad value,
    is a ConfigError naming the engine and the field.
    """
    model = _entry(name).options
    if options is None:
        return model()
    if isinstance(options, EngineOptions):
        if isinstance(options, model):
            return options
        options = options.model_dump(exclude_unset=True)
    try:
        return model.model_validate(dict(options))
    except ValidationError as exc:
        raise ConfigError(_options_error(name, model, exc)) from None


def _options_error(name: str, model: type[EngineOptions], exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "options"
        if error["type"] == "extra_forbidden":
            problems.append(f"the {name} engine takes no option {field!r}")
        else:
            problems.append(f"the {name} engine's option {field!r}: {error['msg']}")
    return f"{'; '.join(problems)} (it takes {', '.join(sorted(model.model_fields))})"


def create_engine(name: str, options: EngineOptions | Mapping[str, Any] | None = None) -> Engine:
    """Builds the engine called `name` with `options` (its options object or a dict of its fields).

    Raises ConfigError naming the choices when `name` is unknown, naming the field when an
    option is not that engine's, and EngineUnavailable naming what to install when the engine's
    libraries are missing.
    """
    entry = _entry(name)
    config = engine_options(name, options)
    missing = [module for module in entry.requires if importlib.util.find_spec(module) is None]
    if missing:
        raise EngineUnavailable(f"the {name} engine needs {' and '.join(missing)}: {entry.install}")
    module_name, _, class_name = entry.target.partition(":")
    cls = getattr(importlib.import_module(f".{module_name}", __name__), class_name)
    return cls(config)
