#!/usr/bin/env python3
"""Kernel benchmarks on one GPU (docs/kernels.md has the results and the command).

  copy      device-to-device copy bandwidth, the ceiling (bytes read + written / time)
  decode    bf16 paged decode: bytes of K/V read / time, vs copy; tile sweep first
  quant     int8/int4/int2 pages vs bf16 pages at equal token count
  sdpa      our bf16 decode and prefill vs torch SDPA (flash) on the same tokens, dense
  stats     decode with the H2O mass output vs without
  compact   compaction + int4 quantization of one request vs one prefill of it (one layer)

Timing: triton.testing.do_bench (CUDA events), warm-up, median. Every tensor is random
(no zeros), every K/V set is larger than L2. Prints a table; --json writes every number.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import triton
from triton.testing import do_bench

from vllm_kvcomp.ops import quant
from vllm_kvcomp.triton_kernels import compaction
from vllm_kvcomp.triton_kernels.paged_attention import paged_attention_batched

DEV = "cuda"
DT = torch.bfloat16
RESULTS: dict = {}
ROWS: list[str] = []
SMOKE = False  # --smoke: tiny shapes on the CPU through the Triton interpreter (checks the script)


def ms(fn, rep=200) -> float:
    if SMOKE:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return do_bench(fn, warmup=50, rep=rep, return_mode="median")


def capture(fn) -> torch.cuda.CUDAGraph:
    """fn captured in a CUDA graph (warmed up first, once on a side stream, as torch asks)."""
    fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def ms_graph(fn, rep=200) -> float | None:
    """fn replayed from a CUDA graph, as vLLM runs decode: no host time between its kernels
    (eager timings of a ~0.2 ms call include the launcher's Python). None in smoke mode."""
    if SMOKE:
        return None
    return do_bench(capture(fn).replay, warmup=50, rep=rep, return_mode="median")


def kernel_ms(fn, n=20) -> dict[str, float]:
    """Mean device time per call of each kernel (and copy, fill) of fn, in ms, from the
    profiler: sync-free, no host time. Keys: the first 40 characters of the names."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", 0) or getattr(ev, "self_cuda_time_total", 0)
        if t > 0:
            out[ev.key[:40]] = out.get(ev.key[:40], 0.0) + t / n / 1000.0
    return out


def gpu_ms(fn, n=20) -> float:
    """Device time of fn (kernels, copies, fills summed; no host time), mean of n calls,
    from the profiler. NaN in smoke mode."""
    if SMOKE:
        return math.nan
    try:
        return sum(kernel_ms(fn, n).values())
    except Exception as e:  # noqa: BLE001 - no CUPTI: report the wall time alone
        print("gpu_ms failed:", type(e).__name__, str(e)[:200], flush=True)
        return math.nan


def S(n: int) -> int:
    """A size, shrunk in smoke mode."""
    return max(1, n // 64) if SMOKE else n


def row(name: str, **kv) -> None:
    RESULTS[name] = kv
    ROWS.append(f"{name:44s} " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in kv.items()))
    print(ROWS[-1], flush=True)


# ----------------------------------------------------------------------------- caches
class Decode:
    """B requests, one query token each, ctx keys each; K/V scattered over random blocks.

    ``bits=None``: plain live layout (kept=0). Otherwise the ctx keys form the compacted
    region, as ``bits`` pages (0 = full pages read through the tag path), followed by
    the gap and a live block of ``live`` tokens.
    """

    def __init__(self, B, ctx, hkv=8, g=4, d=128, bs=16, bits=None, live=16):
        es = 2
        self.B, self.ctx, self.hkv, self.g, self.d, self.bs = B, ctx, hkv, g, d, bs
        gen = torch.Generator(device=DEV).manual_seed(0)
        if bits is None:
            n_ent = -(-ctx // bs)
            nb = B * n_ent + 1
            self.kv = torch.randn(nb, hkv, bs, 2 * d, device=DEV, dtype=DT, generator=gen)
            perm = torch.randperm(nb - 1, device=DEV, generator=gen).int() + 1
            self.bt = perm[: B * n_ent].view(B, n_ent).contiguous()
            self.kept = torch.zeros(B, dtype=torch.int32, device=DEV)
            self.live = torch.zeros(B, dtype=torch.int32, device=DEV)
            self.seq = torch.full((B,), ctx, dtype=torch.int32, device=DEV)
            self.tag = None
            self.bytes = B * ctx * hkv * 2 * d * es
        else:
            cap = quant.page_capacity(bits, bs, d, es)
            npg = -(-ctx // cap)
            live_start = -(-ctx // bs) * bs
            n_live = -(-live // bs)
            width = live_start // bs + n_live
            nb = B * (npg + n_live) + 1
            self.kv = torch.randn(nb, hkv, bs, 2 * d, device=DEV, dtype=DT, generator=gen)
            self.tag = torch.zeros(nb, dtype=torch.int8, device=DEV)
            perm = torch.randperm(nb - 1, device=DEV, generator=gen).int() + 1
            blocks = perm[: B * (npg + n_live)].view(B, npg + n_live)
            self.bt = torch.zeros(B, width, dtype=torch.int32, device=DEV)
            self.bt[:, :npg] = blocks[:, :npg]
            self.bt[:, live_start // bs:] = blocks[:, npg:]
            if bits:
                self.tag[blocks[:, :npg].reshape(-1).long()] = bits
                self._fill_meta(blocks[:, :npg].reshape(-1).long(), bits, cap)
                o = quant.page_offsets(bits, bs, d, es)
                self.bytes = B * npg * hkv * o["end"] + B * live * hkv * 2 * d * es
            else:
                self.bytes = B * (ctx + live) * hkv * 2 * d * es
            self.kept = torch.full((B,), ctx, dtype=torch.int32, device=DEV)
            self.live = torch.full((B,), live_start, dtype=torch.int32, device=DEV)
            self.seq = torch.full((B,), live_start + live, dtype=torch.int32, device=DEV)
        self.q = torch.randn(B, hkv * g, d, device=DEV, dtype=DT, generator=gen)
        self.qsl = torch.arange(B + 1, dtype=torch.int32, device=DEV)
        self.out = torch.empty_like(self.q)
        self.max_seq = int(self.seq.max())  # on the host once: run() can be captured in a CUDA graph

    def _fill_meta(self, blocks, bits, cap):
        """Random codes are already there (random bytes); give every page sane fp16 scales."""
        o = quant.page_offsets(bits, self.bs, self.d, 2)
        pages = self.kv.view(torch.uint8).view(self.kv.shape[0], self.hkv, -1)[blocks]  # copy
        h = pages[..., o["ks"]: o["end"]].contiguous().view(torch.float16)  # KS KZ VS VZ
        d = self.d
        qmax = (1 << bits) - 1
        h[..., :d] = 2.0 / qmax
        h[..., d: 2 * d] = -1.0
        h[..., 2 * d: 2 * d + cap] = 2.0 / qmax
        h[..., 2 * d + cap:] = -1.0
        pages[..., o["ks"]: o["end"]] = h.view(torch.uint8)
        self.kv.view(torch.uint8).view(self.kv.shape[0], self.hkv, -1)[blocks] = pages

    def run(self, **kw):
        return paged_attention_batched(self.q, self.kv, self.bt, self.qsl, self.seq, self.kept, self.live,
                                       self.d ** -0.5, page_tag=self.tag, out=self.out, max_query_len=1,
                                       max_seq_len=self.max_seq, **kw)


def prefill_case(B, L, hkv=8, g=4, d=128, bs=16):
    """B fresh prompts of L tokens in random blocks: (q, kv, block_table, qsl, seq_lens, zeros)."""
    n_ent = L // bs
    kv = torch.randn(B * n_ent + 1, hkv, bs, 2 * d, device=DEV, dtype=DT)
    bt = (torch.randperm(B * n_ent, device=DEV).int() + 1).view(B, n_ent).contiguous()
    q = torch.randn(B * L, hkv * g, d, device=DEV, dtype=DT)
    qsl = torch.arange(B + 1, dtype=torch.int32, device=DEV) * L
    seq = torch.full((B,), L, dtype=torch.int32, device=DEV)
    return q, kv, bt, qsl, seq, torch.zeros(B, dtype=torch.int32, device=DEV)


# ----------------------------------------------------------------------------- sections
def bench_copy():
    n = S(1 << 31)  # 2 GiB
    x = torch.randn(n // 2, device=DEV, dtype=DT)
    y = torch.empty_like(x)
    t = ms(lambda: y.copy_(x))
    bw = 2 * n / (t * 1e-3)
    row("copy 2GiB d2d", ms=t, GBps=bw / 1e9)
    del x, y
    return bw


def bench_decode(copy_bw, sweep=True):
    best = None
    if sweep:
        c = Decode(S(64), S(8192))
        for tile in (32, 64, 128):
            for warps in (2, 4, 8):
                for stages in (2, 3):
                    cfg = dict(TILE_N=tile, num_warps=warps, num_stages=stages)
                    try:
                        t = ms(lambda: c.run(config=cfg), rep=50)
                    except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
                        print("config failed", cfg, type(e).__name__, flush=True)
                        continue
                    RESULTS.setdefault("decode_sweep", []).append(dict(cfg, ms=t, GBps=c.bytes / t / 1e6))
                    if best is None or t < best[1]:
                        best = (cfg, t)
        row("decode sweep best (B64 ctx8192)", **best[0], ms=best[1])
        del c
    cfg = best[0] if best else None
    for B, ctx in ((64, 8192), (32, 16384), (128, 4096), (256, 2048), (8, 65536), (16, 8192)):
        B, ctx = S(B), S(ctx)
        c = Decode(B, ctx)
        for splits in (None, 1):
            t = ms(lambda: c.run(config=cfg, num_splits=splits))
            bw = c.bytes / (t * 1e-3)
            row(f"decode bf16 B{B} ctx{ctx} splits={splits or 'auto'}", ms=t, GBps=bw / 1e9,
                pct_copy=100 * bw / copy_bw)
        del c
    return cfg


def bench_quant(cfg, sweep=False):
    """Equal token count: ctx keys per request as bf16 pages or as int8/int4/int2 pages."""
    B, ctx = S(64), S(8192)
    base = None
    for bits in (None, 0, 4, 8, 2):
        c = Decode(B, ctx, bits=bits)
        name = {None: "bf16 live", 0: "bf16 pages (tag path)", 8: "int8", 4: "int4", 2: "int2"}[bits]
        kw = dict(config=cfg) if not bits else {}
        if bits and not (sweep and bits == 4):  # the others reuse int4's best
            kw = RESULTS.get("quant_best_int4", {})
        if bits == 4 and sweep:
            def trial(qcfg, splits):
                try:
                    t = ms(lambda: c.run(config=qcfg, num_splits=splits, page_bits=(4,)), rep=50)
                except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
                    print("quant config failed", qcfg, splits, type(e).__name__, str(e)[:200], flush=True)
                    return None
                RESULTS.setdefault("quant_sweep_int4", []).append(dict(qcfg, splits=splits, ms=t))
                print("  int4", qcfg, "splits", splits, f"{t:.4f} ms", flush=True)
                return t
            # pipeline depth (kernel, quantized loop) x splits (None: the launcher's heuristic);
            # 4 warps (8 measured 1.8x slower)
            best = None
            for stages in (2, 3):
                for qstages in (1, 2, 3):
                    for splits in (None, 2):
                        qcfg = dict(num_warps=4, num_stages=stages, QSTAGES=qstages)
                        t = trial(qcfg, splits)
                        if t is not None and (best is None or t < best[1]):
                            best = (dict(config=qcfg, num_splits=splits), t)
            kw = best[0]
            RESULTS["quant_best_int4"] = kw
        # all formats compiled in (page_bits' default) and one format (the backend's call:
        # an engine's pages have the policy's bits), eager and replayed from a CUDA graph
        t = ms(lambda: c.run(**kw))
        t_one = ms(lambda: c.run(page_bits=(bits,), **kw)) if bits else t
        tg = ms_graph(lambda: c.run(**kw))
        tg_one = ms_graph(lambda: c.run(page_bits=(bits,), **kw)) if bits else tg
        if bits is None:
            base, base_g = t, tg
        row(f"quant {name} B{B} ctx{ctx}", ms=t, ms_one_format=t_one, speedup_vs_bf16=base / t,
            speedup_one_format=base / t_one, GBps=c.bytes / t / 1e6, ms_graph=tg,
            speedup_graph=base_g / tg if tg else None, ms_graph_one_format=tg_one,
            speedup_graph_one_format=base_g / tg_one if tg_one else None, cfg=str(kw))
        del c
    # prefill of a fresh prompt through the tag path (an engine with quantized pages) vs
    # without tags: its tiles unpack quantized pages instead of reading them in planes
    B_, L = S(4), S(4096)
    qq, kv, bt, qsl, seq, z = prefill_case(B_, L)
    tag = torch.zeros(kv.shape[0], dtype=torch.int8, device=DEV)
    t0 = ms(lambda: paged_attention_batched(qq, kv, bt, qsl, seq, z, z, 128 ** -0.5, max_query_len=L,
                                            max_seq_len=L), rep=30)
    t1 = ms(lambda: paged_attention_batched(qq, kv, bt, qsl, seq, z, z, 128 ** -0.5, max_query_len=L,
                                            max_seq_len=L, page_tag=tag, page_bits=(4,)), rep=30)
    row(f"prefill B{B_} L{L} with tags (int4 engine)", ms=t1, no_tags_ms=t0, slowdown=t1 / t0)
    del kv, qq
    # bigger pages -> bigger quantized tiles (is the small-page path latency-bound?)
    for bs in (32, 64):
        base = None
        for bits in (None, 4, 2):
            c = Decode(B, ctx, bs=bs, bits=bits)
            kw = RESULTS.get("quant_best_int4", {}) if bits else dict(config=cfg)
            t = ms(lambda: c.run(**kw))
            base = t if bits is None else base
            row(f"quant bs{bs} {'bf16' if bits is None else f'int{bits}'} B{B} ctx{ctx}", ms=t,
                speedup_vs_bf16=base / t, GBps=c.bytes / t / 1e6)
            del c


def sdpa_decode_ms(c: "Decode", backends=("flash", "cudnn", "efficient")) -> dict:
    """SDPA on the same decode tokens in dense layout ``[B, H, ctx, D]``: ms per backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    F = torch.nn.functional
    known = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}
    q = c.q.view(c.B, c.hkv * c.g, 1, c.d)
    k = torch.randn(c.B, c.hkv, c.ctx, c.d, device=DEV, dtype=DT)
    v = torch.randn_like(k)
    res = {}
    for label in backends:
        try:
            with sdpa_kernel(known[label]):
                res[label] = ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        except Exception as e:  # noqa: BLE001
            print(f"sdpa {label} decode failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
    return res


def bench_sdpa(cfg, sweep=False):
    do_sweep = sweep
    from torch.nn.attention import SDPBackend, sdpa_kernel
    F = torch.nn.functional
    for B, ctx in ((64, 8192), (8, 65536)):
        B, ctx = S(B), S(ctx)
        c = Decode(B, ctx)
        t_ours = ms(lambda: c.run(config=cfg))
        res = sdpa_decode_ms(c)
        row(f"sdpa decode B{B} ctx{ctx}", ours_ms=t_ours, **{f"{k}_ms": v for k, v in res.items()},
            ours_vs_flash=res.get("flash", math.nan) / t_ours)
        del c
    # prefill: B prompts of L tokens, causal
    best = None
    for B, L in ((4, 4096), (1, 16384)):
        B, L = S(B), S(L)
        hkv, g, d = 8, 4, 128
        qq, kv, bt, qsl, seq, z = prefill_case(B, L, hkv, g, d)
        out = torch.empty_like(qq)
        flops = 4 * B * hkv * g * L * L * d / 2
        configs_all = [dict(BLOCK_M=bm, TILE_N=tile, num_warps=w, num_stages=st)
                 for bm in (64, 128) for tile in (64, 128) for w in (4, 8) for st in (2, 3)]
        # tile sweep on the first shape; its best tiles for the next
        configs = (configs_all if best is None else [best[0]]) if do_sweep else [None]
        best = None
        for pcfg in configs:
            try:
                t = ms(lambda: paged_attention_batched(qq, kv, bt, qsl, seq, z, z, d ** -0.5, out=out,
                                                       max_query_len=L, max_seq_len=L, config=pcfg), rep=30)
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
                print("prefill config failed", pcfg, type(e).__name__, flush=True)
                continue
            RESULTS.setdefault(f"prefill_sweep_B{B}_L{L}", []).append(dict(pcfg or {}, ms=t))
            if best is None or t < best[1]:
                best = (pcfg, t)
        t_ours = best[1]
        q4 = qq.view(B, L, hkv * g, d).transpose(1, 2)
        k4 = torch.randn(B, hkv, L, d, device=DEV, dtype=DT)
        v4 = torch.randn_like(k4)
        res = {}
        for label, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    res[label] = ms(lambda: F.scaled_dot_product_attention(q4, k4, v4, is_causal=True,
                                                                            enable_gqa=True))
            except Exception as e:  # noqa: BLE001
                print(f"sdpa {label} prefill failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
        row(f"sdpa prefill B{B} L{L}", **(best[0] or {}), ours_ms=t_ours, ours_TFLOPs=flops / t_ours / 1e9,
            **{f"{k}_ms": v for k, v in res.items()}, ours_vs_flash=res.get("flash", math.nan) / t_ours)
        RESULTS[f"prefill_best_B{B}_L{L}"] = best
        del kv, k4, v4


def bench_splits(cfg):
    """Long-context, small-batch decode: split-K counts around the launcher's heuristic,
    beside SDPA flash on the same tokens (dense). Where the heuristic's choice loses to flash."""
    for B, ctx in ((8, 65536), (4, 131072), (16, 32768), (2, 131072)):
        B, ctx = S(B), S(ctx)
        c = Decode(B, ctx)
        flash = math.nan if SMOKE else sdpa_decode_ms(c, ("flash",)).get("flash", math.nan)
        for splits in (None, 4, 8, 12, 16, 24, 32, 48, 64):
            t = ms(lambda: c.run(config=cfg, num_splits=splits), rep=100)
            row(f"splits B{B} ctx{ctx} splits={splits or 'auto'}", ms=t, GBps=c.bytes / t / 1e6,
                flash_ms=flash, ours_vs_flash=flash / t)
            RESULTS.setdefault("splits_sweep", []).append(dict(B=B, ctx=ctx, splits=splits, ms=t, flash_ms=flash))
        del c


def bench_stats(cfg):
    c = Decode(S(64), S(8192))
    t0 = ms(lambda: c.run(config=cfg))
    mass = torch.zeros(c.kv.shape[0], c.hkv, c.bs, device=DEV)
    t1 = ms(lambda: c.run(config=cfg, mass_cache=mass))
    row("decode + H2O mass B64 ctx8192", plain_ms=t0, with_mass_ms=t1, overhead=t1 / t0 - 1)
    del c


def bench_compact(prefill_cfg=None):
    L, hkv, g, d, bs = S(8192) * (8 if SMOKE else 1), 8, 4, 128, 16
    n_ent = L // bs
    nb = n_ent + 8
    kv = torch.randn(nb, hkv, bs, 2 * d, device=DEV, dtype=DT)
    tag = torch.zeros(nb, dtype=torch.int8, device=DEV)
    row_ = (torch.randperm(nb - 1, device=DEV).int() + 1)[:n_ent].contiguous()
    qq = torch.randn(L, hkv * g, d, device=DEV, dtype=DT)
    qsl = torch.tensor([0, L], dtype=torch.int32, device=DEV)
    seq = torch.tensor([L], dtype=torch.int32, device=DEV)
    z = torch.zeros(1, dtype=torch.int32, device=DEV)
    t_prefill = ms(lambda: paged_attention_batched(qq, kv, row_[None], qsl, seq, z, z, d ** -0.5, max_query_len=L,
                                                   max_seq_len=L, config=prefill_cfg))
    cand = torch.arange(L - 64, device=DEV)
    perm = torch.stack([torch.randperm(cand.numel(), device=DEV) for _ in range(hkv)])
    keep_full = perm[:, :S(512) * (4 if SMOKE else 1)].sort(1).values
    keep_q = perm[:, keep_full.shape[1]:L // 4].sort(1).values
    mass = torch.rand(nb, hkv, max(quant.capacities(kv).values()), device=DEV)

    def report(name, fn):
        # wall: as the backend calls it (~20 small torch ops + 3 launches, so the host's
        # speed shows); gpu: the same calls' device time alone (not graph-capturable: a
        # tag write copies a host scalar)
        t, tg = ms(fn), gpu_ms(fn)
        row(name, ms=t, gpu_ms=tg, prefill_attn_ms=t_prefill, frac_of_prefill_attn=t / t_prefill,
            gpu_frac=tg / t_prefill)

    for bits in (4, 2):
        report(f"compact 8192->512 bf16+1536 int{bits} (1 layer)",
               lambda: compaction.compact_mixed(kv, mass, tag, row_, 0, cand, keep_full, keep_q, bits))
    keep_all = perm[:, :L // 4].sort(1).values
    report("compact 8192->2048 bf16 (1 layer)", lambda: compaction.compact(kv, mass, row_, cand, keep_all))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", default="copy,decode,quant,sdpa,stats,compact",
                    help="comma list of sections; also: splits (split-K sweep at long context)")
    ap.add_argument("--sweep", default="", help="comma list of: decode,quant,prefill (tile sweeps)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    args = ap.parse_args()
    only = args.only.split(",")
    global SMOKE, DEV
    if args.smoke:
        SMOKE, DEV = True, "cpu"
        RESULTS["env"] = dict(device="cpu (interpreter smoke run)")
    else:
        p = torch.cuda.get_device_properties(0)
        RESULTS["env"] = dict(device=p.name, sms=p.multi_processor_count, torch=torch.__version__,
                              triton=triton.__version__, cuda=torch.version.cuda, argv=sys.argv)
    print(RESULTS["env"], flush=True)
    t0 = time.time()
    copy_bw = bench_copy()
    sweeps = args.sweep.split(",")

    def section(name, fn, *a, **k):
        if name not in only:
            return None
        try:
            return fn(*a, **k)
        except Exception as e:  # noqa: BLE001 - one broken section must not hide the others
            import traceback
            traceback.print_exc()
            row(f"{name} FAILED", error=f"{type(e).__name__}: {str(e)[:300]}")
            torch.cuda.empty_cache() if not SMOKE else None
            return None

    cfg = section("decode", bench_decode, copy_bw, sweep="decode" in sweeps)
    section("quant", bench_quant, cfg, sweep="quant" in sweeps)
    section("splits", bench_splits, cfg)
    section("stats", bench_stats, cfg)
    section("sdpa", bench_sdpa, cfg, sweep="prefill" in sweeps)
    best = [v for k, v in RESULTS.items() if k.startswith("prefill_best")]
    section("compact", bench_compact, best[0][0] if best else None)
    RESULTS["wall_s"] = time.time() - t0
    print("\n".join(["", "== summary =="] + ROWS))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)


if __name__ == "__main__":
    main()
