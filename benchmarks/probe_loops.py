#!/usr/bin/env python3
"""A/B of the forward kernel's key loop (paged_attention._attend_positions): one masked
loop vs TWO_LOOPS (whole tiles below the diagonal unmasked, then the masked rest), for
decode and prefill, in one run beside SDPA flash on the same tokens. docs/kernels.md
has the results and the command.

    python3 benchmarks/probe_loops.py --json loops.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kernels as bk  # noqa: E402
from vllm_kvcomp.triton_kernels.paged_attention import paged_attention_batched  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="")
    ap.add_argument("--stages", default="2,3", help="prefill pipeline depths to try")
    args = ap.parse_args()
    print("device:", torch.cuda.get_device_name(), flush=True)
    copy_bw = bk.bench_copy()
    # decode: the caller's default tiling, only the loop form changes (a config skips the
    # few-rows path in both arms alike)
    for B, ctx in ((64, 8192), (128, 4096), (8, 65536)):
        c = bk.Decode(B, ctx)
        for two in (0, 1):
            t = bk.ms(lambda: c.run(config={"TWO_LOOPS": two}))
            bw = c.bytes / (t * 1e-3)
            bk.row(f"decode B{B} ctx{ctx} two_loops={two}", ms=t, GBps=bw / 1e9, pct_copy=100 * bw / copy_bw)
        del c
    F = torch.nn.functional
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for B, L in ((4, 4096), (1, 16384)):
        hkv, g, d = 8, 4, 128
        qq, kv, bt, qsl, seq, z = bk.prefill_case(B, L, hkv, g, d)
        out = torch.empty_like(qq)
        flops = 4 * B * hkv * g * L * L * d / 2
        q4 = qq.view(B, L, hkv * g, d).transpose(1, 2)
        k4 = torch.randn(B, hkv, L, d, device="cuda", dtype=torch.bfloat16)
        v4 = torch.randn_like(k4)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            flash = bk.ms(lambda: F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, enable_gqa=True))
        bk.row(f"prefill B{B} L{L} sdpa flash", ms=flash, TFLOPs=flops / flash / 1e9)
        for two in (0, 1):
            for st in (int(s) for s in args.stages.split(",")):
                cfg = {"TWO_LOOPS": two, "num_stages": st}
                t = bk.ms(lambda: paged_attention_batched(qq, kv, bt, qsl, seq, z, z, d ** -0.5, out=out,
                                                          max_query_len=L, max_seq_len=L, config=cfg), rep=50)
                bk.row(f"prefill B{B} L{L} two_loops={two} stages={st}", ms=t, TFLOPs=flops / t / 1e9,
                       vs_flash=flash / t)
        t = bk.ms(lambda: paged_attention_batched(qq, kv, bt, qsl, seq, z, z, d ** -0.5, out=out,
                                                  max_query_len=L, max_seq_len=L), rep=50)
        bk.row(f"prefill B{B} L{L} default", ms=t, TFLOPs=flops / t / 1e9, vs_flash=flash / t)
        del qq, kv, k4, v4
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, results=bk.RESULTS), f,
                      indent=1)


if __name__ == "__main__":
    main()
