#!/usr/bin/env python3
"""Exploration: why are int4 pages slower than bf16 pages at decode? Variants of the inner
loop over one run of int4 pages, timed against the production kernel on the same bytes.

Layout "halves" (candidate page format): channel c's code in byte c % (D/2), low nibble for
c < D/2, high nibble otherwise -- unpacking is `b & 15` / `b >> 4`, no join/reshape.
KMODE  0 fold q*KS as hi+lo (2 dots per half)  1 fold hi only  2 dequant K (fp32 fma) -> bf16
VMODE  0 fold p*VS into the dot, + sum(p*VZ)   1 dequant V -> bf16
SWAP   1: scores as K.q^T (K is the A operand: no transpose of the quantized tile)
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import triton
import triton.language as tl

from vllm_kvcomp.ops import quant


import os
_F32 = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")  # the interpreter's bf16 dots are wrong


@triton.jit
def _d(a, b):
    if _F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _codes(x):
    return ((x | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True) - 128.0).to(tl.bfloat16)


@triton.jit
def _var_kernel(q_ptr, kvb_ptr, kvh_ptr, bt_ptr, out_ptr, n_tok, scale2, stride_kb, stride_kh, stride_bt,
                H_Q: tl.constexpr, D: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, CAP: tl.constexpr,
                QT: tl.constexpr, KMODE: tl.constexpr, VMODE: tl.constexpr, SWAP: tl.constexpr):
    r = tl.program_id(0)
    h = tl.program_id(1)
    D2: tl.constexpr = D // 2
    ROW: tl.constexpr = D // 2
    KS: tl.constexpr = 2 * CAP * ROW
    VS: tl.constexpr = KS + 4 * D
    offs_m = tl.arange(0, BLOCK_M)
    offs_h = tl.arange(0, D2)
    row_ok = offs_m < G
    hq = h * G + offs_m % G
    qb = r * (H_Q * D) + hq * D
    q_lo = tl.load(q_ptr + qb[:, None] + offs_h[None, :], mask=row_ok[:, None], other=0.0)
    q_hi = tl.load(q_ptr + qb[:, None] + D2 + offs_h[None, :], mask=row_ok[:, None], other=0.0)
    qf_lo = q_lo.to(tl.float32)
    qf_hi = q_hi.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc_lo = tl.zeros([BLOCK_M, D2], tl.float32)
    acc_hi = tl.zeros([BLOCK_M, D2], tl.float32)
    bt_row = bt_ptr + r.to(tl.int64) * stride_bt
    t = tl.arange(0, QT)
    for j in range(0, tl.cdiv(n_tok, CAP)):
        b = tl.load(bt_row + j).to(tl.int64)
        pb = (b * stride_kb + h * stride_kh) * 2
        valid = t < tl.minimum(CAP, n_tok - j * CAP)
        kb = tl.load(kvb_ptr + pb + t[:, None] * ROW + offs_h[None, :], mask=valid[:, None], other=0).to(tl.int32)
        vb = tl.load(kvb_ptr + pb + CAP * ROW + t[:, None] * ROW + offs_h[None, :], mask=valid[:, None],
                     other=0).to(tl.int32)
        hb = pb // 2
        ks_lo = tl.load(kvh_ptr + hb + KS // 2 + offs_h).to(tl.float32)
        ks_hi = tl.load(kvh_ptr + hb + KS // 2 + D2 + offs_h).to(tl.float32)
        kz_lo = tl.load(kvh_ptr + hb + KS // 2 + D + offs_h).to(tl.float32)
        kz_hi = tl.load(kvh_ptr + hb + KS // 2 + D + D2 + offs_h).to(tl.float32)
        vs = tl.load(kvh_ptr + hb + VS // 2 + t, mask=valid, other=0.0).to(tl.float32)
        vz = tl.load(kvh_ptr + hb + VS // 2 + CAP + t, mask=valid, other=0.0).to(tl.float32)
        if KMODE == 2:
            k_lo = ((kb & 15).to(tl.float32) * ks_lo[None, :] + kz_lo[None, :]).to(tl.bfloat16)
            k_hi = ((kb >> 4).to(tl.float32) * ks_hi[None, :] + kz_hi[None, :]).to(tl.bfloat16)
            if SWAP:
                st = _d(k_lo, tl.trans(q_lo)) + _d(k_hi, tl.trans(q_hi))
                s = tl.trans(st)
            else:
                s = _d(q_lo, tl.trans(k_lo)) + _d(q_hi, tl.trans(k_hi))
        else:
            c_lo = _codes(kb & 15)
            c_hi = _codes(kb >> 4)
            qs_lo = qf_lo * ks_lo[None, :]
            qs_hi = qf_hi * ks_hi[None, :]
            h_lo = qs_lo.to(tl.bfloat16)
            h_hi = qs_hi.to(tl.bfloat16)
            if SWAP:
                st = _d(c_lo, tl.trans(h_lo)) + _d(c_hi, tl.trans(h_hi))
                if KMODE == 0:
                    st += _d(c_lo, tl.trans((qs_lo - h_lo.to(tl.float32)).to(tl.bfloat16)))
                    st += _d(c_hi, tl.trans((qs_hi - h_hi.to(tl.float32)).to(tl.bfloat16)))
                s = tl.trans(st)
            else:
                s = _d(h_lo, tl.trans(c_lo)) + _d(h_hi, tl.trans(c_hi))
                if KMODE == 0:
                    s += _d((qs_lo - h_lo.to(tl.float32)).to(tl.bfloat16), tl.trans(c_lo))
                    s += _d((qs_hi - h_hi.to(tl.float32)).to(tl.bfloat16), tl.trans(c_hi))
            s += (tl.sum(qf_lo * kz_lo[None, :], 1) + tl.sum(qf_hi * kz_hi[None, :], 1))[:, None]
        s = tl.where(valid[None, :], s * scale2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        if VMODE == 0:
            pv = (p * vs[None, :]).to(tl.bfloat16)
            z = tl.sum(p * vz[None, :], 1)[:, None]
            acc_lo = acc_lo * alpha[:, None] + _d(pv, _codes(vb & 15)) + z
            acc_hi = acc_hi * alpha[:, None] + _d(pv, _codes(vb >> 4)) + z
        else:
            v_lo = ((vb & 15).to(tl.float32) * vs[:, None] + vz[:, None]).to(tl.bfloat16)
            v_hi = ((vb >> 4).to(tl.float32) * vs[:, None] + vz[:, None]).to(tl.bfloat16)
            pb16 = p.to(tl.bfloat16)
            acc_lo = acc_lo * alpha[:, None] + _d(pb16, v_lo)
            acc_hi = acc_hi * alpha[:, None] + _d(pb16, v_hi)
    ob = r * (H_Q * D) + hq * D
    tl.store(out_ptr + ob[:, None] + offs_h[None, :], (acc_lo / l_i[:, None]).to(tl.bfloat16), mask=row_ok[:, None])
    tl.store(out_ptr + ob[:, None] + D2 + offs_h[None, :], (acc_hi / l_i[:, None]).to(tl.bfloat16),
             mask=row_ok[:, None])


def reference(c, n_req):
    """fp32 attention of the first n_req requests over their int4 pages read as 'halves'."""
    d, bs, hkv, g = c.d, c.bs, c.hkv, c.g
    cap = quant.page_capacity(4, bs, d, 2)
    o = quant.page_offsets(4, bs, d, 2)
    row = d // 2
    npg = -(-c.ctx // cap)
    outs = []
    raw = c.kv.view(torch.uint8).view(c.kv.shape[0], hkv, -1)
    for r in range(n_req):
        pages = raw[c.bt[r, :npg].long()]  # [npg, hkv, P]
        kc = pages[..., : cap * row].reshape(npg, hkv, cap, row).int()
        vc = pages[..., cap * row: 2 * cap * row].reshape(npg, hkv, cap, row).int()
        kc = torch.cat([kc & 15, kc >> 4], -1).float()
        vc = torch.cat([vc & 15, vc >> 4], -1).float()
        hh = pages[..., o["ks"]: o["end"]].contiguous().view(torch.float16).float()
        ks, kz = hh[..., :d], hh[..., d: 2 * d]
        vs, vz = hh[..., 2 * d: 2 * d + cap], hh[..., 2 * d + cap: 2 * d + 2 * cap]
        k = kc * ks[:, :, None, :] + kz[:, :, None, :]
        v = vc * vs[..., None] + vz[..., None]
        k = k.permute(1, 0, 2, 3).reshape(hkv, npg * cap, d)[:, : c.ctx]
        v = v.permute(1, 0, 2, 3).reshape(hkv, npg * cap, d)[:, : c.ctx]
        q = c.q[r].float().view(hkv, g, d)
        p = torch.softmax(q @ k.transpose(1, 2) * d ** -0.5, -1)
        outs.append((p @ v).reshape(hkv * g, d))
    return torch.stack(outs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--round2", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, "benchmarks")
    from bench_kernels import Decode  # noqa: E402
    from triton.testing import do_bench

    res = {}
    B, ctx = 64, 8192
    base = Decode(B, ctx)
    t_bf16 = do_bench(lambda: base.run(), warmup=50, rep=200, return_mode="median")
    del base
    c = Decode(B, ctx, bits=4)
    t_prod = do_bench(lambda: c.run(page_bits=(4,)), warmup=50, rep=200, return_mode="median")
    res["bf16_live_ms"], res["prod_int4_ms"] = t_bf16, t_prod
    print(f"bf16 live {t_bf16:.4f} ms   production int4 {t_prod:.4f} ms ({t_bf16 / t_prod:.2f}x)", flush=True)
    if "--round2" in sys.argv:
        round2(res, t_bf16)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
        return
    cap = quant.page_capacity(4, c.bs, c.d, 2)
    ref = reference(c, 2)
    out = torch.empty_like(c.q)
    kvb = c.kv.view(torch.uint8)
    kvh = c.kv.view(torch.float16)
    sk = c.kv.stride()
    scale2 = c.d ** -0.5 * 1.4426950408889634
    for kmode in (0, 1, 2):
        for vmode in (0, 1):
            for swap in (0, 1):
                for warps, stages in ((4, 2), (4, 3), (2, 2), (8, 2)):
                    name = f"K{kmode} V{vmode} swap{swap} w{warps} s{stages}"
                    try:
                        def go():
                            return _var_kernel[(B, c.hkv)](
                                c.q, kvb, kvh, c.bt, out, ctx, scale2, sk[0], sk[1], c.bt.stride(0),
                                H_Q=c.hkv * c.g, D=c.d, G=c.g, BLOCK_M=16, CAP=cap, QT=64, KMODE=kmode,
                                VMODE=vmode, SWAP=swap, num_warps=warps, num_stages=stages)
                        h = go()
                        torch.cuda.synchronize()
                        err = ((out[:2].float() - ref).norm() / ref.norm()).item()
                        t = do_bench(go, warmup=30, rep=150, return_mode="median")
                    except Exception as e:  # noqa: BLE001
                        print(name, "FAILED", type(e).__name__, str(e)[-600:], flush=True)
                        continue
                    regs, spills = getattr(h, "n_regs", -1), getattr(h, "n_spills", -1)
                    res[name] = dict(ms=t, err=err, regs=regs, spills=spills, vs_bf16=t_bf16 / t)
                    print(f"{name:28s} {t:.4f} ms  {t_bf16 / t:.2f}x of bf16  err {err:.2e}  regs {regs} "
                          f"spills {spills}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)



# ----------------------------------------------------------------------------- round 2
# Generic "planes" format: channel c at byte c % ROW, bits (c // ROW) * BITS (ROW = D*BITS/8).
# Any of int8/int4/int2 is read as four quarters of D/4 channels, each a plain mask/shift of
# loaded bytes: four accumulators [M, D/4], four dots per tile and side.
@triton.jit
def _quarters(ptr, row_off, valid, D4: tl.constexpr, BITS: tl.constexpr):
    offs = tl.arange(0, D4)
    b0 = tl.load(ptr + row_off[:, None] + offs[None, :], mask=valid[:, None], other=0).to(tl.int32)
    if BITS == 8:
        b1 = tl.load(ptr + row_off[:, None] + D4 + offs[None, :], mask=valid[:, None], other=0).to(tl.int32)
        b2 = tl.load(ptr + row_off[:, None] + 2 * D4 + offs[None, :], mask=valid[:, None], other=0).to(tl.int32)
        b3 = tl.load(ptr + row_off[:, None] + 3 * D4 + offs[None, :], mask=valid[:, None], other=0).to(tl.int32)
        return b0, b1, b2, b3
    elif BITS == 4:
        b1 = tl.load(ptr + row_off[:, None] + D4 + offs[None, :], mask=valid[:, None], other=0).to(tl.int32)
        return b0 & 15, b1 & 15, b0 >> 4, b1 >> 4
    else:
        return b0 & 3, (b0 >> 2) & 3, (b0 >> 4) & 3, b0 >> 6


@triton.jit
def _cq(x, BITS: tl.constexpr):
    """codes -> exact small integers in bf16 (magic OR for <= 4 bits; int8 via fp32)."""
    if BITS == 8:
        return x.to(tl.float32).to(tl.bfloat16)
    else:
        return _codes(x)


@triton.jit
def _deq(c, s, z, KMODE: tl.constexpr, BITS: tl.constexpr):
    if KMODE == 3:
        return (_cq(c, BITS).to(tl.float32) * s + z).to(tl.bfloat16)
    else:
        return (c.to(tl.float32) * s + z).to(tl.bfloat16)


@triton.jit
def _var2_kernel(q_ptr, kvb_ptr, kvh_ptr, bt_ptr, out_ptr, pacc_ptr, pml_ptr, n_tok, scale2, stride_kb, stride_kh,
                 stride_bt, H_Q: tl.constexpr, D: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr,
                 CAP: tl.constexpr, QT: tl.constexpr, BITS: tl.constexpr, KMODE: tl.constexpr, PPT: tl.constexpr,
                 NUM_SPLITS: tl.constexpr):
    r = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    D4: tl.constexpr = D // 4
    ROW: tl.constexpr = D * BITS // 8
    KS: tl.constexpr = 2 * CAP * ROW
    VS: tl.constexpr = KS + 4 * D
    offs_m = tl.arange(0, BLOCK_M)
    o4 = tl.arange(0, D4)
    row_ok = offs_m < G
    hq = h * G + offs_m % G
    qb = r * (H_Q * D) + hq * D
    q0 = tl.load(q_ptr + qb[:, None] + o4[None, :], mask=row_ok[:, None], other=0.0)
    q1 = tl.load(q_ptr + qb[:, None] + D4 + o4[None, :], mask=row_ok[:, None], other=0.0)
    q2 = tl.load(q_ptr + qb[:, None] + 2 * D4 + o4[None, :], mask=row_ok[:, None], other=0.0)
    q3 = tl.load(q_ptr + qb[:, None] + 3 * D4 + o4[None, :], mask=row_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    a0 = tl.zeros([BLOCK_M, D4], tl.float32)
    a1 = tl.zeros([BLOCK_M, D4], tl.float32)
    a2 = tl.zeros([BLOCK_M, D4], tl.float32)
    a3 = tl.zeros([BLOCK_M, D4], tl.float32)
    bt_row = bt_ptr + r.to(tl.int64) * stride_bt
    npg = tl.cdiv(n_tok, CAP)
    per = tl.cdiv(tl.cdiv(npg, NUM_SPLITS), PPT) * PPT
    j_lo = split * per
    j_hi = tl.minimum(npg, j_lo + per)
    t = tl.arange(0, PPT * QT)
    slot = t % QT
    sub = t // QT
    for j in range(j_lo, j_hi, PPT):
        ent = j + sub
        e_ok = ent < j_hi
        b = tl.load(bt_row + ent, mask=e_ok, other=0).to(tl.int64)
        pb = (b * stride_kb + h * stride_kh) * 2
        valid = e_ok & (slot < tl.minimum(CAP, n_tok - ent * CAP))
        hb = pb // 2
        if PPT == 1:
            bs0 = tl.load(bt_row + j).to(tl.int64)
            hb0 = (bs0 * stride_kb + h * stride_kh)
            ks0 = tl.load(kvh_ptr + hb0 + KS // 2 + o4)[None, :].to(tl.float32)
            ks1 = tl.load(kvh_ptr + hb0 + KS // 2 + D4 + o4)[None, :].to(tl.float32)
            ks2 = tl.load(kvh_ptr + hb0 + KS // 2 + 2 * D4 + o4)[None, :].to(tl.float32)
            ks3 = tl.load(kvh_ptr + hb0 + KS // 2 + 3 * D4 + o4)[None, :].to(tl.float32)
            kz0 = tl.load(kvh_ptr + hb0 + KS // 2 + D + o4)[None, :].to(tl.float32)
            kz1 = tl.load(kvh_ptr + hb0 + KS // 2 + D + D4 + o4)[None, :].to(tl.float32)
            kz2 = tl.load(kvh_ptr + hb0 + KS // 2 + D + 2 * D4 + o4)[None, :].to(tl.float32)
            kz3 = tl.load(kvh_ptr + hb0 + KS // 2 + D + 3 * D4 + o4)[None, :].to(tl.float32)
        else:
            # per-token rows of the page's scales (gather; the rows of one page hit L1)
            base = hb[:, None] + KS // 2 + o4[None, :]
            ks0 = tl.load(kvh_ptr + base, mask=e_ok[:, None], other=0.0).to(tl.float32)
            ks1 = tl.load(kvh_ptr + base + D4, mask=e_ok[:, None], other=0.0).to(tl.float32)
            ks2 = tl.load(kvh_ptr + base + 2 * D4, mask=e_ok[:, None], other=0.0).to(tl.float32)
            ks3 = tl.load(kvh_ptr + base + 3 * D4, mask=e_ok[:, None], other=0.0).to(tl.float32)
            kz0 = tl.load(kvh_ptr + base + D, mask=e_ok[:, None], other=0.0).to(tl.float32)
            kz1 = tl.load(kvh_ptr + base + D + D4, mask=e_ok[:, None], other=0.0).to(tl.float32)
            kz2 = tl.load(kvh_ptr + base + D + 2 * D4, mask=e_ok[:, None], other=0.0).to(tl.float32)
            kz3 = tl.load(kvh_ptr + base + D + 3 * D4, mask=e_ok[:, None], other=0.0).to(tl.float32)
        c0, c1, c2, c3 = _quarters(kvb_ptr, pb + slot * ROW, valid, D4, BITS)
        s = _d(q0, tl.trans(_deq(c0, ks0, kz0, KMODE, BITS)))
        s += _d(q1, tl.trans(_deq(c1, ks1, kz1, KMODE, BITS)))
        s += _d(q2, tl.trans(_deq(c2, ks2, kz2, KMODE, BITS)))
        s += _d(q3, tl.trans(_deq(c3, ks3, kz3, KMODE, BITS)))
        vs = tl.load(kvh_ptr + hb + VS // 2 + slot, mask=valid, other=0.0).to(tl.float32)
        vz = tl.load(kvh_ptr + hb + VS // 2 + CAP + slot, mask=valid, other=0.0).to(tl.float32)
        s = tl.where(valid[None, :], s * scale2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        pv = (p * vs[None, :]).to(tl.bfloat16)
        z = tl.sum(p * vz[None, :], 1)[:, None]
        v0, v1, v2, v3 = _quarters(kvb_ptr, pb + CAP * ROW + slot * ROW, valid, D4, BITS)
        a0 = a0 * alpha[:, None] + _d(pv, _cq(v0, BITS)) + z
        a1 = a1 * alpha[:, None] + _d(pv, _cq(v1, BITS)) + z
        a2 = a2 * alpha[:, None] + _d(pv, _cq(v2, BITS)) + z
        a3 = a3 * alpha[:, None] + _d(pv, _cq(v3, BITS)) + z
    if NUM_SPLITS == 1:
        ob = r * (H_Q * D) + hq * D
        lsafe = tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + ob[:, None] + o4[None, :], (a0 / lsafe).to(tl.bfloat16), mask=row_ok[:, None])
        tl.store(out_ptr + ob[:, None] + D4 + o4[None, :], (a1 / lsafe).to(tl.bfloat16), mask=row_ok[:, None])
        tl.store(out_ptr + ob[:, None] + 2 * D4 + o4[None, :], (a2 / lsafe).to(tl.bfloat16), mask=row_ok[:, None])
        tl.store(out_ptr + ob[:, None] + 3 * D4 + o4[None, :], (a3 / lsafe).to(tl.bfloat16), mask=row_ok[:, None])
    else:
        prow = ((r * H_Q + hq) * NUM_SPLITS + split).to(tl.int64)
        tl.store(pacc_ptr + prow[:, None] * D + o4[None, :], a0, mask=row_ok[:, None])
        tl.store(pacc_ptr + prow[:, None] * D + D4 + o4[None, :], a1, mask=row_ok[:, None])
        tl.store(pacc_ptr + prow[:, None] * D + 2 * D4 + o4[None, :], a2, mask=row_ok[:, None])
        tl.store(pacc_ptr + prow[:, None] * D + 3 * D4 + o4[None, :], a3, mask=row_ok[:, None])
        tl.store(pml_ptr + prow * 2, m_i, mask=row_ok)
        tl.store(pml_ptr + prow * 2 + 1, l_i, mask=row_ok)


def reference_planes(c, n_req, bits):
    """fp32 attention of the first n_req requests over their pages at ``bits``, read by the
    format's reference (quant.read_pages: planes, and int4/int2's pair order)."""
    d, hkv, g = c.d, c.hkv, c.g
    cap = quant.page_capacity(bits, c.bs, d, 2)
    npg = -(-c.ctx // cap)
    outs = []
    for r in range(n_req):
        k, v = quant.read_pages(c.kv, c.bt[r, :npg], bits)  # [npg, hkv, cap, d]
        k = k.permute(1, 0, 2, 3).reshape(hkv, -1, d)[:, : c.ctx]
        v = v.permute(1, 0, 2, 3).reshape(hkv, -1, d)[:, : c.ctx]
        q = c.q[r].float().view(hkv, g, d)
        p = torch.softmax(q @ k.transpose(1, 2) * d ** -0.5, -1)
        outs.append((p @ v).reshape(hkv * g, d))
    return torch.stack(outs)


def round2(res, t_bf16):
    sys.path.insert(0, "benchmarks")
    from bench_kernels import Decode  # noqa: E402
    from triton.testing import do_bench
    B, ctx = 64, 8192
    scale2 = 128 ** -0.5 * 1.4426950408889634
    for bits in (4, 2, 8):
        c = Decode(B, ctx, bits=bits)
        cap = quant.page_capacity(bits, c.bs, c.d, 2)
        qt = triton.next_power_of_2(cap)
        t_prod = do_bench(lambda: c.run(page_bits=(bits,)), warmup=30, rep=150, return_mode="median")
        res[f"r2 prod int{bits}"] = dict(ms=t_prod, vs_bf16=t_bf16 / t_prod)
        print(f"r2 production int{bits} {t_prod:.4f} ms ({t_bf16 / t_prod:.2f}x)", flush=True)
        ref = reference_planes(c, 2, bits)
        out = torch.empty_like(c.q)
        kvb, kvh, sk = c.kv.view(torch.uint8), c.kv.view(torch.float16), c.kv.stride()
        for kmode in (2, 3):
            for ppt in (1, 2):
                if qt * ppt > 128 and ppt > 1:
                    continue
                for splits in (1, 2, 4):
                    for warps, stages in ((4, 2), (4, 3), (8, 2)):
                        name = f"r2 int{bits} K{kmode} ppt{ppt} sp{splits} w{warps} s{stages}"
                        pacc = torch.empty(B, c.hkv * c.g, splits, c.d, device="cuda", dtype=torch.float32)
                        pml = torch.empty(B, c.hkv * c.g, splits, 2, device="cuda", dtype=torch.float32)
                        try:
                            def go():
                                return _var2_kernel[(B, c.hkv, splits)](
                                    c.q, kvb, kvh, c.bt, out, pacc, pml, ctx, scale2, sk[0], sk[1], c.bt.stride(0),
                                    H_Q=c.hkv * c.g, D=c.d, G=c.g, BLOCK_M=16, CAP=cap, QT=qt, BITS=bits,
                                    KMODE=kmode, PPT=ppt, NUM_SPLITS=splits, num_warps=warps, num_stages=stages)
                            h = go()
                            torch.cuda.synchronize()
                            if splits == 1:
                                o2 = out[:2].float()
                            else:
                                m, l = pml[:2, ..., 0], pml[:2, ..., 1]
                                w = torch.exp2(m - m.max(-1, keepdim=True).values)
                                o2 = (pacc[:2] * w[..., None]).sum(2) / (w * l).sum(-1)[..., None]
                            err = ((o2 - ref).norm() / ref.norm()).item()
                            t = do_bench(go, warmup=30, rep=150, return_mode="median")
                        except Exception as e:  # noqa: BLE001
                            print(name, "FAILED", type(e).__name__, str(e)[-600:], flush=True)
                            continue
                        regs, spills = getattr(h, "n_regs", -1), getattr(h, "n_spills", -1)
                        res[name] = dict(ms=t, err=err, regs=regs, spills=spills, vs_bf16=t_bf16 / t,
                                         vs_prod=t_prod / t)
                        print(f"{name:36s} {t:.4f} ms  {t_bf16 / t:.2f}x of bf16  {t_prod / t:.2f}x of prod  "
                              f"err {err:.2e}  regs {regs} spills {spills}", flush=True)
        del c


if __name__ == "__main__":
    main()
