#!/usr/bin/env python3
"""Exploration (GPU): quantized-page tiles of the forward kernel.

1. int4 decode at equal tokens (64 x 8192) under launch variants, with registers per thread,
   beside the standalone kernel of benchmarks/int4_variants.py (same bytes);
2. correctness of each prefill tiling over quantized pages (query rows per tile, planes or
   one unpacked tile) against the PyTorch reference, on chunked prefill over an int4 prefix;
3. their speed: B requests, an int4 compacted prefix of P tokens, a chunk of L new queries;
4. a register cap (maxnreg) on decode over each page format;
5. flash-decoding splits for long-context small-batch bf16 decode vs SDPA flash;
6. the same with other decode tilings (key tile, warps, pipeline stages) x splits;
7. the few-rows decode launch (paged_attention._few_rows_decode) against the launch it
   replaced (64-token tiles, 3 stages, splits to fill the GPU twice) and flash, interleaved
   and repeated (run-to-run spread of these timings is ~10%); also replayed from CUDA graphs
   (no host launch time, as vLLM replays decode).
--part regs,check,prefill,maxnreg,splits,tiles,fewrows picks them. Writes one JSON line per measurement
to --out; the runs are in docs/kernels_runs/h100_probe_qtile_run*.jsonl (docs/kernels.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_kernels import Decode, ms, prefill_case  # noqa: E402
from tests.kernels.kvbatch import Req, make_batch, rel_err  # noqa: E402

from vllm_kvcomp.ops import quant  # noqa: E402
from vllm_kvcomp.triton_kernels.paged_attention import paged_attention_batched  # noqa: E402

OUT = None


def emit(**kv):
    print(json.dumps(kv), flush=True)
    with open(OUT, "a") as f:
        f.write(json.dumps(kv) + "\n")


def _compiled(kern):
    """{key: CompiledKernel} of every variant compiled so far (Triton 3.x caches)."""
    out = {}
    for cache in kern.device_caches.values():
        out.update(cache[0])
    return out


def decode_regs():
    """Production int4 decode under launch variants, with its registers per thread, and the
    exploration's best standalone kernel (same bytes) for comparison."""
    from vllm_kvcomp.triton_kernels import paged_attention as pa
    import int4_variants as iv
    c0 = Decode(64, 8192)
    base = ms(lambda: c0.run())
    del c0
    emit(what="decode bf16", ms=base)
    c = Decode(64, 8192, bits=4)
    for cfg in (None, dict(num_stages=2), dict(num_warps=2), dict(num_warps=8), dict(maxnreg=128),
                dict(maxnreg=96), dict(QSTAGES=3, num_stages=2)):
        before = set(_compiled(pa._fwd_kernel))
        try:
            t = ms(lambda: c.run(config=cfg, page_bits=(4,)), rep=100)
        except Exception as e:  # noqa: BLE001
            emit(what="decode int4", cfg=cfg, error=f"{type(e).__name__}: {str(e)[:200]}")
            continue
        new = [v for k, v in _compiled(pa._fwd_kernel).items() if k not in before]
        regs = [(getattr(k, "n_regs", -1), getattr(k, "n_spills", -1)) for k in new]
        emit(what="decode int4", cfg=cfg, ms=t, speedup=base / t, regs_spills=regs)
    cap = quant.page_capacity(4, c.bs, c.d, 2)
    out = torch.empty_like(c.q)
    sk = c.kv.stride()

    def go():
        return iv._var_kernel[(64, c.hkv)](
            c.q, c.kv.view(torch.uint8), c.kv.view(torch.float16), c.bt, out, 8192, c.d ** -0.5 * 1.4426950408889634,
            sk[0], sk[1], c.bt.stride(0), H_Q=c.hkv * c.g, D=c.d, G=c.g, BLOCK_M=16, CAP=cap, QT=64, KMODE=2,
            VMODE=0, SWAP=0, num_warps=4, num_stages=2)
    h = go()
    t = ms(go, rep=100)
    emit(what="standalone int4 (halves, K dequant, w4 s2)", ms=t, speedup=base / t,
         regs_spills=[(getattr(h, "n_regs", -1), getattr(h, "n_spills", -1))])


