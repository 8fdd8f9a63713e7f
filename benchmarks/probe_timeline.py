"""When each program of the CUDA twin (csrc/quant_decode.cu) passes its phases, in one
decode call over quantized pages (64 x 8192 tokens, llama3-8b's attention shape): start,
scan done, first page landed, last page done, partial stored, end (after the merge of
the row's last program). The twin is built with TIMELINE (a %globaltimer per phase into a
module global, read back after the call); the shipped build records nothing.

Why: a page costs ~2.07 us per program and ~15 us of the call is "fixed" (docs/kernels.md,
"Where the twin's time goes"); this shows whether that is the start (scan, first page),
the tail (uneven ends, the merge) or the steady state, and the pages' bandwidth while
every program is in its page loop.

    python benchmarks/probe_timeline.py [--bits 4] [--sweep "-1,0,0;0,0,0;-1,0,1"] [--json out.json]

--sweep: programs per SM (-1: the bandwidth rule, 0: all that fit), CUDA_CHAINS, CUDA_PIPE[, CUDA_STEAL[, CUDA_EARLY]].
--raw keeps every program's row in the json.
(A value list that starts with "-" needs "--sweep=...".)
"""
from __future__ import annotations

import argparse
import ctypes
import json
import sys

import torch


def timeline(launcher, n: int, call) -> list[list[int]]:
    """The rows the twin records in one call (the module global zeroed before it)."""
    lib = ctypes.CDLL("libcuda.so.1")
    ptr, size = ctypes.c_uint64(0), ctypes.c_size_t(0)
    err = lib.cuModuleGetGlobal_v2(ctypes.byref(ptr), ctypes.byref(size), launcher.module, b"kvc_tl")
    assert err == 0, f"cuModuleGetGlobal: CUresult {err}"
    torch.cuda.synchronize()
    assert lib.cuMemsetD8_v2(ptr, 0, size) == 0
    call()
    torch.cuda.synchronize()
    w = size.value // (8 * n)  # values a program
    buf = (ctypes.c_uint64 * (n * w))()
    assert lib.cuMemcpyDtoH_v2(buf, ptr, ctypes.c_size_t(n * w * 8)) == 0
    return [list(buf[i * w:(i + 1) * w]) for i in range(n)]


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def summarize(rows, page_bytes: int, pairs: int) -> dict:
    qsplits = max(1, sum(1 for r in rows if r[0]) // pairs)
    rows = [r + [r[11]] for r in rows if r[0]]  # [-1]: the program's split
    t0 = min(r[0] for r in rows)
    us = lambda x: (x - t0) / 1e3  # noqa: E731
    out = {"programs": len(rows), "sms": len({r[6] for r in rows})}
    for k, name in enumerate(("start", "scanned", "first_page", "loop_end", "stored", "end")):
        xs = [us(r[k]) for r in rows if r[k]]
        out[name] = {p: round(pct(xs, p), 2) for p in (0, 10, 50, 90, 100)}
    rows = [r for r in rows if r[7]]  # below: programs that read pages
    loop = [(r[3] - r[2]) / 1e3 for r in rows]
    pages = [r[7] for r in rows]
    out["loop_us"] = {p: round(pct(loop, p), 2) for p in (0, 50, 100)}
    out["us_per_page"] = round(sum(loop) / max(1, sum(pages)), 3)
    cyc = [(r[9] - r[8]) / max(1, r[7]) for r in rows if r[7]]
    out["cycles_per_page"] = {p: round(pct(cyc, p)) for p in (0, 50, 100)}
    # the window in which every program is in its page loop; bytes read in it, each
    # program's pages spread evenly over its loop
    a, b = max(r[2] for r in rows), min(r[3] for r in rows)
    if b > a:
        got = sum(r[7] * page_bytes * (b - a) / (r[3] - r[2]) for r in rows if r[3] > r[2])
        out["all_in_loop_us"] = round((b - a) / 1e3, 2)
        out["all_in_loop_TBps"] = round(got / (b - a) / 1e3, 3)
    # programs per SM, and the SMs' ends
    per_sm = {}
    for r in rows:
        per_sm.setdefault(r[6], []).append(r)
    counts = sorted(len(v) for v in per_sm.values())
    out["programs_per_sm"] = {"min": counts[0], "max": counts[-1]}
    ends = [us(max(r[5] for r in v)) for v in per_sm.values()]
    out["sm_end"] = {p: round(pct(ends, p), 2) for p in (0, 50, 100)}
    # who ends first: loop ends by split, and by age on the SM sub-partition (warp slot % 4;
    # rank 0 started first there; on the H200 it mostly ends first, docs/kernels.md)
    out["loop_end_by_split"] = {s: {p: round(pct([us(r[3]) for r in rows if r[-1] == s], p), 2) for p in (0, 50, 100)}
                                for s in range(qsplits)}
    out["pages_by_split"] = {s: round(sum(r[7] for r in rows if r[-1] == s) / max(1, sum(r[-1] == s for r in rows)), 1)
                             for s in range(qsplits)}
    ranks = {}
    for v in per_sm.values():
        for sub in range(4):
            ws = sorted((r for r in v if r[10] % 4 == sub), key=lambda r: r[0])
            for k, r in enumerate(ws):
                ranks.setdefault(k, []).append(r)
    out["loop_end_by_age"] = {k: {"n": len(v), "split0_share": round(sum(r[-1] == 0 for r in v) / len(v), 2),
                                  **{p: round(pct([us(r[3]) for r in v], p), 2) for p in (0, 50, 100)}}
                              for k, v in sorted(ranks.items())}
    last = max(rows, key=lambda r: r[5])  # the call's last program: its loop's end, partial, merge
    out["last_program"] = {k: round(us(last[i]), 2) for i, k in ((3, "loop_end"), (4, "stored"), (12, "counted"),
                                                                  (13, "visible"), (14, "ml_loaded"), (15, "summed"),
                                                                  (5, "end")) if last[i]}
    # the merge's phases (us), over the programs that merged (a row's last; marks 14-15 are
    # in the merge's usual path, up to 32 partials a row)
    mg = [r for r in rows if r[13] and r[15]]
    out["merge_phases"] = {name: {p: round(pct([(r[b] - r[a]) / 1e3 for r in mg], p), 2) for p in (50, 100)}
                           for name, a, b in (("count", 4, 12), ("visible", 12, 13), ("ml", 13, 14),
                                              ("outputs", 14, 15), ("write", 15, 5))} if mg else None
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", default="4")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--sweep", default="-1,0,0,0")
    ap.add_argument("--json", default=None)
    ap.add_argument("--raw", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, "benchmarks")
    from bench_kernels import Decode  # noqa: E402
    from probe_packed import randomize_scales  # noqa: E402

    from vllm_kvcomp.ops import quant
    from vllm_kvcomp.triton_kernels import quant_decode as qd

    res = {"device": torch.cuda.get_device_name()}
    print(f"torch {torch.__version__}, {res['device']}", flush=True)
    n = 1 << 16
    knobs = ("CUDA_PER_SM", "CUDA_CHAINS", "CUDA_PIPE", "CUDA_TIMELINE", "CUDA_STEAL", "CUDA_EARLY", "CUDA_MINB")
    shipped = {k: getattr(qd, k) for k in knobs}
    for bits in map(int, args.bits.split(",")):
        c = Decode(args.batch, args.ctx, bits=bits)
        randomize_scales(c, bits)
        P = quant.page_bytes(c.bs, c.d, 2)
        for item in filter(None, args.sweep.split(";")):
            per, chains, pipe, steal, early = (list(map(int, item.split(","))) + [0, 0])[:5]
            qd.CUDA_PER_SM, qd.CUDA_CHAINS, qd.CUDA_PIPE, qd.CUDA_TIMELINE = (None if per < 0 else per), chains, pipe, n
            qd.CUDA_STEAL, qd.CUDA_EARLY = steal, early
            if pipe:
                qd.CUDA_MINB = 8
            launcher = qd._cuda_for(c.q, c.d, c.bs, (bits,))
            for _ in range(5):  # warm
                c.run(page_bits=(bits,))
            rows = timeline(launcher, n, lambda: c.run(page_bits=(bits,)))
            s = summarize(rows, P, c.B * c.hkv)
            name = f"int{bits} per_sm {per} chains {chains} pipe {pipe} steal {steal} early {early}"
            print(name, json.dumps(s), flush=True)
            if args.raw:
                s["raw"] = [r for r in rows if r[0]]
            res[name] = s
            for k, v in shipped.items():  # back to the shipped build between configurations
                setattr(qd, k, v)
        del c
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
