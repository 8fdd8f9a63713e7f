"""A/B of CUDA twin sources (csrc/quant_decode.cu files), in one run: each build is timed
from a CUDA graph, round after round, over quantized pages at 64 x 8192 tokens (llama3-8b's
attention shape), beside bf16 pages; its error against the format's fp32 reference
(int4_variants.reference_planes) says whether it reads the pages of this tree's format. GPU only.

Why: a change of the twin's source (not a knob) is measured against the file before it on
the same machine, alternating, so machine-to-machine spread (bf16 pages took 0.488-0.514 ms
on the H200s lent) does not enter the ratio.

    git show HEAD:csrc/quant_decode.cu > /tmp/head.cu
    python benchmarks/ab_sources.py head=/tmp/head.cu new=csrc/quant_decode.cu [--bits 4,2] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("builds", nargs="+", help="name=path.cu")
    ap.add_argument("--bits", default="4,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    sys.path.insert(0, "benchmarks")
    from bench_kernels import Decode, ms_graph  # noqa: E402
    from int4_variants import reference_planes  # noqa: E402
    from probe_packed import randomize_scales  # noqa: E402

    from vllm_kvcomp.triton_kernels import quant_decode as qd

    builds = [b.split("=", 1) for b in a.builds]
    shipped = qd._CU
    res = {"device": torch.cuda.get_device_name()}
    base = Decode(64, 8192)
    res["bf16_graph_ms"] = g_bf16 = ms_graph(lambda: base.run())
    print(f"{res['device']} bf16 graph {g_bf16:.4f} ms", flush=True)
    del base
    for bits in map(int, a.bits.split(",")):
        c = Decode(64, 8192, bits=bits)
        randomize_scales(c, bits)
        ref = reference_planes(c, 2, bits)
        run = lambda: c.run(page_bits=(bits,))  # noqa: E731
        for r in range(a.rounds):
            for name, path in builds:
                qd._CU = Path(path).resolve()
                qd._cuda_kernel.cache_clear()
                assert qd.cuda_supported(c.q, c.d, c.bs, c.g, (bits,)), f"{name} did not build"
                c.out.fill_(float("nan"))
                run()
                torch.cuda.synchronize()
                err = ((c.out[:2].float() - ref).norm() / ref.norm()).item()
                t = ms_graph(run)
                res.setdefault(f"int{bits} {name}", []).append(dict(graph_ms=t, x=g_bf16 / t, err=err))
                print(f"int{bits} {name:10s} round {r}: graph {t:.4f} ms {g_bf16 / t:.3f}x err {err:.2e}", flush=True)
        del c
    qd._CU = shipped
    qd._cuda_kernel.cache_clear()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