def decode_maxnreg():
    """A register cap per thread for the decode launch: more programs per SM vs spills."""
    from vllm_kvcomp.triton_kernels import paged_attention as pa
    for bits in (None, 0, 4, 2, 8):
        c = Decode(64, 8192, bits=bits)
        pb = {} if not bits else dict(page_bits=(bits,))
        for cap in (None, 128, 144, 160, 168):
            cfg = dict(maxnreg=cap) if cap else None
            before = set(_compiled(pa._fwd_kernel))
            t = ms(lambda: c.run(config=cfg, **pb), rep=100)
            new = [v for k, v in _compiled(pa._fwd_kernel).items() if k not in before]
            emit(what="decode maxnreg", bits=bits, maxnreg=cap, ms=t,
                 regs_spills=[(getattr(k, "n_regs", -1), getattr(k, "n_spills", -1)) for k in new])
        del c


def decode_splits():
    """Long-context small-batch bf16 decode: number of flash-decoding splits vs SDPA flash."""
    for B, ctx in ((8, 65536), (16, 32768), (64, 8192)):
        c = Decode(B, ctx)
        flash = _flash_decode(c)
        t_flash = ms(flash)
        del flash
        for splits in (None, 4, 8, 12, 16, 24, 32, 48):
            t = ms(lambda: c.run(num_splits=splits), rep=100)
            emit(what="decode splits", B=B, ctx=ctx, splits=splits, ms=t, flash_ms=t_flash, vs_flash=t_flash / t)
        del c


def decode_tiles():
    """Long-context small-batch bf16 decode under other tilings than the default (64-token
    key tiles, 4 warps, 3 stages: chosen at 64 x 8192), beside SDPA flash on the same tokens."""
    configs = [dict(TILE_N=t, num_warps=w, num_stages=st) for t in (64, 128) for w in (4, 8) for st in (2, 3, 4)]
    for B, ctx in ((8, 65536), (4, 131072), (16, 32768)):
        c = Decode(B, ctx)
        flash = _flash_decode(c)
        t_flash = ms(flash)
        ref = c.run().clone()
        del flash
        for cfg in configs:
            for splits in (None, 16, 24, 32):
                try:
                    t = ms(lambda: c.run(num_splits=splits, config=cfg), rep=100)
                    err = float((c.out.float() - ref.float()).norm() / ref.float().norm())
                except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
                    emit(what="decode tiles", B=B, ctx=ctx, cfg=cfg, splits=splits, error=f"{type(e).__name__}")
                    break
                emit(what="decode tiles", B=B, ctx=ctx, cfg=cfg, splits=splits, ms=t, flash_ms=t_flash,
                     vs_flash=t_flash / t, rel_err=err)
        del c


def decode_few_rows(repeats=3):
    from vllm_kvcomp.triton_kernels.paged_attention import _default_splits
    for B, ctx in ((8, 65536), (4, 131072), (16, 32768), (2, 131072), (16, 8192)):
        c = Decode(B, ctx)
        flash = _flash_decode(c)
        old_splits = _default_splits(c.q.device, B * c.hkv, c.max_seq, c.bs)

        def old():
            return c.run(num_splits=old_splits, config={"TILE_N": 64, "num_stages": 3})

        fns = dict(flash=flash, new=c.run, old=old)
        graphs = {name: _graph(fn) for name, fn in fns.items()}  # replayed: no host launch time, as in serving
        for rep in range(repeats):
            t = {name: ms(fn, rep=100) for name, fn in fns.items()}
            tg = {name: ms(g.replay, rep=100) for name, g in graphs.items()}
            emit(what="few rows", B=B, ctx=ctx, rep=rep, new_ms=t["new"], old_ms=t["old"], old_splits=old_splits,
                 flash_ms=t["flash"], new_vs_flash=t["flash"] / t["new"], old_vs_flash=t["flash"] / t["old"],
                 graph_ms=tg, graph_new_vs_flash=tg["flash"] / tg["new"], graph_old_vs_flash=tg["flash"] / tg["old"])
        del c, flash, graphs


