"""Decode over quantized pages: quant_decode's CUDA twin (csrc/quant_decode.cu) against
its Triton kernel and against bf16 pages, at 64 requests x 8192 tokens (llama3-8b's
attention shape: 8 KV heads x 4 query heads, head dim 128, blocks of 16), through
paged_attention_batched as the backend calls it. Prints, per format and kernel: median
time (triton.testing.do_bench), the ratio to bf16 pages, the error against an fp32
reference on 2 requests, and each kernel's device time (torch.profiler); then a sweep of
the CUDA kernel's pipeline depth and programs per SM. GPU only.

    python benchmarks/quant_decode_cuda.py [--json out.json] [--sweep "2,0,12;3,0,12;2,8,12"]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--bits", default="4,2,8")
    ap.add_argument("--sweep", default="",
                    help="CUDA stages,programs per SM (0: all that fit, -1: the bandwidth rule),launch-bounds min "
                         "blocks[,smem carveout % (-1: the driver's)[,CUDA_CHAINS[,CUDA_PIPE[,CUDA_STEAL"
                         "[,CUDA_EARLY[,CUDA_ZQUAD]]]]]];...")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=8192)
    args = ap.parse_args()
    sys.path.insert(0, "benchmarks")
    from bench_kernels import Decode, kernel_ms, ms_graph  # noqa: E402
    from int4_variants import reference_planes  # noqa: E402
    from probe_packed import randomize_scales  # noqa: E402
    from triton.testing import do_bench

    from vllm_kvcomp.ops import quant
    from vllm_kvcomp.triton_kernels import quant_decode as qd

    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, "
          f"NVRTC compile: {hasattr(torch.cuda, '_compile_kernel')}", flush=True)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "peak_bandwidth": qd.peak_bandwidth(torch.cuda.current_device())}
    print(f"peak memory bandwidth (driver) {res['peak_bandwidth'] / 1e12:.2f} TB/s", flush=True)
    bench = lambda f: do_bench(f, warmup=30, rep=200, return_mode="median")  # noqa: E731
    base = Decode(args.batch, args.ctx)
    t_bf16 = bench(lambda: base.run())
    g_bf16 = ms_graph(lambda: base.run())
    res["bf16_ms"], res["bf16_graph_ms"] = t_bf16, g_bf16
    print(f"bf16 pages {t_bf16:.4f} ms, from a CUDA graph {g_bf16:.4f} ms", flush=True)
    del base
    shipped = (qd.CUDA, qd.CUDA_STAGES, qd.CUDA_PER_SM, qd.CUDA_MINB, qd.CUDA_CARVEOUT, qd.CUDA_CHAINS, qd.CUDA_PIPE,
               qd.CUDA_STEAL, qd.CUDA_EARLY, qd.CUDA_ZQUAD)
    shipped_pdl = qd.PDL  # "cuda-nopdl": the forward first, then the twin (the order before Hopper)
    for bits in map(int, args.bits.split(",")):
        c = Decode(args.batch, args.ctx, bits=bits)
        randomize_scales(c, bits)
        ref = reference_planes(c, 2, bits)
        run = lambda: c.run(page_bits=(bits,))  # noqa: E731
        caps = {b: quant.page_capacity(b, c.bs, c.d, 2) for b in (8, 4, 2)}
        kind, splits = qd.plan(c.q, D=c.d, BS=c.bs, G=c.g, rows=c.B * c.hkv, longest=c.max_seq, caps=caps,
                               page_bits=(bits,), num_sms=torch.cuda.get_device_properties(0).multi_processor_count)
        res[f"int{bits} plan"] = [kind, splits]
        print(f"int{bits}: plan {kind}, {splits} split(s)", flush=True)
        for kind, on, pdl in (("cuda", True, True), ("cuda-nopdl", True, False), ("triton", False, True)):
            qd.CUDA, qd.PDL = on, pdl
            chosen = "cuda" if qd.cuda_supported(c.q, c.d, c.bs, c.g, (bits,)) else "triton"
            c.out.fill_(float("nan"))
            run()
            torch.cuda.synchronize()
            err = ((c.out[:2].float() - ref).norm() / ref.norm()).item()
            nan = bool(c.out.isnan().any())
            t = bench(run)
            tg = ms_graph(run)
            kt = kernel_ms(run)
            res[f"int{bits} {kind}"] = dict(ms=t, vs_bf16=t_bf16 / t, graph_ms=tg, graph_vs_bf16=g_bf16 / tg, err=err,
                                            nan=nan, ran=chosen, kernels=kt)
            print(f"int{bits} {kind:6s} (ran {chosen}) {t:.4f} ms  {t_bf16 / t:.2f}x of bf16; graph {tg:.4f} ms "
                  f"{g_bf16 / tg:.2f}x  err {err:.2e}"
                  f"{'  NaN!' if nan else ''}  " + " ".join(f"{k.split('(')[0]}={v:.4f}" for k, v in kt.items()),
                  flush=True)
        qd.CUDA, qd.PDL = True, shipped_pdl
        for item in filter(None, args.sweep.split(";")):
            fields = list(map(int, item.split(",")))
            st, per, minb, carve, chains, pipe, steal, early, zquad = fields + [-1, *shipped[5:]][len(fields) - 3:]
            qd.CUDA_STAGES, qd.CUDA_PER_SM, qd.CUDA_MINB, qd.CUDA_CARVEOUT = st, None if per < 0 else per, minb, carve
            qd.CUDA_CHAINS, qd.CUDA_PIPE, qd.CUDA_STEAL, qd.CUDA_EARLY, qd.CUDA_ZQUAD = chains, pipe, steal, early, zquad
            name = (f"int{bits} cuda stages {st} per_sm {per:2d} minb {minb:2d}" + (f" carveout {carve}" * (carve >= 0))
                    + f" chains {chains}" + f" pipe {pipe}" * bool(pipe) + f" steal {steal}" * bool(steal)
                    + " early" * bool(early) + " zquad" * bool(zquad))
            try:
                run()
                torch.cuda.synchronize()
                err = ((c.out[:2].float() - ref).norm() / ref.norm()).item()
                t = bench(run)
                tg = ms_graph(run)
                kt = kernel_ms(run)
            except Exception as ex:  # noqa: BLE001
                print(f"{name} FAILED {type(ex).__name__}: {str(ex)[:400]}")
                continue
            occ = qd._cuda_for(c.q, c.d, c.bs, (bits,)).per_sm  # programs an SM holds (occupancy API)
            res[name] = dict(ms=t, vs_bf16=t_bf16 / t, graph_ms=tg, graph_vs_bf16=g_bf16 / tg, err=err, kernels=kt,
                             occupancy=occ)
            print(f"{name}: {t:.4f} ms  {t_bf16 / t:.2f}x of bf16; graph {tg:.4f} ms {g_bf16 / tg:.2f}x  "
                  f"err {err:.2e}  occupancy {occ}  "
                  + " ".join(f"{k.split('(')[0]}={v:.4f}" for k, v in kt.items()), flush=True)
        (qd.CUDA, qd.CUDA_STAGES, qd.CUDA_PER_SM, qd.CUDA_MINB, qd.CUDA_CARVEOUT, qd.CUDA_CHAINS, qd.CUDA_PIPE,
         qd.CUDA_STEAL, qd.CUDA_EARLY, qd.CUDA_ZQUAD) = shipped
        del c
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
