#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite on CPU with real vLLM.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The pytest binary, not `python -m pytest`: the latter puts the repo root on sys.path,
# where our triton_kernels/ folder would shadow the `triton_kernels` vLLM imports.
exec .venv/bin/pytest -q -p no:cacheprovider "$@" tests