def _flash_decode(c: Decode):
    """SDPA flash decode over ``c``'s query and fresh dense K/V of the same shape: a callable."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = c.q.view(c.B, c.hkv * c.g, 1, c.d)
    k = torch.randn(c.B, c.hkv, c.ctx, c.d, device="cuda", dtype=c.q.dtype)
    v = torch.randn_like(k)

    def flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    return flash


def _graph(fn):
    fn()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()  # warm-up on a side stream before capture, as PyTorch advises
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()
    return g


def prefix_batch(B, P, L, bits, device, seed=0):
    """B requests: P tokens compacted into `bits` pages, then L new query tokens (live)."""
    bs, d = 16, 128
    cap = quant.page_capacity(bits, bs, d, 2)
    npg = -(-P // cap)
    live = -(-npg * cap // bs) * bs + bs
    reqs = [Req(L, live + L, live_start=live, plan=[bits] * npg) for _ in range(B)]
    return make_batch(reqs, hkv=8, g=4, d=d, bs=bs, dtype=torch.bfloat16, device=device, seed=seed, tags=True)


CONFIGS = [
    dict(BLOCK_M=32, PLANES=True),
    dict(BLOCK_M=64, PLANES=False),
    dict(BLOCK_M=128, PLANES=False),
    dict(BLOCK_M=128, PLANES=False, num_warps=8),
    dict(BLOCK_M=64, PLANES=True, QSTAGES=1),
    dict(BLOCK_M=128, PLANES=True, QSTAGES=1),
]


def run_batch(b, cfg):
    out = torch.empty_like(b.q)
    paged_attention_batched(*b.args(), b.q.shape[-1] ** -0.5, page_tag=b.page_tag, out=out, config=cfg)
    return out


def check(cfg):
    worst = 0.0
    for bits in (4, 2, 8):
        b = prefix_batch(3, 700, 300, bits, "cuda", seed=bits)
        out = run_batch(b, cfg)
        torch.cuda.synchronize()
        qsl = b.qsl.tolist()
        for i, r in enumerate(b.reqs):
            o, _, _ = quant.paged_attention_mixed(b.q[qsl[i]:qsl[i + 1]], b.kv, b.page_tag, b.block_table[i],
                                                  r.kept, r.live_start, r.seq_len, b.q.shape[-1] ** -0.5, True, 0)
            worst = max(worst, rel_err(out[qsl[i]:qsl[i + 1]], o))
    return worst


def prefill_speed():
    B, L = 4, 4096
    qq, kv, bt, qsl, seq, z = prefill_case(B, L)
    tag = torch.zeros(kv.shape[0], dtype=torch.int8, device="cuda")
    t0 = ms(lambda: paged_attention_batched(qq, kv, bt, qsl, seq, z, z, 128 ** -0.5, max_query_len=L,
                                            max_seq_len=L), rep=30)
    emit(what="fresh prefill B4 L4096 no tags", ms=t0)
    for cfg in CONFIGS[:4]:
        t1 = ms(lambda: paged_attention_batched(qq, kv, bt, qsl, seq, z, z, 128 ** -0.5, max_query_len=L,
                                                max_seq_len=L, page_tag=tag, page_bits=(4,), config=cfg), rep=30)
        emit(what="fresh prefill B4 L4096 tags", cfg=cfg, ms=t1, vs_no_tags=t1 / t0)
    del qq, kv
    b = prefix_batch(4, 8192, 1024, 4, "cuda")
    for cfg in CONFIGS[:4]:
        t = ms(lambda: run_batch(b, cfg), rep=30)
        emit(what="chunk 1024 over int4 prefix 8192, B4", cfg=cfg, ms=t)


def main():
    global OUT
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--part", default="regs,check,prefill")
    a = ap.parse_args()
    OUT = a.out
    parts = a.part.split(",")
    if "splits" in parts:
        decode_splits()
    if "tiles" in parts:
        decode_tiles()
    if "fewrows" in parts:
        decode_few_rows()
    if "maxnreg" in parts:
        decode_maxnreg()
    if "regs" in parts:
        decode_regs()
    if "check" in parts:
        for cfg in CONFIGS:
            try:
                emit(what="check", cfg=cfg, max_rel_err=check(cfg))
            except Exception as e:  # noqa: BLE001 - an illegal address ends the process anyway
                emit(what="check", cfg=cfg, error=f"{type(e).__name__}: {str(e)[:200]}")
                raise
    if "prefill" in parts:
        prefill_speed()


if __name__ == "__main__":
    main()
