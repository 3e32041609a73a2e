"""The engine options shared by `llmbatch serve` and `llmbatch run --provider local`."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import click

__all__ = ["EngineOptionsCommand", "engine_options", "engine_config_options", "option_defaults", "ENGINE_HELP"]

F = TypeVar("F", bound=Callable[..., Any])

ENGINE_HELP = (
    "What answers requests: auto (llamacpp with the packaged model when installed, else echo; "
    "env LLMBATCH_ENGINE), llamacpp, transformers, vllm, openai or echo."
)

_OPTIONS: list[Callable[[F], F]] = [
    click.option(
        "--model-path",
        default=None,
        help="Model engines: the model (llamacpp: a GGUF file; transformers: a Hugging Face model directory "
        "or GGUF; vllm: a directory or id) [default: the packaged SmolLM2-135M-Instruct].",
    ),
    click.option("--served-model-name", default=None, help="Model engines: the name rows give as body.model."),
    click.option(
        "--adapter",
        "adapters",
        multiple=True,
        metavar="NAME=PATH",
        help="transformers/vllm: a LoRA adapter (PEFT directory) rows select with body.model NAME (repeatable).",
    ),
    click.option(
        "--embedding-model",
        default=None,
        help="Model engines: sentence-transformers directory for /v1/embeddings, or none "
        "[default: the packaged all-MiniLM-L6-v2 when installed].",
    ),
    click.option(
        "--n-parallel",
        type=click.IntRange(min=1),
        default=8,
        show_default=True,
        help="Model engines: sequences generated together.",
    ),
    click.option(
        "--n-ctx",
        type=click.IntRange(min=64),
        default=None,
        help="Model engines: context tokens per sequence [llamacpp: 2048; others: the model's].",
    ),
    click.option("--n-threads", type=click.IntRange(min=1), default=None, help="llamacpp: CPU threads [all cores]."),
    click.option("--device", default=None, help="transformers: cpu, cuda, cuda:N or mps [cuda when available]."),
    click.option("--dtype", default=None, help="transformers/vllm: weight dtype, e.g. bfloat16."),
    click.option(
        "--tensor-parallel-size", type=click.IntRange(min=1), default=1, show_default=True, help="vllm: GPUs per model."
    ),
    click.option(
        "--gpu-memory-utilization",
        type=click.FloatRange(0, 1, min_open=True),
        default=0.9,
        show_default=True,
        help="vllm: share of GPU memory it may take.",
    ),
]

#: The keyword names the options above add: fields of the model engines' options (`engines.ModelOptions`, ...).
_FIELDS = (
    "model_path",
    "served_model_name",
    "adapters",
    "embedding_model",
    "n_parallel",
    "n_ctx",
    "n_threads",
    "device",
    "dtype",
    "tensor_parallel_size",
    "gpu_memory_utilization",
)


#: --help sections after the command's own options: (title, the parameters it lists).
HELP_SECTIONS: tuple[tuple[str, frozenset[str]], ...] = (
    ("Echo engine options", frozenset({"echo_latency", "echo_fail_rate"})),
    ("OpenAI engine options (forwarding)", frozenset({"upstream_url", "upstream_api_key", "max_retries"})),
    (
        "Model engine options (llamacpp, transformers, vllm)",
        frozenset({"model_path", "served_model_name", "adapters", "embedding_model", "n_parallel", "n_ctx"}),
    ),
    ("llamacpp engine options", frozenset({"n_threads"})),
    ("transformers engine options", frozenset({"device", "dtype"})),
    ("vllm engine options", frozenset({"tensor_parallel_size", "gpu_memory_utilization"})),
)


class EngineOptionsCommand(click.Command):
    """A command whose --help lists its own options first, then each engine's in a section.

    Click has no option groups; writing the sections here costs less than a dependency.
    """

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        general: list[tuple[str, str]] = []
        sections: dict[str, list[tuple[str, str]]] = {title: [] for title, _ in HELP_SECTIONS}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            title = next((t for t, names in HELP_SECTIONS if param.name in names), None)
            (general if title is None else sections[title]).append(record)
        for title, records in [("Options", general), *sections.items()]:
            if records:
                with formatter.section(title):
                    formatter.write_dl(records)


def engine_options(f: F) -> F:
    """Adds the model-engine options to a command; see `engine_config_options`."""
    for option in reversed(_OPTIONS):
        f = option(f)
    return f


def option_defaults() -> dict[str, Any]:
    """Every engine option's default, by field name, from the engines' option models."""
    from ..engines import ENGINE_OPTIONS

    return {
        name: field.get_default(call_default_factory=True)
        for model in ENGINE_OPTIONS.values()
        for name, field in model.model_fields.items()
    }


def engine_config_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pops the model-engine options out of a command's kwargs, as engine option fields.

    Only options the user gave (not at their defaults) are returned, so a job's stored
    settings stay small and the engine's own defaults apply.
    """
    from ..engines import parse_adapters

    defaults = option_defaults()
    out: dict[str, Any] = {}
    for name in _FIELDS:
        value = kwargs.pop(name)
        if name == "adapters":
            value = parse_adapters(list(value)) if value else {}
            value = {k: os.path.abspath(v) for k, v in value.items()}
        elif name in ("model_path", "embedding_model") and value is not None and os.path.exists(value):
            value = os.path.abspath(value)  # a job resumed from another directory finds it
        if value != defaults[name]:
            out[name] = value
    return out
