#!/usr/bin/env python3
"""End to end on one GPU: vanilla vLLM (TRITON_ATTN) vs the plugin at several budgets,
same model, same KV-cache memory, same KV-bound workload, all in one run.

    python benchmarks/gpu_e2e.py --out results/gpu            # full comparison
    python benchmarks/gpu_e2e.py --smoke --out results/smoke  # small, with checks

Two engines are built, one after the other: vanilla (TRITON_ATTN), then the plugin with a
keep-all server spec (``streaming:1.0``; ``--server-spec mikv:1.0`` for quantized pages) whose requests carry each configuration as a
per-request override (``vllm_xargs`` / ``extra_args``) -- so the plugin's model is compiled
and graph-captured once for every policy and budget. Engines run in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0) so vLLM's own scheduler and block pool are read
directly each step: running requests, KV blocks in use.

Per configuration: a throughput run (all requests submitted at once; output tok/s,
requests/s, TTFT/TPOT median and p99, max running, KV tokens held per running request),
and a light-load TTFT probe (single requests, one at a time). Results go to
``OUT/results.jsonl`` as each configuration finishes (a run that is cut off keeps what it
measured) and a summary table to stdout.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_KVCOMP_TIMING", "1")

SHAPES = {
    # Llama-3.2-1B: 16 layers, 32 q / 8 kv heads, head dim 64
    "llama3-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    # Llama-3-8B: 32 layers, 32 q / 8 kv heads, head dim 128
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=4, vocab_size=32000),
}


def make_model_dir(shape: str, max_len: int) -> str:
    from transformers import LlamaConfig

    path = tempfile.mkdtemp(prefix=f"{shape}-")
    LlamaConfig(architectures=["LlamaForCausalLM"], max_position_embeddings=max_len,
                rope_theta=500000.0, torch_dtype="bfloat16", **SHAPES[shape]).save_pretrained(path)
    return path  # config only: weights come from load_format="dummy"


def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


class Bench:
    def __init__(self, args, model_dir: str, plugin: bool, eager: bool | None = None):
        from vllm import LLM

        self.args = args
        eager = args.eager if eager is None else eager
        kw = dict(
            model=model_dir, load_format="dummy", dtype="bfloat16", seed=0,
            max_model_len=args.prompt_len + args.output_len + 64,
            block_size=args.block_size, kv_cache_memory_bytes=int(args.kv_gib * 2**30),
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_batched_tokens,
            enable_prefix_caching=False, skip_tokenizer_init=True, disable_log_stats=False,
            enforce_eager=eager,
            # No compiled vLLM kernels on the lent GPU (../shared/gpu-vllm/README.md).
            attention_config={"backend": "TRITON_ATTN"},
            compilation_config={"custom_ops": ["none"],
                                "max_cudagraph_capture_size": args.max_num_seqs},
            kernel_config={"ir_op_priority": {"rms_norm": ["native"], "fused_add_rms_norm": ["native"]}},
        )
        if plugin:
            kw["additional_config"] = {"kv_compression": args.server_spec}
        if eager and not args.eager:
            # The graph engine before it may leave compile/graph memory behind (13 GiB seen);
            # KV memory is fixed by kv_cache_memory_bytes, so only the start-up check moves.
            kw["gpu_memory_utilization"] = 0.6
        t0 = time.perf_counter()
        self.llm = LLM(**kw)
        self.init_s = time.perf_counter() - t0
        core = self.llm.llm_engine.engine_core.engine_core
        self.sched = core.scheduler
        self.pool = self.sched.kv_cache_manager.block_pool
        self.total_blocks = self.pool.num_gpu_blocks - 1  # less the null block
        self.backend = self._backend_name(core)
        try:  # what vLLM resolved (FULL_AND_PIECEWISE: decode steps in full graphs)
            runner = core.model_executor.driver_worker.worker.model_runner
            self.graph_mode = str(runner.compilation_config.cudagraph_mode).split(".")[-1]
        except Exception:  # noqa: BLE001
            self.graph_mode = "?"

    @staticmethod
    def _backend_name(core) -> str:
        try:
            runner = core.model_executor.driver_worker.worker.model_runner
            layer = next(iter(runner.compilation_config.static_forward_context.values()))
            return layer.attn_backend.__name__
        except Exception:  # noqa: BLE001
            return "?"

    def close(self):
        del self.sched, self.pool, self.llm
        gc.collect()
        import torch
        torch.cuda.empty_cache()

    def _params(self, spec: str | None, max_tokens: int):
        from vllm import SamplingParams

        extra = {"kv_compression": spec} if spec else None
        return SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0,
                              detokenize=False, extra_args=extra)

    def prompts(self, n: int, seed: int):
        import random
        rng = random.Random(seed)
        v = SHAPES[self.args.shape]["vocab_size"]
        return [[rng.randrange(100, v - 100) for _ in range(self.args.prompt_len)] for _ in range(n)]

    def run(self, spec: str | None, n: int, seed: int = 1, output_len: int | None = None) -> dict:
        """All ``n`` requests at once; step the engine ourselves, reading vLLM's state."""
        import torch

        eng, params = self.llm.llm_engine, self._params(spec, output_len or self.args.output_len)
        prompts = self.prompts(n, seed)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            eng.add_request(f"r{i}", {"prompt_token_ids": p}, params)
        first, last, ntok = {}, {}, {}
        max_running, held, steps = 0, [], 0
        from vllm_kvcomp import backend as kb
        kb.reset_timers()
        while eng.has_unfinished_requests():
            outs = eng.step()
            now = time.perf_counter()
            steps += 1
            for o in outs:
                k = len(o.outputs[0].token_ids)
                if k and o.request_id not in first:
                    first[o.request_id] = now
                if k:
                    last[o.request_id], ntok[o.request_id] = now, k
            running = len(self.sched.running)
            max_running = max(max_running, running)
            if running:
                used = self.total_blocks - self.pool.get_num_free_blocks()
                held.append(used * self.args.block_size / running)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        n_out = sum(ntok.values())
        ttft = [first[r] - t0 for r in first]
        tpot = [(last[r] - first[r]) / (ntok[r] - 1) for r in first if ntok[r] > 1]
        timers = kb.read_timers()
        return dict(
            elapsed_s=round(dt, 3), output_tokens=n_out, steps=steps,
            output_tok_s=round(n_out / dt, 1), requests_s=round(n / dt, 3),
            ttft_med_s=round(pct(ttft, 50), 3), ttft_p99_s=round(pct(ttft, 99), 3),
            tpot_med_ms=round(1e3 * pct(tpot, 50), 2), tpot_p99_ms=round(1e3 * pct(tpot, 99), 2),
            max_running=max_running,
            kv_tokens_per_req_med=round(statistics.median(held)) if held else None,
            compress_ms=round(timers["compress_ms"], 1),
            compress_share=round(timers["compress_ms"] / 1e3 / dt, 5),
        )

    def ttft_probe(self, spec: str | None, k: int = 3) -> float:
        """Single requests, one at a time (no queueing): time to the first token."""
        eng, params = self.llm.llm_engine, self._params(spec, 2)
        ts = []
        for i, p in enumerate(self.prompts(k, seed=99)):
            t0 = time.perf_counter()
            eng.add_request(f"probe{i}", {"prompt_token_ids": p}, params)
            done = False
            while not done:
                for o in eng.step():
                    if o.outputs[0].token_ids and not done:
                        ts.append(time.perf_counter() - t0)
                        done = True
            while eng.has_unfinished_requests():
                eng.step()
        return round(statistics.median(ts), 4)

    def greedy(self, spec: str | None, prompts, n_tokens: int):
        from vllm import SamplingParams
        params = SamplingParams(max_tokens=n_tokens, ignore_eos=True, temperature=0.0,
                                detokenize=False, logprobs=0,
                                extra_args={"kv_compression": spec} if spec else None)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3-1b", choices=sorted(SHAPES))
    p.add_argument("--prompt-len", type=int, default=8192)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--kv-gib", type=float, default=2.0, help="KV-cache memory, both engines")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-batched-tokens", type=int, default=8192)
    p.add_argument("--policies", default="streaming,snapkv,h2o")
    p.add_argument("--budgets", default="0.5,0.25,0.125,0.0625")
    p.add_argument("--extra-specs", default="", help="more configurations, separated by ; "
                                                     "(e.g. 'h2o:0.25,slack=4')")
    p.add_argument("--eager", action="store_true", help="enforce_eager (default: torch.compile + CUDA graphs)")
    p.add_argument("--smoke", action="store_true", help="small shapes + correctness checks")
    p.add_argument("--skip-vanilla", action="store_true")
    p.add_argument("--skip-keep-all", action="store_true", help="no keep-all plugin row (compare with an "
                                                               "earlier run's on the same workload)")
    p.add_argument("--check-eager", default="",
                   help="specs separated by ;: after the run, an eager plugin engine decodes the same "
                        "prompts greedily and must match the CUDA-graph engine's tokens")
    p.add_argument("--server-spec", default="streaming:1.0",
                   help="the plugin engine's keep-all server spec; mikv:1.0 sets up quantized pages "
                        "(needed for mikv configurations; evicting ones then run with page tags too)")
    p.add_argument("--out", default="results/gpu")
    args = p.parse_args(argv)
    if args.smoke:
        args.shape, args.prompt_len, args.output_len, args.num_requests = "tiny", 1024, 64, 16
        args.kv_gib, args.budgets = 0.25, "0.25"
    os.makedirs(args.out, exist_ok=True)
    out_path = os.path.join(args.out, "results.jsonl")

    import torch
    import triton
    import vllm

    env = dict(gpu=torch.cuda.get_device_name(0), vllm=vllm.__version__, torch=torch.__version__,
               triton=triton.__version__, mode="eager" if args.eager else "torch.compile+cudagraphs",
               **{k: getattr(args, k) for k in ("shape", "prompt_len", "output_len", "num_requests",
                                                 "kv_gib", "block_size", "max_num_seqs", "server_spec")})
    print("ENV", json.dumps(env), flush=True)
    model_dir = make_model_dir(args.shape, args.prompt_len + args.output_len + 64)

    def emit(rec):
        rec = {**env, **rec}
        print("RESULT", json.dumps(rec), flush=True)
        with open(out_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    checks = {}
    probe_prompts = None
    if not args.skip_vanilla:
        b = Bench(args, model_dir, plugin=False)
        print(f"vanilla: backend {b.backend}, {b.total_blocks} blocks, init {b.init_s:.0f} s", flush=True)
        b.run(None, min(4, args.num_requests), output_len=32)  # warm-up (JIT, allocator)
        probe_prompts = b.prompts(4, seed=7)
        checks["vanilla_greedy"] = b.greedy(None, probe_prompts, 16)
        emit(dict(engine="vanilla", backend=b.backend, spec="none", blocks=b.total_blocks,
                  init_s=round(b.init_s, 1), ttft_light_s=b.ttft_probe(None), **b.run(None, args.num_requests)))
        b.close()
        del b
        gc.collect()

    b = Bench(args, model_dir, plugin=True)
    print(f"plugin: backend {b.backend}, {b.total_blocks} blocks, init {b.init_s:.0f} s, "
          f"cudagraph mode {b.graph_mode}", flush=True)
    b.run(None, min(4, args.num_requests), output_len=32)
    ours = b.greedy(None, probe_prompts or b.prompts(4, seed=7), 16)
    if "vanilla_greedy" in checks:
        same = sum(a == c for a, c in zip(ours, checks["vanilla_greedy"]))
        first = sum(a[:4] == c[:4] for a, c in zip(ours, checks["vanilla_greedy"]))
        print(f"CHECK budget 1.0 vs vanilla: {same}/4 identical greedy, {first}/4 same first 4 tokens",
              flush=True)
    configs = ([] if args.skip_keep_all else [None]) + [f"{pol}:{bud}" for pol in args.policies.split(",") if pol
                        for bud in args.budgets.split(",")]
    configs += [c for c in args.extra_specs.split(";") if c]
    for spec in configs:
        try:
            # Warm-up: every Triton specialisation this policy uses (prefill, compaction,
            # statistics, decode, decode folds: 160 tokens cover slack <= 8 at 16-token
            # blocks) compiles here, not inside the measured run.
            b.run(spec, min(4, args.num_requests), seed=5, output_len=min(160, args.output_len))
            rec = b.run(spec, args.num_requests)
            rec["ttft_light_s"] = b.ttft_probe(spec)
            emit(dict(engine="plugin", backend=b.backend, spec=spec or f"{args.server_spec} (keep all)",
                      blocks=b.total_blocks, init_s=round(b.init_s, 1), graph_mode=b.graph_mode, **rec))
        except Exception as e:  # noqa: BLE001 -- keep measuring the other configurations
            import traceback
            traceback.print_exc()
            emit(dict(engine="plugin", spec=spec, error=repr(e)[:500]))
            break
        free = b.pool.get_num_free_blocks()
        if free != b.total_blocks:
            print(f"LEAK after {spec}: {b.total_blocks - free} blocks still in use", flush=True)
    checked = [c for c in args.check_eager.split(";") if c]
    if checked and not args.eager:
        # Same prompts, same specs: CUDA graphs (decode replayed from FULL graphs, compaction
        # after the forward) vs eager must produce the same greedy tokens.
        cprompts = b.prompts(4, seed=11)
        graphs = {c: b.greedy(c, cprompts, 48) for c in checked}
        b.close()
        del b
        gc.collect()
        b = Bench(args, model_dir, plugin=True, eager=True)
        for c in checked:
            eager_out = b.greedy(c, cprompts, 48)
            same = sum(x == y for x, y in zip(graphs[c], eager_out))
            n48 = sum(len(x) == 48 for x in graphs[c])
            print(f"CHECK graphs vs eager {c}: {same}/4 identical greedy (48 tokens, {n48}/4 complete)",
                  flush=True)
            emit(dict(engine="check", spec=c, graphs_vs_eager_identical=same, of=4))
    b.close()
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
