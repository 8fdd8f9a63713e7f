#!/usr/bin/env bash
# Set up (if needed), convert the embedded real model once, serve it with KV
# compression through vLLM's OpenAI server, and show a completion.
#   bash scripts/serve.sh [SPEC]        (default h2o:0.25; Ctrl-C stops the server)
#   DEMO_ONCE=1 bash scripts/serve.sh   (query once, then stop)
set -euo pipefail
cd "$(dirname "$0")/.."
SPEC=${1:-h2o:0.25}
PORT=${PORT:-8000}
bash scripts/setup.sh
MODEL=$(.venv/bin/python -m vllm_kvcomp.models smollm2)
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2} HF_HUB_OFFLINE=1
echo "[serve] vllm-kvcomp serve $MODEL --kv-compression $SPEC" >&2
.venv/bin/vllm-kvcomp serve "$MODEL" --kv-compression "$SPEC" --served-model-name smollm2 \
  --dtype float32 --max-model-len 8192 --port "$PORT" --host 127.0.0.1 &
SERVER=$!
trap 'kill -INT $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT
.venv/bin/python -m vllm_kvcomp.demo --url "http://127.0.0.1:$PORT" --model "$MODEL" --spec "$SPEC"
if [ -z "${DEMO_ONCE:-}" ]; then
  echo "[serve] serving on http://127.0.0.1:$PORT (OpenAI API); Ctrl-C to stop" >&2
  wait $SERVER
fi
