"""How much faster the CUDA twin would be with fewer instructions per page: a speed-of-light
probe, not a kernel. It times the shipped twin beside builds that leave out part of the
code conversion (so they compute wrong scores: only their time is read), in one run, over
int4 pages (64 x 8192 tokens, llama3-8b's attention shape), from a CUDA graph.

Why: on the H200 the twin's call is set by the SM's issue rate (docs/kernels.md, "Evening
out the ends does not shorten the call"), so fewer instructions per page is the lever left.
A page format whose words hold an fp16 pair's two codes (a Marlin-style conversion: one
lop3 a pair, no prmt) would save ~64 of 871 instructions per int4 page. Each cut below
leaves out a known number of instructions (`sass_census.py`'s count of the cut build: the
prmt, and the lop3 that then repeat), without changing the format first; the time it saves
says what fewer instructions buy.

    python benchmarks/probe_fewer_ops.py [--bits 4] [--json out.json]   # on the GPU
    python benchmarks/probe_fewer_ops.py --census [--bits 4]             # the counts (nvcc, any machine)
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

# (name, [(shipped text, replacement)]): the replacements drop instructions, not loads
KEYS = [
    ("u32 x0 = __byte_perm(k0[w], 0x64646464u, 0x4140);", "u32 x0 = k0[w];"),
    ("u32 x1 = __byte_perm(k0[w], 0x64646464u, 0x4342);", "u32 x1 = k0[w];"),
    ("u32 y0 = __byte_perm(k1[w], 0x64646464u, 0x4140);", "u32 y0 = k1[w];"),
    ("u32 y1 = __byte_perm(k1[w], 0x64646464u, 0x4342);", "u32 y1 = k1[w];"),
]
VALUES = [
    ("u32 a1 = or1024(__byte_perm(va[be >> 2], vb[be >> 2], s1), mk);", "u32 a1 = a0;"),
    ("u32 a3 = or1024(__byte_perm(vc[be >> 2], vd[be >> 2], s1), mk);", "u32 a3 = a2;"),
]
# (Its build "merge: no load under a branch", a correct one, measured 2.90x vs 2.86x and is
# shipped in another form: csrc/quant_decode.cu's add_outputs.)
CUTS = {"keys: no prmt": KEYS, "values: half the conversion": VALUES, "both": KEYS + VALUES}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--json", default=None)
    ap.add_argument("--census", action="store_true", help="print each build's SASS count instead (needs nvcc)")
    args = ap.parse_args()
    sys.path.insert(0, "benchmarks")
    from vllm_kvcomp.triton_kernels import quant_decode as qd

    shipped = qd.cuda_source

    def cut(cuts):  # cuda_source with these replacements
        def source(*a, **k):
            src = shipped(*a, **k)
            for old, new in cuts:
                assert src.count(old) == 1, old
                src = src.replace(old, new)
            return src
        return source

    builds = [("shipped", [])] + list(CUTS.items())
    if args.census:
        from sass_census import census, compile_cuda  # noqa: E402

        for name, cuts in builds:
            qd.cuda_source = cut(cuts)
            regs, stack, _, ops = census(compile_cuda(args.bits))
            print(f"{name}: {regs} registers, {stack} B stack, {sum(ops.values())} instructions a page")
        qd.cuda_source = shipped
        return
    from bench_kernels import Decode, ms_graph  # noqa: E402

    res = {"device": torch.cuda.get_device_name()}
    base = Decode(64, 8192)
    res["bf16_graph_ms"] = g_bf16 = ms_graph(lambda: base.run())
    del base
    c = Decode(64, 8192, bits=args.bits)
    run = lambda: c.run(page_bits=(args.bits,))  # noqa: E731
    for name, cuts in builds:
        qd.cuda_source = cut(cuts)
        qd._cuda_kernel.cache_clear()
        ms = [ms_graph(run) for _ in range(3)]
        res[name] = dict(graph_ms=ms, vs_bf16=[g_bf16 / m for m in ms])
        print(f"{name}: graph {' '.join(f'{m:.4f}' for m in ms)} ms, "
              f"{' '.join(f'{g_bf16 / m:.2f}x' for m in ms)} of bf16 ({g_bf16:.4f})", flush=True)
    qd.cuda_source = shipped
    qd._cuda_kernel.cache_clear()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
