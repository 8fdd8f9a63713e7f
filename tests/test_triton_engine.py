"""The backend's CUDA code path -- the batched Triton attention with statistics and the
Triton compaction -- inside a real vLLM engine on CPU, through the Triton interpreter:
greedy tokens must equal the PyTorch reference path's (the CPU twin of the GPU runs in
benchmarks/gpu_e2e.py --smoke)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import Engine, prompt_ids

SPECS = ["h2o:0.25", "snapkv:0.25", "pyramidkv:0.25", "mikv:0.5"]  # pyramidkv: per-layer kept; mikv: 4-bit pages
PROMPTS = [prompt_ids(300, s) for s in range(2)]  # 300 tokens: compacted to 64 of 10 blocks
OUT = 32  # decode crosses 2 block boundaries (304, 320): h2o folds twice. Kept small: the
# interpreter runs every program of every launch in Python (~4 min for this test on 2 cores)
# SnapKV with the prompt cut into 297 + 3 tokens (then 294 + 6, ...): its voters span two
# chunks on the kernel path; it must still match the reference's one-shot prefill.
CHUNKED = "snapkv:0.25 chunked"


def _greedy(model: str, spec: str) -> list[list[int]]:
    kw = {}
    if spec.endswith(" chunked"):
        spec, kw = spec.split()[0], {"max_num_batched_tokens": 297}
    with Engine(model, spec, max_model_len=1024, **kw) as eng:
        return [list(o.outputs[0].token_ids) for o in eng.generate(PROMPTS, OUT)]


@pytest.mark.timeout(600)
def test_triton_path_matches_reference_in_engine(tiny_model):
    env = {**os.environ, "TRITON_INTERPRET": "1", "VLLM_KVCOMP_FORCE_TRITON": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__, tiny_model], env=env, capture_output=True,
                          text=True, timeout=540)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("TOKENS ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    triton_tokens = json.loads(lines[-1][len("TOKENS "):])
    for spec in SPECS:
        assert triton_tokens[spec] == _greedy(tiny_model, spec), spec
    assert triton_tokens[CHUNKED] == triton_tokens["snapkv:0.25"], "votes must span prefill chunks"


if __name__ == "__main__":  # the interpreter run (a fresh process: TRITON_INTERPRET at import)
    from vllm_kvcomp.triton_kernels import api

    assert api.FORCE_TRITON
    print("TOKENS " + json.dumps({spec: _greedy(sys.argv[1], spec) for spec in SPECS + [CHUNKED]}), flush=True)
