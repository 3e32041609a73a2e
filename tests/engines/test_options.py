"""Engine options: one typed model per engine, built through the registry."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

from llmbatch import ConfigError
from llmbatch.engines import (
    ENGINE_NAMES,
    ENGINE_OPTIONS,
    EchoOptions,
    ModelOptions,
    create_engine,
    engine_options,
    parse_adapters,
)

# The option names jobs made with `--provider local` have stored (their ids hash them): each
# must still be accepted by the engines that took it.
STORED_FIELDS = {
    "echo": {"echo_latency", "echo_fail_rate", "max_concurrency"},
    "openai": {"upstream_url", "upstream_api_key", "max_concurrency", "request_timeout", "max_retries"},
    "llamacpp": {"model_path", "served_model_name", "adapters", "embedding_model", "embedding_batch_size",
                 "n_parallel", "n_ctx", "n_threads", "max_concurrency"},
    "transformers": {"model_path", "served_model_name", "adapters", "embedding_model", "embedding_batch_size",
                     "n_parallel", "n_ctx", "device", "dtype", "max_concurrency"},
    "vllm": {"model_path", "served_model_name", "adapters", "embedding_model", "embedding_batch_size",
             "n_parallel", "n_ctx", "dtype", "tensor_parallel_size", "gpu_memory_utilization", "max_concurrency"},
}  # fmt: skip


def test_every_engine_has_an_options_model() -> None:
    assert set(ENGINE_OPTIONS) == set(ENGINE_NAMES) == set(STORED_FIELDS)


@pytest.mark.parametrize("name", sorted(STORED_FIELDS))
def test_stored_field_names_are_accepted(name: str) -> None:
    assert STORED_FIELDS[name] <= set(ENGINE_OPTIONS[name].model_fields)


def test_a_dict_is_validated_into_the_engines_model() -> None:
    engine: Any = create_engine("echo", {"echo_latency": 0.25, "max_concurrency": 3})
    assert type(engine.config) is EchoOptions
    assert engine.config.echo_latency == 0.25
    assert engine.max_concurrency == 3


def test_shared_options_object_is_revalidated_for_the_engine() -> None:
    options = engine_options("llamacpp", ModelOptions(n_parallel=3))
    assert type(options).__name__ == "LlamaCppOptions"
    # What the user set stays marked as set (vllm reads model_fields_set).
    assert options.model_fields_set == {"n_parallel"}


def test_an_option_another_engine_takes_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        create_engine("echo", {"n_parallel": 4})
    assert "the echo engine takes no option 'n_parallel'" in str(info.value)


def test_a_bad_value_names_the_engine_and_field() -> None:
    with pytest.raises(ConfigError) as info:
        create_engine("echo", {"echo_fail_rate": 2})
    assert "the echo engine's option 'echo_fail_rate'" in str(info.value)


def test_unknown_engine_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="unknown engine 'nope': choose one of echo, openai"):
        create_engine("nope")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_missing_extra_is_named_before_the_engine_module_loads() -> None:
    with pytest.raises(ConfigError, match=r"the vllm engine needs vllm: pip install \"llmbatch\[vllm\]\""):
        create_engine("vllm", {"model_path": "some/model"})


def test_no_package_attribute_shadows_an_engine_module() -> None:
    # `engines._echo` must be the module (once imported) or absent, never a factory function.
    import inspect

    import llmbatch.engines as engines

    for name in ENGINE_NAMES:
        attribute = getattr(engines, f"_{name}", None)
        assert attribute is None or inspect.ismodule(attribute), name


def test_parse_adapters(tmp_path: Any) -> None:
    (tmp_path / "a").mkdir()
    assert parse_adapters([f"x={tmp_path / 'a'}"]) == {"x": str(tmp_path / "a")}
    with pytest.raises(ConfigError, match="use NAME=PATH"):
        parse_adapters(["no-equals"])
    with pytest.raises(ConfigError, match="does not exist"):
        parse_adapters([f"y={tmp_path / 'missing'}"])
