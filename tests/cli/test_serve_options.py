"""`llmbatch serve`: engine options grouped in --help, and only the chosen engine's accepted."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from llmbatch.cli import cli
from llmbatch.engines import EchoOptions, OpenAIOptions


def _sections(help_text: str) -> dict[str, list[str]]:
    """Help section title -> the long option names listed under it."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in help_text.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            current = line[:-1]
            sections[current] = []
        elif current is not None:
            match = re.match(r"\s{2}(?:-\w, )?(--[a-z-]+)", line)
            if match:
                sections[current].append(match.group(1))
    return sections


def test_serve_help_groups_options_by_engine() -> None:
    result = CliRunner().invoke(cli, ["serve", "--help"])
    assert result.exit_code == 0, result.output
    sections = _sections(result.output)
    assert list(sections) == [
        "Options",
        "Echo engine options",
        "OpenAI engine options (forwarding)",
        "Model engine options (llamacpp, transformers, vllm)",
        "llamacpp engine options",
        "transformers engine options",
        "vllm engine options",
    ]
    assert {"--host", "--engine", "--max-concurrency", "--help"} <= set(sections["Options"])
    assert sections["Echo engine options"] == ["--echo-latency", "--echo-fail-rate"]
    assert sections["OpenAI engine options (forwarding)"] == [
        "--upstream-url",
        "--upstream-api-key",
        "--upstream-max-retries",
    ]
    assert "--model-path" in sections["Model engine options (llamacpp, transformers, vllm)"]
    assert sections["llamacpp engine options"] == ["--n-threads"]
    assert sections["vllm engine options"] == ["--tensor-parallel-size", "--gpu-memory-utilization"]
    # Every option is listed exactly once.
    listed = [name for names in sections.values() for name in names]
    assert len(listed) == len(set(listed))


def test_an_option_of_another_engine_is_a_clean_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "llmbatch", "serve", "--engine", "echo", "--n-parallel", "3"],
        capture_output=True,
        text=True,
        env={**os.environ, "LLMBATCH_HOME": str(tmp_path)},
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: the echo engine takes no option 'n_parallel'"), result.stderr


def _served_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, args: list[str], env: dict[str, str]) -> Any:
    """The ServerConfig `llmbatch serve ARGS` would run, without starting a server."""
    import llmbatch.server

    seen: list[Any] = []
    monkeypatch.setattr(llmbatch.server, "serve", lambda config, **kw: seen.append(config))
    monkeypatch.setenv("LLMBATCH_HOME", str(tmp_path))
    result = CliRunner().invoke(cli, ["serve", "--port", "0", *args], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return seen[0]


def test_the_upstream_key_from_the_environment_reaches_only_the_openai_engine(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env = {"LLMBATCH_UPSTREAM_API_KEY": "sk-upstream"}
    echo = _served_config(monkeypatch, tmp_path, ["--engine", "echo", "--echo-latency", "0.5"], env)
    assert echo.engine_options == EchoOptions(echo_latency=0.5)
    forward = _served_config(
        monkeypatch, tmp_path, ["--engine", "openai", "--upstream-url", "http://127.0.0.1:9/v1"], env
    )
    assert forward.engine_options == OpenAIOptions(upstream_url="http://127.0.0.1:9/v1", upstream_api_key="sk-upstream")


def test_scheduling_and_key_weights_reach_the_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from llmbatch.server._config import key_owner

    default = _served_config(monkeypatch, tmp_path, ["--engine", "echo"], {})
    assert default.scheduling == "fair" and default.key_weights == {}
    args = ["--engine", "echo", "--api-key", "k=a", "--api-key", "kb", "--key-weight", "k=a=2.5"]
    args += ["--scheduling", "fifo"]
    config = _served_config(monkeypatch, tmp_path, args, {})
    assert config.scheduling == "fifo"
    assert config.key_weights == {"k=a": 2.5}  # the weight follows the last '=': keys may hold one
    assert config.owner_weights() == {key_owner("k=a"): 2.5}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--key-weight", "secret-kb=2"], "that key is not one of the --api-key keys"),
        (["--api-key", "ka", "--key-weight", "ka=0"], "the weight must be a positive number, not 0.0"),
        (["--api-key", "ka", "--key-weight", "ka=nan"], "the weight must be a positive number, not nan"),
        (["--api-key", "ka", "--key-weight", "ka"], "expected KEY=WEIGHT"),
        (["--api-key", "ka", "--key-weight", "ka=much"], "expected KEY=WEIGHT"),
        (["--scheduling", "random"], "'random' is not one of 'fair', 'fifo'"),
    ],
)
def test_bad_scheduling_options_are_clean_errors(tmp_path: Path, args: list[str], message: str) -> None:
    from llmbatch import ConfigError

    result = CliRunner().invoke(cli, ["serve", "--engine", "echo", *args], env={"LLMBATCH_HOME": str(tmp_path)})
    # A usage error (exit 2 here), or a ConfigError that `llmbatch` prints as one line, exit 2.
    said = str(result.exception) if isinstance(result.exception, ConfigError) else result.output
    assert result.exit_code == 2 or isinstance(result.exception, ConfigError), result.output
    assert message in said
    assert "secret-kb" not in said  # a key is a secret: errors do not repeat it


def test_ray_executor_options_reach_the_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    default = _served_config(monkeypatch, tmp_path, ["--engine", "echo"], {})
    assert default.executor == "local" and default.ray_address is None and default.replicas is None
    pytest.importorskip("ray")
    args = ["--engine", "echo", "--executor", "ray", "--ray-address", "127.0.0.1:6379", "--replicas", "3"]
    args += ["--replica-cpus", "0.5", "--replica-resources", '{"GPU": 1}', "--replica-placement-wait", "2"]
    config = _served_config(monkeypatch, tmp_path, args, {})
    assert (config.executor, config.ray_address, config.replicas) == ("ray", "127.0.0.1:6379", 3)
    assert config.replica_cpus == 0.5 and config.replica_resources == {"GPU": 1.0}
    assert config.replica_placement_wait == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--replica-resources", "{GPU: 1}"], "--replica-resources: not JSON"),
        (["--replica-resources", '{"GPU": -1}'], "expected an object of resource names to non-negative amounts"),
        (["--replica-resources", '["GPU"]'], "expected an object of resource names to non-negative amounts"),
        (["--replicas", "0"], "0 is not in the range x>=1"),
        (["--executor", "dask"], "'dask' is not one of 'local', 'ray'"),
    ],
)
def test_bad_ray_options_are_clean_errors(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["serve", "--engine", "echo", *args], env={"LLMBATCH_HOME": str(tmp_path)})
    assert result.exit_code == 2, result.output
    assert message in result.output


def _help(*command: str) -> str:
    result = CliRunner().invoke(cli, [*command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())  # one line: wrapping must not split what is looked for


def test_help_shows_defaults_environment_variables_and_exit_codes() -> None:
    """What a new user looks for in --help: each option's default, the environment variables
    that set it, what --log-level does, and what `run`'s exit status means."""
    serve = _help("serve")
    assert "[env var: LLMBATCH_API_KEYS]" in serve and "[env var: LLMBATCH_UPSTREAM_API_KEY]" in serve
    log_level = serve[serve.index("--log-level") :]
    assert log_level.split("[default: info]")[0].count(" ") > 3  # a sentence, not just the choices
    run = _help("run")
    assert "--poll-interval FLOAT RANGE First wait between polls" in run and "[default: 2;" in run
    assert "Exit codes: 0 every row succeeded" in run and "130 Ctrl+C" in run
