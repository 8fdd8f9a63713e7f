"""Capacity: vanilla vLLM vs vllm-kvcomp in one run, same KV pool, long-prompt workload.

Prints, per spec: KV blocks one request holds after prefill (read from vLLM's block
pool), maximum concurrently running requests (scheduler stats), output tok/s, median
TTFT -- and each as a ratio to vanilla. ``--markdown FILE`` writes the table.

    python benchmarks/capacity.py                      # tiny random Llama, CPU
    python benchmarks/capacity.py --model DIR --specs h2o:0.25 snapkv:0.125
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import statistics
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # pool readable in-process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def prompt(n: int, seed: int) -> list[int]:
    return [5 + (i * 7919 + seed * 104729) % 900 for i in range(n)]


def run(model: str, spec: str | None, a) -> dict:
    from vllm import LLM, SamplingParams

    kw = {"additional_config": {"kv_compression": spec}} if spec else {}
    llm = LLM(model=model, dtype=a.dtype, max_model_len=a.prompt + a.decode + 64, block_size=a.block_size,
              enforce_eager=True, seed=0, disable_log_stats=False, num_gpu_blocks_override=a.blocks,
              max_num_seqs=256, max_num_batched_tokens=a.batch_tokens, **kw)
    eng = llm.llm_engine
    sched = eng.engine_core.engine_core.scheduler
    pool = sched.kv_cache_manager.block_pool
    params = SamplingParams(max_tokens=a.decode, temperature=0, ignore_eos=True)
    try:
        # 1. One request alone: blocks held right after its prefill, from vLLM's pool.
        free0 = pool.get_num_free_blocks()
        eng.add_request("probe", {"prompt_token_ids": prompt(a.prompt, 999)}, params)
        eng.step()
        eng.step()
        held = free0 - pool.get_num_free_blocks()
        while eng.has_unfinished_requests():
            eng.step()
        # 2. The workload: all requests at once; vLLM admits what fits.
        added, first, most, out_tokens, preempted = {}, {}, 0, 0, set()
        t0 = time.perf_counter()
        for i in range(a.requests):
            eng.add_request(f"r{i}", {"prompt_token_ids": prompt(a.prompt, i)}, params)
            added[f"r{i}"] = time.perf_counter()
        while eng.has_unfinished_requests():
            for out in eng.step():
                if out.request_id not in first and out.outputs[0].token_ids:
                    first[out.request_id] = time.perf_counter()
                if out.finished:
                    out_tokens += len(out.outputs[0].token_ids)
            most = max(most, sched.make_stats().num_running_reqs)
            preempted |= {r for r, q in sched.requests.items() if q.num_preemptions}
        wall = time.perf_counter() - t0
        assert pool.get_num_free_blocks() == free0, "blocks leaked"
        return dict(spec=spec or "vanilla", blocks=held, running=most, tok_s=out_tokens / wall, preempted=len(preempted),
                    ttft=statistics.median(first[r] - added[r] for r in added), wall=wall)
    finally:
        del llm, eng, sched, pool
        gc.collect()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="HF folder (default: a tiny random Llama built on the fly)")
    ap.add_argument("--specs", nargs="+", default=["streaming:0.25", "snapkv:0.25", "h2o:0.25"])
    ap.add_argument("--prompt", type=int, default=2000)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--fit", type=int, default=4, help="vanilla requests the KV pool holds")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--markdown", help="write the table here")
    a = ap.parse_args()
    a.blocks = a.fit * math.ceil((a.prompt + a.decode) / a.block_size) + 2
    model = a.model
    if model is None:
        from vllm_kvcomp.models import build_tiny_llama
        model = build_tiny_llama(os.path.expanduser("~/.cache/vllm_kvcomp/tiny-llama"))
    rows = [run(model, None, a)] + [run(model, s, a) for s in a.specs]
    base = rows[0]
    head = ("| spec | KV blocks / request | x less | max running | x more | output tok/s | x | "
            "median TTFT s | x | preempted requests |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head] + [
        f"| {r['spec']} | {r['blocks']} | {base['blocks'] / r['blocks']:.2f} | {r['running']} | "
        f"{r['running'] / base['running']:.2f} | {r['tok_s']:.0f} | {r['tok_s'] / base['tok_s']:.2f} | "
        f"{r['ttft']:.2f} | {r['ttft'] / base['ttft']:.2f} | {r['preempted']} |" for r in rows]
    setup = (f"model={a.model or 'tiny random Llama (2 layers, 4/2 heads, head 32)'}, prompt={a.prompt}, "
             f"decode={a.decode}, requests={a.requests}, pool={a.blocks} blocks of {a.block_size} "
             f"(fits {a.fit} vanilla requests), machine={platform.machine()} {os.cpu_count()} cores")
    print(setup)
    print("\n".join(lines))
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(f"{setup}\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
