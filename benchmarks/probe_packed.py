#!/usr/bin/env python3
"""Exploration (issue 3): decode over int4/int2 pages with *packed* code conversion.

The production loop (paged_attention._attend_qrun) turns every code byte into its own
32-bit register and converts code by code (~6-8 instructions a code); at 64 x 8192 tokens
that makes decode instruction-bound at ~0.56 ms whatever the bits. Here one inline-PTX
block turns 4 code bytes (8 int4 / 16 int2 codes) into fp16 pairs at once:

    lop3(x, 0x000F000F, 0x64006400)  -> two fp16 1024 + code   (two bytes' low nibbles)
    fma.f16x2(h, 2^-k, -1024 * 2^-k) -> the codes, exact       (plane p: k = bits * p)
    fma.f16x2(c, KS, KZ)             -> dequantized keys in fp16 (one rounding)

so a code costs ~1.5 instructions. (prmt first spreads bytes (0, 1) and (2, 3) into two
words: the PTX must be elementwise, since Triton may group any 4 elements of a thread.)

KMODE 0: keys dequantized in fp16 (above); q (times the softmax scale) in fp16.
KMODE 1: KS folded into q per page (q*KS in fp16), codes kept biased (1024 + c) and the bias
         and KZ subtracted/added per page in fp32.
VMODE 0: value codes biased (lop3 only), 1024 * sum(p*VS) subtracted per tile.
VMODE 1: value codes exact (lop3 + fma).
Values always fold their per-token scale into p: o += (p*VS).codes + sum(p*VZ).
PF 1: page j+1 loaded into registers while page j is computed (instead of Triton's pipeliner).

Measured on an H200 (docs/kernels.md): these one-page-a-step variants take int4 from 0.56
to 0.40 ms at 64 x 8192 (bf16 pages 0.50 ms); batching pages per step (one per warp) took
it to 0.27 ms, and that kernel is what ships: triton_kernels/quant_decode.py, measured here
through the launcher by --production (each tiling's kernels timed apart by torch.profiler;
benchmarks/sass_census.py counts a variant's instructions per page without a GPU).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import triton
import triton.language as tl

from vllm_kvcomp.ops import quant
from vllm_kvcomp.triton_kernels.paged_attention import _reduce_kernel
from vllm_kvcomp.triton_kernels.quant_decode import _h2, _mask

# ----------------------------------------------------------------------------- PTX
# Elementwise (Triton may group any 4 elements of a thread into one call): input 4 code bytes
# in one register (pack=4 of uint8); output plane p, element i = code p of byte i, as fp16.
# prmt spreads bytes (0, 1) and (2, 3) into the low bytes of two fp16 pairs, so one lop3
# per plane and pair ORs the code bits into the mantissa of 1024.0 (0x6400).
_LOP = "lop3.b32 {d}, {s}, {m}, 0x64006400, 0xEA;"  # (s & m) | 0x6400_6400


def asm_codes(bits, exact, deq):
    """PTX: one word of 4 code bytes -> NP planes x 2 fp16x2 registers.
    exact: the codes themselves (fma by 2^-k, -1024 2^-k: exact); else 1024 + 2^k c (k = bits p).
    deq: then fma with the (ks, kz) pairs of args 1.. (2 registers each)."""
    np_ = 8 // bits
    nout = 2 * np_
    x = f"${nout}"
    lines = [".reg .b32 t<2>, z, s, b, a;", "mov.b32 z, 0;",
             f"prmt.b32 t0, {x}, z, 0x4140;", f"prmt.b32 t1, {x}, z, 0x4342;"]
    for p in range(8 // bits):
        m = _mask(bits, p)
        k = bits * p
        for half in range(2):
            o = 2 * p + half
            if not (exact or deq):
                lines.append(_LOP.format(d=f"${o}", s=f"t{half}", m=m))
                continue
            lines.append(_LOP.format(d="a", s=f"t{half}", m=m))
            lines += [f"mov.b32 s, {_h2(2.0 ** -k)};", f"mov.b32 b, {_h2(-1024.0 * 2.0 ** -k)};"]
            if deq:
                ks = nout + 1 + 4 * p + half        # args: x, (ks_p, kz_p) per plane, 2 regs each
                lines += ["fma.rn.f16x2 a, a, s, b;", f"fma.rn.f16x2 ${o}, a, ${ks}, ${ks + 2};"]
            else:
                lines.append(f"fma.rn.f16x2 ${o}, a, s, b;")
    return "{\n" + "\n".join(lines) + "\n}"


# ----------------------------------------------------------------------------- kernel
@triton.jit
def _page(kvb_ptr, kvh_ptr, bt_row, j, j_hi, h, stride_kb, stride_kh, t, e, CAP: tl.constexpr, W: tl.constexpr,
          D: tl.constexpr, NP: tl.constexpr):
    """Everything page j holds (masked past j_hi): codes [QT, W] x2, scales."""
    KS: tl.constexpr = 2 * CAP * W
    VS: tl.constexpr = KS + 4 * D
    b = tl.load(bt_row + j, mask=j < j_hi, other=0).to(tl.int64)
    pb = (b * stride_kb + h * stride_kh) * 2      # page byte offset
    hb = pb // 2                                 # page offset in fp16 units
    kx = tl.load(kvb_ptr + pb + t[:, None] * W + e[None, :])
    vx = tl.load(kvb_ptr + pb + CAP * W + t[:, None] * W + e[None, :])
    ks0 = tl.load(kvh_ptr + hb + KS // 2 + e)
    ks1 = tl.load(kvh_ptr + hb + KS // 2 + W + e)
    kz0 = tl.load(kvh_ptr + hb + KS // 2 + D + e)
    kz1 = tl.load(kvh_ptr + hb + KS // 2 + D + W + e)
    ks2 = ks0
    ks3 = ks0
    kz2 = kz0
    kz3 = kz0
    if NP == 4:
        ks2 = tl.load(kvh_ptr + hb + KS // 2 + 2 * W + e)
        ks3 = tl.load(kvh_ptr + hb + KS // 2 + 3 * W + e)
        kz2 = tl.load(kvh_ptr + hb + KS // 2 + D + 2 * W + e)
        kz3 = tl.load(kvh_ptr + hb + KS // 2 + D + 3 * W + e)
    vs = tl.load(kvh_ptr + hb + VS // 2 + t)
    vz = tl.load(kvh_ptr + hb + VS // 2 + CAP + t)
    return kx, vx, ks0, ks1, ks2, ks3, kz0, kz1, kz2, kz3, vs, vz


@triton.jit
def _bc(x, QT: tl.constexpr, W: tl.constexpr):
    return tl.broadcast_to(x[None, :], (QT, W))


@triton.jit
def _step(j, n_tok, kx, vx, ks0, ks1, ks2, ks3, kz0, kz1, kz2, kz3, vs, vz, qf0, qf1, qf2, qf3, q0, q1, q2, q3,
          m_i, l_i, a0, a1, a2, a3, t, CAP: tl.constexpr, QT: tl.constexpr, W: tl.constexpr, BITS: tl.constexpr,
          NP: tl.constexpr, KMODE: tl.constexpr, VMODE: tl.constexpr, ASM_K: tl.constexpr, ASM_V: tl.constexpr):
    valid = t < tl.minimum(CAP, n_tok - j * CAP)
    vs = tl.where(valid, vs.to(tl.float32), 0.0)  # rows past the page's tokens hold other bytes
    vz = tl.where(valid, vz.to(tl.float32), 0.0)
    if KMODE == 0:
        if NP == 2:
            k0, k1 = tl.inline_asm_elementwise(
                ASM_K, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r",
                [kx, _bc(ks0, QT, W), _bc(kz0, QT, W), _bc(ks1, QT, W), _bc(kz1, QT, W)],
                dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
            s = tl.dot(q0, tl.trans(k0)) + tl.dot(q1, tl.trans(k1))
        else:
            k0, k1, k2, k3 = tl.inline_asm_elementwise(
                ASM_K, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r",
                [kx, _bc(ks0, QT, W), _bc(kz0, QT, W), _bc(ks1, QT, W), _bc(kz1, QT, W),
                 _bc(ks2, QT, W), _bc(kz2, QT, W), _bc(ks3, QT, W), _bc(kz3, QT, W)],
                dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=4)
            s = tl.dot(q0, tl.trans(k0)) + tl.dot(q1, tl.trans(k1))
            s += tl.dot(q2, tl.trans(k2)) + tl.dot(q3, tl.trans(k3))
    else:
        # fold: q*KS per page (fp16), biased codes 1024 + 2^(bits p) c
        h0 = (qf0 * ks0.to(tl.float32)[None, :]).to(tl.float16)
        h1 = (qf1 * (ks1.to(tl.float32) * (1.0 / (1 << BITS)))[None, :]).to(tl.float16)
        bias = tl.sum(h0.to(tl.float32), 1) + tl.sum(h1.to(tl.float32), 1)
        zt = tl.sum(qf0 * kz0.to(tl.float32)[None, :], 1) + tl.sum(qf1 * kz1.to(tl.float32)[None, :], 1)
        if NP == 2:
            c0, c1 = tl.inline_asm_elementwise(ASM_K, "=r,=r,=r,=r,r", [kx], dtype=(tl.float16, tl.float16),
                                               is_pure=True, pack=4)
            s = tl.dot(h0, tl.trans(c0)) + tl.dot(h1, tl.trans(c1))
        else:
            h2 = (qf2 * (ks2.to(tl.float32) * (1.0 / (1 << 2 * BITS)))[None, :]).to(tl.float16)
            h3 = (qf3 * (ks3.to(tl.float32) * (1.0 / (1 << 3 * BITS)))[None, :]).to(tl.float16)
            bias += tl.sum(h2.to(tl.float32), 1) + tl.sum(h3.to(tl.float32), 1)
            zt += tl.sum(qf2 * kz2.to(tl.float32)[None, :], 1) + tl.sum(qf3 * kz3.to(tl.float32)[None, :], 1)
            c0, c1, c2, c3 = tl.inline_asm_elementwise(ASM_K, "=r,=r,=r,=r,=r,=r,=r,=r,r", [kx],
                                                       dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
                                                       is_pure=True, pack=4)
            s = tl.dot(h0, tl.trans(c0)) + tl.dot(h1, tl.trans(c1))
            s += tl.dot(h2, tl.trans(c2)) + tl.dot(h3, tl.trans(c3))
        s = s + (zt - 1024.0 * bias)[:, None]
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    pv = (p * vs[None, :]).to(tl.float16)
    z = tl.sum(p * vz[None, :], 1)
    zb = z * 0.0
    if VMODE == 0:  # biased planes: 1024 + 2^(bits p) c; a_p carries 2^(bits p), undone at the end
        zb = 1024.0 * tl.sum(pv.to(tl.float32), 1)
    if NP == 2:
        v0, v1 = tl.inline_asm_elementwise(ASM_V, "=r,=r,=r,=r,r", [vx], dtype=(tl.float16, tl.float16),
                                           is_pure=True, pack=4)
        a0 = a0 * alpha[:, None] + tl.dot(pv, v0) + (z - zb)[:, None]
        if VMODE == 0:
            a1 = a1 * alpha[:, None] + tl.dot(pv, v1) + ((1 << BITS) * z - zb)[:, None]
        else:
            a1 = a1 * alpha[:, None] + tl.dot(pv, v1) + z[:, None]
    else:
        v0, v1, v2, v3 = tl.inline_asm_elementwise(ASM_V, "=r,=r,=r,=r,=r,=r,=r,=r,r", [vx],
                                                   dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
                                                   is_pure=True, pack=4)
        if VMODE == 0:
            a0 = a0 * alpha[:, None] + tl.dot(pv, v0) + (z - zb)[:, None]
            a1 = a1 * alpha[:, None] + tl.dot(pv, v1) + (4.0 * z - zb)[:, None]
            a2 = a2 * alpha[:, None] + tl.dot(pv, v2) + (16.0 * z - zb)[:, None]
            a3 = a3 * alpha[:, None] + tl.dot(pv, v3) + (64.0 * z - zb)[:, None]
        else:
            a0 = a0 * alpha[:, None] + tl.dot(pv, v0) + z[:, None]
            a1 = a1 * alpha[:, None] + tl.dot(pv, v1) + z[:, None]
            a2 = a2 * alpha[:, None] + tl.dot(pv, v2) + z[:, None]
            a3 = a3 * alpha[:, None] + tl.dot(pv, v3) + z[:, None]
    return m_new, l_i, a0, a1, a2, a3


@triton.jit
def _q_kernel(q_ptr, kvb_ptr, kvh_ptr, bt_ptr, out_ptr, pacc_ptr, pml_ptr, n_tok, scale2, stride_kb, stride_kh,
              stride_bt, H_Q: tl.constexpr, D: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr,
              CAP: tl.constexpr, QT: tl.constexpr, BITS: tl.constexpr, KMODE: tl.constexpr, VMODE: tl.constexpr,
              NUM_SPLITS: tl.constexpr, STAGES: tl.constexpr, PF: tl.constexpr, ASM_K: tl.constexpr,
              ASM_V: tl.constexpr):
    """PF = 0: Triton's pipeliner (STAGES); PF = 1: page j+1 is loaded into registers while
    page j is computed (loads in flight across the whole step)."""
    r = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    NP: tl.constexpr = 8 // BITS
    W: tl.constexpr = D // NP          # channels per plane = bytes per code row
    offs_m = tl.arange(0, BLOCK_M)
    e = tl.arange(0, W)
    row_ok = offs_m < G
    hq = h * G + offs_m % G
    qb = r * (H_Q * D) + hq * D
    qf0 = tl.load(q_ptr + qb[:, None] + e[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32) * scale2
    qf1 = tl.load(q_ptr + qb[:, None] + W + e[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32) * scale2
    qf2 = qf0
    qf3 = qf0
    if NP == 4:
        qf2 = tl.load(q_ptr + qb[:, None] + 2 * W + e[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32) * scale2
        qf3 = tl.load(q_ptr + qb[:, None] + 3 * W + e[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32) * scale2
    q0 = qf0.to(tl.float16)
    q1 = qf1.to(tl.float16)
    q2 = qf2.to(tl.float16)
    q3 = qf3.to(tl.float16)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    a0 = tl.zeros([BLOCK_M, W], tl.float32)
    a1 = tl.zeros([BLOCK_M, W], tl.float32)
    a2 = tl.zeros([BLOCK_M, W], tl.float32)
    a3 = tl.zeros([BLOCK_M, W], tl.float32)
    bt_row = bt_ptr + r.to(tl.int64) * stride_bt
    npg = tl.cdiv(n_tok, CAP)
    per = tl.cdiv(npg, NUM_SPLITS)
    j_lo = split * per
    j_hi = tl.minimum(npg, j_lo + per)
    t = tl.arange(0, QT)
    if PF == 0:
        for j in tl.range(j_lo, j_hi, num_stages=STAGES):
            kx, vx, ks0, ks1, ks2, ks3, kz0, kz1, kz2, kz3, vs, vz = _page(
                kvb_ptr, kvh_ptr, bt_row, j, j_hi, h, stride_kb, stride_kh, t, e, CAP, W, D, NP)
            m_i, l_i, a0, a1, a2, a3 = _step(j, n_tok, kx, vx, ks0, ks1, ks2, ks3, kz0, kz1, kz2, kz3, vs, vz,
                                             qf0, qf1, qf2, qf3, q0, q1, q2, q3, m_i, l_i, a0, a1, a2, a3, t,
                                             CAP, QT, W, BITS, NP, KMODE, VMODE, ASM_K, ASM_V)
    else:
        kx, vx, ks0, ks1, ks2, ks3, kz0, kz1, kz2, kz3, vs, vz = _page(
            kvb_ptr, kvh_ptr, bt_row, j_lo, j_hi, h, stride_kb, stride_kh, t, e, CAP, W, D, NP)
        for j in tl.range(j_lo, j_hi, num_stages=1):
            nkx, nvx, nks0, nks1, nks2, nks3, nkz0, nkz1, nkz2, nkz3, nvs, nvz = _page(
                kvb_ptr, kvh_ptr, bt_row, j + 1, j_hi, h, stride_kb, stride_kh, t, e, CAP, W, D, NP)
            m_i, l_i, a0, a1, a2, a3 = _step(j, n_tok, kx, vx, ks0, ks1, ks2, ks3, kz0, kz1, kz2, kz3, vs, vz,
                                             qf0, qf1, qf2, qf3, q0, q1, q2, q3, m_i, l_i, a0, a1, a2, a3, t,
                                             CAP, QT, W, BITS, NP, KMODE, VMODE, ASM_K, ASM_V)
            kx, vx, ks0, ks1, ks2, ks3, kz0, kz1, kz2, kz3, vs, vz = (
                nkx, nvx, nks0, nks1, nks2, nks3, nkz0, nkz1, nkz2, nkz3, nvs, nvz)
    if VMODE == 0:
        a1 = a1 * (1.0 / (1 << BITS))
        a2 = a2 * (1.0 / (1 << 2 * BITS))
        a3 = a3 * (1.0 / (1 << 3 * BITS))
    prow = ((r * H_Q + hq) * NUM_SPLITS + split).to(tl.int64)
    tl.store(pacc_ptr + prow[:, None] * D + e[None, :], a0, mask=row_ok[:, None])
    tl.store(pacc_ptr + prow[:, None] * D + W + e[None, :], a1, mask=row_ok[:, None])
    if NP == 4:
        tl.store(pacc_ptr + prow[:, None] * D + 2 * W + e[None, :], a2, mask=row_ok[:, None])
        tl.store(pacc_ptr + prow[:, None] * D + 3 * W + e[None, :], a3, mask=row_ok[:, None])
    tl.store(pml_ptr + prow * 2, m_i, mask=row_ok)
    tl.store(pml_ptr + prow * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _asm_probe(x_ptr, o_ptr, R: tl.constexpr, N: tl.constexpr, ASM: tl.constexpr):
    offs = tl.arange(0, R)[:, None] * N + tl.arange(0, N)[None, :]
    x = tl.load(x_ptr + offs)
    a, b = tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r", [x], dtype=(tl.float16, tl.float16), is_pure=True,
                                     pack=4)
    tl.store(o_ptr + offs, tl.trans(tl.trans(a)))
    tl.store(o_ptr + R * N + offs, b)


def randomize_scales(c, bits):
    """Per-channel / per-token scales that differ (a wrong channel order must show)."""
    o = quant.page_offsets(bits, c.bs, c.d, 2)
    cap, d = o["cap"], c.d
    raw = c.kv.view(torch.uint8).view(c.kv.shape[0], c.hkv, -1)
    blocks = c.bt[:, : -(-c.ctx // cap)].reshape(-1).long()
    pages = raw[blocks]
    h = pages[..., o["ks"]: o["end"]].contiguous().view(torch.float16)
    gen = torch.Generator(device="cuda").manual_seed(1)
    qmax = (1 << bits) - 1
    rnd = lambda n: torch.rand(*h.shape[:-1], n, device="cuda", generator=gen)  # noqa: E731
    h[..., :d] = (0.5 + 2 * rnd(d)) / qmax
    h[..., d: 2 * d] = -1.5 * rnd(d)
    h[..., 2 * d: 2 * d + cap] = (0.5 + 2 * rnd(cap)) / qmax
    h[..., 2 * d + cap: 2 * d + 2 * cap] = -1.5 * rnd(cap)
    pages[..., o["ks"]: o["end"]] = h.view(torch.uint8)
    raw[blocks] = pages


def trial(name, go, out, ref, res, t_bf16, t_prod, do_bench):
    """Run one variant: error against the reference on 2 requests, median time, registers,
    and a census of the PTX it compiled to."""
    try:
        h = go()
        torch.cuda.synchronize()
        err = ((out[:2].float() - ref).norm() / ref.norm()).item()
        t = do_bench(go, warmup=30, rep=150, return_mode="median")
    except Exception as ex:  # noqa: BLE001
        print(name, "FAILED", type(ex).__name__, str(ex)[-1500:], flush=True)
        return
    regs, spills = getattr(h, "n_regs", -1), getattr(h, "n_spills", -1)
    ptx = h.asm.get("ptx", "")
    census = {k: ptx.count(k) for k in ("cp.async", "ld.global", "bar.sync", "ldmatrix", "mma.sync", "st.shared",
                                        "ld.shared", "prmt", "lop3", "cvt")}
    res[name] = dict(ms=t, err=err, regs=regs, spills=spills, vs_bf16=t_bf16 / t, vs_prod=t_prod / t, ptx=census)
    print(f"{name:34s} {t:.4f} ms  {t_bf16 / t:.2f}x of bf16  {t_prod / t:.2f}x of prod  err {err:.2e}  "
          f"regs {regs} spills {spills}  {census}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--production", action="store_true",
                    help="sweep quant_decode's tiling (PB, warps, stages) through paged_attention_batched")
    ap.add_argument("--tilings", default="2,2,3;2,2,2;4,4,3;1,1,3", help="--production: PB,warps,stages[,MIN_M];...")
    ap.add_argument("--qsplits", default="1,2,4", help="--production: forced split counts at each format's best tiling")
    args = ap.parse_args()
    sys.path.insert(0, "benchmarks")
    from bench_kernels import Decode  # noqa: E402
    from int4_variants import reference_planes  # noqa: E402
    from triton.testing import do_bench

    # the PTX's element order, checked on 4 known bytes per group
    x = (torch.arange(64 * 64, device="cuda") * 37 % 256).to(torch.uint8)
    o = torch.empty(2 * 64 * 64, device="cuda", dtype=torch.float16)
    _asm_probe[(1,)](x, o, R=64, N=64, ASM=asm_codes(4, True, False))
    lo, hi = o[:4096].float().cpu(), o[4096:].float().cpu()
    xs = x.cpu().int()
    print("asm lo ok:", bool((lo == (xs & 15).float()).all()), " hi ok:", bool((hi == (xs >> 4).float()).all()),
          flush=True)

    res = {}
    if args.production:
        production(res, Decode, do_bench, [tuple(map(int, x.split(','))) for x in args.tilings.split(';')],
                   [int(x) for x in args.qsplits.split(',') if x])
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
        return
    B, ctx = 64, 8192
    t_bf16 = _bf16_baseline(Decode, do_bench, res, B, ctx)
    scale2 = 128 ** -0.5 * 1.4426950408889634
    for bits in (4, 2):
        c = Decode(B, ctx, bits=bits)
        randomize_scales(c, bits)
        cap = quant.page_capacity(bits, c.bs, c.d, 2)
        qt = triton.next_power_of_2(cap)
        t_prod = do_bench(lambda: c.run(page_bits=(bits,)), warmup=30, rep=150, return_mode="median")
        res[f"prod int{bits}"] = dict(ms=t_prod, vs_bf16=t_bf16 / t_prod)
        print(f"production int{bits} {t_prod:.4f} ms ({t_bf16 / t_prod:.2f}x of bf16)", flush=True)
        ref = reference_planes(c, 2, bits)
        c.run(page_bits=(bits,))
        err_prod = ((c.out[:2].float() - ref).norm() / ref.norm()).item()
        print(f"  production err {err_prod:.2e}", flush=True)
        out = torch.empty_like(c.q)
        kvb, kvh, sk = c.kv.view(torch.uint8), c.kv.view(torch.float16), c.kv.stride()
        configs = []
        for kmode in (0, 1):
            for vmode in (0, 1):
                for pf, cfgs in ((0, ((4, 3), (2, 3), (4, 1))), (1, ((4, 1), (2, 1), (8, 1)))):
                    for warps, stages in cfgs:
                        configs.append((kmode, vmode, pf, 1, warps, stages))
        configs += [(0, 1, 1, 2, 4, 1), (0, 1, 1, 2, 2, 1)]
        if args.quick:
            configs = [(0, 1, 0, 1, 4, 3), (0, 1, 1, 1, 4, 1)]
        for kmode, vmode, pf, splits, warps, stages in configs:
            asm_k = asm_codes(bits, False, True) if kmode == 0 else asm_codes(bits, False, False)
            asm_v = asm_codes(bits, vmode == 1, False)
            pacc = torch.empty(B, c.hkv * c.g, splits, c.d, device="cuda", dtype=torch.float32)
            pml = torch.empty(B, c.hkv * c.g, splits, 2, device="cuda", dtype=torch.float32)

            def go():
                h = _q_kernel[(B, c.hkv, splits)](
                    c.q, kvb, kvh, c.bt, out, pacc, pml, ctx, scale2, sk[0], sk[1], c.bt.stride(0),
                    H_Q=c.hkv * c.g, D=c.d, G=c.g, BLOCK_M=16, CAP=cap, QT=qt, BITS=bits,
                    KMODE=kmode, VMODE=vmode, NUM_SPLITS=splits, STAGES=stages, PF=pf, ASM_K=asm_k,
                    ASM_V=asm_v, num_warps=warps)
                _reduce_kernel[(B, c.hkv * c.g)](pacc, pml, out, out, out.stride(0), out.stride(1),
                                                 H_Q=c.hkv * c.g, D=c.d, NUM_SPLITS=splits,
                                                 SPLITS_P2=triton.next_power_of_2(splits), WRITE_LSE=False)
                return h
            trial(f"int{bits} K{kmode} V{vmode} pf{pf} sp{splits} w{warps} s{stages}", go, out, ref, res,
                  t_bf16, t_prod, do_bench)
        del c
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


def _bf16_baseline(Decode, do_bench, res, B, ctx):
    """Decode over the same number of tokens in plain bf16 blocks."""
    base = Decode(B, ctx)
    t = do_bench(lambda: base.run(), warmup=50, rep=200, return_mode="median")
    res["bf16_ms"] = t
    print(f"bf16 live {t:.4f} ms", flush=True)
    return t


class _Grab:
    """Stands in for a kernel: launches it and keeps the compiled handle (registers, spills)."""

    def __init__(self, k):
        self.k, self.h = k, None

    def __getitem__(self, grid):
        def go(*a, **kw):
            self.h = self.k[grid](*a, **kw)
            return self.h
        return go


def production(res, Decode, do_bench, tilings, qsplits):
    """The shipped launch (quant_decode beside the fused forward) at 64 x 8192 tokens, per
    tiling (PB, warps, stages, MIN_M), against bf16 pages and against the fused
    forward alone (QRUN off); per-kernel device times of each through torch.profiler."""
    from bench_kernels import kernel_ms  # noqa: E402
    from int4_variants import reference_planes  # noqa: E402

    from vllm_kvcomp.triton_kernels import quant_decode as qd
    B, ctx = 64, 8192
    t_bf16 = _bf16_baseline(Decode, do_bench, res, B, ctx)
    shipped = (qd.PB, qd.NUM_WARPS, qd.STAGES, qd.MIN_M)
    kern = qd._qrun_kernel
    grab = _Grab(kern)
    qd._qrun_kernel = grab
    for bits in (4, 2, 8):
        c = Decode(B, ctx, bits=bits)
        randomize_scales(c, bits)
        ref = reference_planes(c, 2, bits)
        t_old = do_bench(lambda: c.run(page_bits=(bits,), config={"QRUN": False}), warmup=30, rep=150,
                         return_mode="median")
        c.run(page_bits=(bits,), config={"QRUN": False})
        err_old = ((c.out[:2].float() - ref).norm() / ref.norm()).item()
        res[f"int{bits} fused only"] = dict(ms=t_old, err=err_old, vs_bf16=t_bf16 / t_old)
        print(f"int{bits} fused forward alone {t_old:.4f} ms ({t_bf16 / t_old:.2f}x of bf16) err {err_old:.2e}",
              flush=True)
        best = (1e9, None)
        for tiling in tilings:
            pb, warps, stages, mm = (tuple(tiling) + (shipped[3],))[:4]
            qd.PB, qd.NUM_WARPS, qd.STAGES, qd.MIN_M = pb, warps, stages, mm
            name = f"int{bits} qrun PB{pb} w{warps} s{stages} M{mm}"
            try:
                c.run(page_bits=(bits,))
                torch.cuda.synchronize()
                err = ((c.out[:2].float() - ref).norm() / ref.norm()).item()
                t = do_bench(lambda: c.run(page_bits=(bits,)), warmup=30, rep=150, return_mode="median")
                kt = kernel_ms(lambda: c.run(page_bits=(bits,)))
            except Exception as ex:  # noqa: BLE001
                print(name, "FAILED", type(ex).__name__, str(ex)[-800:], flush=True)
                continue
            regs, spills = getattr(grab.h, "n_regs", -1), getattr(grab.h, "n_spills", -1)
            res[name] = dict(ms=t, err=err, vs_bf16=t_bf16 / t, vs_fused=t_old / t, regs=regs, spills=spills,
                             kernels=kt)
            print(f"{name:40s} {t:.4f} ms  {t_bf16 / t:.2f}x of bf16  {t_old / t:.2f}x of fused  err {err:.2e}"
                  f"  regs {regs} spills {spills}  " + " ".join(f"{k.split('(')[0]}={v:.4f}" for k, v in kt.items()),
                  flush=True)
            if t < best[0]:
                best = (t, (pb, warps, stages, mm))
        if best[1] is None:
            continue
        qd.PB, qd.NUM_WARPS, qd.STAGES, qd.MIN_M = best[1]
        auto = qd.qrun_splits
        for n in qsplits:
            qd.qrun_splits = lambda *a, n=n: n  # noqa: E731
            t = do_bench(lambda: c.run(page_bits=(bits,)), warmup=30, rep=150, return_mode="median")
            res[f"int{bits} best {best[1]} qsplits{n}"] = dict(ms=t, vs_bf16=t_bf16 / t)
            print(f"int{bits} best {best[1]} qsplits={n} (auto {auto(132, B * c.hkv, c.max_seq, quant.capacities(c.kv), (bits,))}) "
                  f"{t:.4f} ms  {t_bf16 / t:.2f}x of bf16", flush=True)
        qd.qrun_splits = auto
        del c
    qd._qrun_kernel = kern
    qd.PB, qd.NUM_WARPS, qd.STAGES, qd.MIN_M = shipped


if __name__ == "__main__":
    main()
