"""One decode call over bf16 pages and one over int4 pages (64 x 8192 tokens, llama3-8b's
attention shape), bracketed by cudaProfilerStart/Stop so that Nsight Compute profiles only
them: where the CUDA twin's time goes (DRAM throughput, warp stalls) next to the bf16 kernel.

    ncu --clock-control none --profile-from-start off --set full -o rep \
        python3 benchmarks/ncu_quant_decode.py [--bits 4]
"""
from __future__ import annotations

import argparse
import sys

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", default="4")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=8192)
    args = ap.parse_args()
    sys.path.insert(0, "benchmarks")
    from bench_kernels import Decode  # noqa: E402
    from probe_packed import randomize_scales  # noqa: E402

    calls = [("bf16", Decode(args.batch, args.ctx), lambda d: d.run())]
    for bits in map(int, args.bits.split(",")):
        c = Decode(args.batch, args.ctx, bits=bits)
        randomize_scales(c, bits)
        calls.append((f"int{bits}", c, lambda d, b=bits: d.run(page_bits=(b,))))
    for _, d, f in calls:  # compile and warm up outside the profiled range
        for _ in range(3):
            f(d)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for name, d, f in calls:
        torch.cuda.nvtx.range_push(name)
        f(d)
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print("profiled:", ", ".join(n for n, _, _ in calls))


if __name__ == "__main__":
    main()
