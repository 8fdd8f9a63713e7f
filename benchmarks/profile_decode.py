#!/usr/bin/env python3
"""Where a decode step's host time goes with the plugin (cProfile over engine steps).

    python benchmarks/profile_decode.py [--shape llama3-1b] [--spec streaming:1.0]
"""
import argparse
import cProfile
import io
import os
import pstats
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
sys.path.insert(0, os.path.dirname(__file__))
from gpu_e2e import Bench, make_model_dir  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama3-1b")
    p.add_argument("--spec", default=None, help="per-request spec (default: keep all)")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=60)
    a = p.parse_args()
    args = argparse.Namespace(shape=a.shape, prompt_len=a.prompt_len, output_len=a.steps + 8,
                              block_size=16, kv_gib=4.0, max_num_seqs=64, max_batched_tokens=8192,
                              eager=False)
    b = Bench(args, make_model_dir(a.shape, a.prompt_len + 256), plugin=True)
    b.run(a.spec, 4, output_len=24)
    eng = b.llm.llm_engine
    for i, pr in enumerate(b.prompts(a.requests, 3)):
        eng.add_request(f"p{i}", {"prompt_token_ids": pr}, b._params(a.spec, a.steps + 8))
    for _ in range(6):  # prefill + first decode steps
        eng.step()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(a.steps):
        eng.step()
    prof.disable()
    dt = time.perf_counter() - t0
    print(f"PROFILE {a.steps} decode steps, {a.requests} requests: {1e3 * dt / a.steps:.2f} ms/step")
    for key in ("tottime", "cumulative"):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(key).print_stats(35)
        print(s.getvalue())
    while eng.has_unfinished_requests():
        eng.step()


if __name__ == "__main__":
    main()
