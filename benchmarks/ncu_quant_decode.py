"""One decode call over bf16 pages and one over int4 pages (64 x 8192 tokens, llama3-8b's
attention shape), bracketed by cudaProfilerStart/Stop so that Nsight Compute profiles only
them: where the CUDA twin's time goes (DRAM throughput, warp stalls) next to the bf16 kernel.

    ncu --clock-control none --profile-from-start off --set full -o rep \
        python3 benchmarks/ncu_quant_decode.py [--bits 4]
    ncu --import rep.ncu-rep --page source --csv --print-source sass -k regex:qrun > sass.csv
    python3 benchmarks/ncu_quant_decode.py --summarize sass.csv   # stalls by instruction, loop vs rest
"""
from __future__ import annotations

import argparse
import collections
import csv
import sys

import torch


def summarize(path: str) -> None:
    """Per kernel of an ncu source-page CSV (SASS): warp-stall samples by reason, and in the
    hottest loop (the instructions executed most often) samples and count per opcode."""
    blocks, cur = [], None
    for line in open(path).read().splitlines():
        if line.startswith('"Kernel Name"'):
            cur = []
            blocks.append(cur)
        elif cur is not None:
            cur.append(line)
    for k, lines in enumerate(blocks):
        rows = list(csv.reader(lines))
        hdr, rows = rows[0], rows[1:]
        si, ie = hdr.index("Warp Stall Sampling (All Samples)"), hdr.index("Instructions Executed")
        cols = [i for i, h in enumerate(hdr) if h.startswith("stall_") and "(Not Issued)" not in h]
        num = lambda r, i: int(r[i] or 0) if r[i].strip().lstrip("-").isdigit() else 0  # noqa: E731
        total = sum(num(r, si) for r in rows)
        print(f"kernel {k}: {len(rows)} instructions, {total} samples")
        reasons = collections.Counter()
        for r in rows:
            for i in cols:
                reasons[hdr[i][6:]] += num(r, i)
        print("  stalls: " + ", ".join(f"{n} {v / total:.1%}" for n, v in reasons.most_common(8)))
        top = max(num(r, ie) for r in rows)
        loop = [r for r in rows if num(r, ie) >= top // 2]  # the page loop: executed once per page
        per = max(num(r, ie) for r in loop)
        ops = collections.defaultdict(lambda: [0, 0])
        for r in loop:
            op = r[1].strip().split()
            op = op[1] if op[0].startswith("@") else op[0]
            ops[op][0] += num(r, si)
            ops[op][1] += num(r, ie)
        ls = sum(v[0] for v in ops.values())
        print(f"  loop ({per} executions): {ls / total:.1%} of samples, "
              f"{sum(v[1] for v in ops.values()) / per:.0f} instructions an iteration")
        for op, (smp, ex) in sorted(ops.items(), key=lambda x: -x[1][0])[:12]:
            print(f"    {op:22s} {smp / ls:6.1%} of loop samples, {ex / per:6.1f} an iteration")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--summarize", default=None, help="an ncu source-page CSV: print its summary and exit")
    ap.add_argument("--bits", default="4")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=8192)
    args = ap.parse_args()
    if args.summarize:
        return summarize(args.summarize)
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
