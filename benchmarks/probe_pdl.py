"""Where the time of one decode call over quantized pages goes when it is replayed from a
CUDA graph, with the CUDA twin first and the forward as its programmatic dependent (PDL)
and without: each kernel's start and end within the call (torch.profiler trace).

    python benchmarks/probe_pdl.py [--bits 4] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    sys.path.insert(0, "benchmarks")
    from bench_kernels import Decode, capture  # noqa: E402
    from probe_packed import randomize_scales  # noqa: E402
    from torch.profiler import ProfilerActivity, profile
    from triton.testing import do_bench

    from vllm_kvcomp.triton_kernels import quant_decode as qd

    c = Decode(args.batch, args.ctx, bits=args.bits)
    randomize_scales(c, args.bits)
    res = {}
    for pdl in (True, False):
        qd.PDL = pdl
        g = capture(lambda: c.run(page_bits=(args.bits,)))
        ms = do_bench(g.replay, warmup=50, rep=200, return_mode="median")
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                g.replay()
            torch.cuda.synchronize()
        path = os.path.join(args.out, f"trace_pdl{int(pdl)}.json")
        prof.export_chrome_trace(path)
        ev = [e for e in json.load(open(path))["traceEvents"] if e.get("cat") == "kernel"]
        ev.sort(key=lambda e: e["ts"])
        rows = []
        for e in ev[-6:]:
            rows.append((e["name"][:20], e["ts"] - ev[-6]["ts"], e["dur"]))
        res[f"pdl={pdl}"] = dict(graph_ms=ms, last_kernels=rows)
        print(f"PDL {pdl}: graph {ms:.4f} ms; last kernels (name, start us rel., dur us):", flush=True)
        for r in rows:
            print(f"   {r[0]:22s} {r[1]:9.1f} {r[2]:8.1f}")
    qd.PDL = True
    with open(os.path.join(args.out, "probe_pdl.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
