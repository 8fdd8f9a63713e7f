"""Decode attention over a request's run of quantized pages (int8/int4/int2), as its own
launch beside paged_attention._fwd_kernel.

Semantics: the part of ``vllm_kvcomp.ops.quant.paged_attention_mixed`` that reads the
quantized pages of a compacted region shaped as compaction writes it -- ``[full pages]
[pages all at one precision]`` (docs/page_format.md). The forward kernel reads the full
pages and the live blocks and skips that run; both write flash-decoding partials (running
max, sum, unnormalised output) into the same per-row slots, and paged_attention's
_reduce_kernel merges them. Rows whose region has another shape (or no quantized page)
write an empty partial here and are read whole by the forward's per-page dispatch.

Why a launch of its own: the fused forward's quantized loop converted every code on its
own (one 32-bit register per byte, ~6-8 instructions per code) inside a kernel that also
carries the full-precision and any-order paths (~250 registers per thread), and decode
over quantized pages stayed at ~0.56 ms for 64 x 8192 tokens whatever the bits, slower
than bf16 pages (0.50 ms) on an H200. Here (benchmarks/probe_packed.py, docs/kernels.md):

* codes reach the dots as fp16 pairs through inline PTX, 4 code bytes at a time. Keys
  (per plane): ``prmt`` spreads bytes (0, 1) and (2, 3) into two 32-bit words, one
  ``lop3`` ORs the plane's code bits into the mantissa of 1024.0 (0x6400), one
  ``fma.f16x2`` makes the codes exact and one more applies the per-channel scale and zero
  (fp16, one rounding). Values (every plane in one block): one ``prmt`` per pair puts each
  byte under an 0x64 byte, one ``and`` per plane keeps its bits -- 1024 + 2^(bits p) code,
  exact; the dot's offset 1024 sum(p VS) comes off per page (kept across pages it cost
  accuracy) and the plane's scale at the end;
* small programs: one warp, one page a step, query tiles of G rows (Triton pads the MMA),
  so the row reductions stay inside the warp and more programs share each SM (the per-page
  chain of instructions, not bytes, bounds this loop: ~1,750 SASS instructions per int4
  page per warp, benchmarks/sass_census.py). Tiles are 3-D, [PB, ...] with batched dots:
  PB pages a step, one per warp, each with its own online softmax merged at the end (PB =
  2 measured slower; constants below).

Values fold their per-token scale into p: o += (p * VS) . codes + sum(p * VZ). The query
(times the softmax scale) is fp16 for the key dots; fp32 caches do not come here.
Under the interpreter (F32) codes are unpacked with plain shifts and masks in fp32.

On GPUs the run is read by this kernel's CUDA twin instead (csrc/quant_decode.cu, bottom of
this file: launcher, NVRTC build, fallback here): same partials, ~950 instead of ~1,750
instructions per int4 page, and its last program per row merges the partials itself. On a
Hopper it is launched first and the forward beside it (PDL, below). int4 decode 3.0x of
bf16 pages on an H100 (2.2x here), 2.76x on an H200 (1.5x here; docs/kernels.md).
"""
from __future__ import annotations

import ctypes
import functools
import logging
import math
import os
from pathlib import Path

import torch
import triton
import triton.language as tl

from .paged_attention import PAIR_BS, _code_byte, _dot, _scan_compacted, _value_row


# ----------------------------------------------------------------------------- PTX
def _h2(v: float) -> str:
    u = torch.tensor([v], dtype=torch.float16).view(torch.int16).item() & 0xFFFF
    return f"0x{u:04X}{u:04X}"


def _mask(bits: int, p: int) -> str:
    """lop3 mask of plane p's code bits in both halves of an fp16 pair."""
    m = ((1 << bits) - 1) << (bits * p)
    return f"0x{m | m << 16:08X}"


def _ptx(bits: int, p: int) -> str:
    """Plane p of 4 key code bytes ($2, pack=4 of uint8) -> two fp16x2 registers ($0, $1):
    code * ks + kz (args $3..$6, fp16 pairs), the code made exact first so the result is
    rounded once. Elementwise: element i of the output is code p of byte i (Triton may
    group any 4 elements of a thread)."""
    mask = _mask(bits, p)
    k = bits * p
    lines = [".reg .b32 t<2>, z, s, b, a;", "mov.b32 z, 0;",
             "prmt.b32 t0, $2, z, 0x4140;",            # bytes 0, 1 -> the low bytes of two halves
             "prmt.b32 t1, $2, z, 0x4342;",            # bytes 2, 3
             f"mov.b32 s, {_h2(2.0 ** -k)};", f"mov.b32 b, {_h2(-1024.0 * 2.0 ** -k)};"]
    for half in range(2):
        lines += [f"lop3.b32 a, t{half}, {mask}, 0x64006400, 0xEA;",   # (t & mask) | 1024.0
                  "fma.rn.f16x2 a, a, s, b;",                           # (1024 + 2^k c) 2^-k - 1024 2^-k = c
                  f"fma.rn.f16x2 ${half}, a, ${3 + half}, ${5 + half};"]
    return "{\n" + "\n".join(lines) + "\n}"


def _ptx_planes(bits: int) -> str:
    """Every plane of 4 value code bytes ($X, pack=4 of uint8) at once -> two fp16x2
    registers per plane ($2p, $2p+1) holding 1024 + 2^(bits p) code, exact in fp16 (the
    caller removes the offset and the scale). One prmt per pair puts each byte under an
    0x64 byte (fp16 1024 + byte); one and per plane keeps its bits. Elementwise."""
    np_ = 8 // bits
    lines = [".reg .b32 t<2>, c;", "mov.b32 c, 0x64646464;",
             f"prmt.b32 t0, ${2 * np_}, c, 0x4140;",   # bytes 0, 1 under 0x64: 1024 + byte, two halves
             f"prmt.b32 t1, ${2 * np_}, c, 0x4342;"]   # bytes 2, 3
    for p in range(np_):
        m = ((1 << bits) - 1) << (bits * p)
        for half in range(2):
            if bits == 8:
                lines.append(f"mov.b32 ${2 * p + half}, t{half};")
            else:
                lines.append(f"and.b32 ${2 * p + half}, t{half}, 0x{(m | 0x6400) * 0x10001:08X};")
    return "{\n" + "\n".join(lines) + "\n}"


_K8_0 = tl.constexpr(_ptx(8, 0))
_K4_0 = tl.constexpr(_ptx(4, 0))
_K4_1 = tl.constexpr(_ptx(4, 1))
_K2_0 = tl.constexpr(_ptx(2, 0))
_K2_1 = tl.constexpr(_ptx(2, 1))
_K2_2 = tl.constexpr(_ptx(2, 2))
_K2_3 = tl.constexpr(_ptx(2, 3))
_V8 = tl.constexpr(_ptx_planes(8))
_V4 = tl.constexpr(_ptx_planes(4))
_V2 = tl.constexpr(_ptx_planes(2))


@triton.jit
def _asm(x, ks, kz, ASM: tl.constexpr):
    return tl.inline_asm_elementwise(ASM, "=r,=r,r,r,r,r,r", [x, ks, kz], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def _key_deq(x, ks, kz, BITS: tl.constexpr, P: tl.constexpr, F32: tl.constexpr):
    """Plane P of the key code bytes x dequantized: codes * ks + kz (fp16; fp32 under the interpreter)."""
    if F32:
        c = ((x.to(tl.int32) >> (BITS * P)) & ((1 << BITS) - 1)).to(tl.float32)
        return c * ks.to(tl.float32) + kz.to(tl.float32)
    elif BITS == 8:
        return _asm(x, ks, kz, _K8_0)
    elif BITS == 4:
        if P == 0:
            return _asm(x, ks, kz, _K4_0)
        else:
            return _asm(x, ks, kz, _K4_1)
    else:
        if P == 0:
            return _asm(x, ks, kz, _K2_0)
        elif P == 1:
            return _asm(x, ks, kz, _K2_1)
        elif P == 2:
            return _asm(x, ks, kz, _K2_2)
        else:
            return _asm(x, ks, kz, _K2_3)


@triton.jit
def _value_codes(x, BITS: tl.constexpr, F32: tl.constexpr):
    """Every plane P of the value code bytes x (uint8) as 1024 + 2^(BITS P) codes -> (plane
    0, 1, 2, 3), unused planes repeat plane 0. fp16 on the GPU; fp32 under the interpreter
    (shifts and masks)."""
    if F32:
        xi = x.to(tl.int32)
        m: tl.constexpr = (1 << BITS) - 1
        c0 = ((xi & m) + 1024).to(tl.float32)
        c1 = c0
        c2 = c0
        c3 = c0
        if BITS <= 4:
            c1 = ((xi & (m << BITS)) + 1024).to(tl.float32)
        if BITS == 2:
            c2 = ((xi & (m << 2 * BITS)) + 1024).to(tl.float32)
            c3 = ((xi & (m << 3 * BITS)) + 1024).to(tl.float32)
        return c0, c1, c2, c3
    elif BITS == 8:
        c0 = tl.inline_asm_elementwise(_V8, "=r,=r,r", [x], dtype=tl.float16, is_pure=True, pack=4)
        return c0, c0, c0, c0
    elif BITS == 4:
        c0, c1 = tl.inline_asm_elementwise(_V4, "=r,=r,=r,=r,r", [x], dtype=(tl.float16, tl.float16),
                                           is_pure=True, pack=4)
        return c0, c1, c0, c0
    else:
        c0, c1, c2, c3 = tl.inline_asm_elementwise(_V2, "=r,=r,=r,=r,=r,=r,=r,=r,r", [x],
                                                   dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
                                                   is_pure=True, pack=4)
        return c0, c1, c2, c3


@triton.jit
def _q_plane(q_ptr, q_off, row_ok, scale2, P: tl.constexpr, W: tl.constexpr, PB: tl.constexpr,
             BLOCK_M: tl.constexpr, F32: tl.constexpr):
    """q's channels [P*W, (P+1)*W) times the softmax scale (fp16), one copy per page of a step."""
    e = tl.arange(0, W)
    q = tl.load(q_ptr + q_off[:, None] + P * W + e[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    q = q * scale2
    if not F32:
        q = q.to(tl.float16)
    return tl.broadcast_to(q[None, :, :], (PB, BLOCK_M, W))


@triton.jit
def _key_plane(q, kx, kvh_ptr, sc, P: tl.constexpr, BITS: tl.constexpr, W: tl.constexpr, D: tl.constexpr,
               PB: tl.constexpr, QT: tl.constexpr, F32: tl.constexpr):
    """Scores of plane P's channels [P*W, (P+1)*W): q [PB, M, W] . K^T [PB, W, QT]."""
    ks = tl.broadcast_to(tl.load(kvh_ptr + sc + P * W)[:, None, :], (PB, QT, W))       # per channel
    kz = tl.broadcast_to(tl.load(kvh_ptr + sc + D + P * W)[:, None, :], (PB, QT, W))
    k = _key_deq(kx, ks, kz, BITS, P, F32)
    return _dot(q, tl.permute(k, (0, 2, 1)), F32)


@triton.jit
def _value_plane(a, al, pv, off, v, F32: tl.constexpr):
    """a * al + p . V's plane, v = 1024 + 2^(BITS P) codes: the page's offset 1024 sum(pv)
    comes off before the page joins a (kept across pages it cost accuracy), the plane's
    scale 2^(BITS P) at the end."""
    return a * al + (_dot(pv, v, F32) - off)


@triton.jit
def _qrun(q_ptr, q_off, row_ok, kvb_ptr, kvh_ptr, bt_row, h, stride_kb, stride_kh, j_lo, j_hi, jbase, n_tok,
          scale2, BITS: tl.constexpr, CAP: tl.constexpr, QT: tl.constexpr, PB: tl.constexpr, D: tl.constexpr,
          BLOCK_M: tl.constexpr, STAGES: tl.constexpr, F32: tl.constexpr, PAIRED: tl.constexpr):
    """Pages [j_lo, j_hi) of a run that starts at entry jbase and holds n_tok tokens (each
    page full but the last), PB pages a step. Returns the merged (acc [M, D], m [M], l [M])."""
    NP: tl.constexpr = 8 // BITS
    W: tl.constexpr = D // NP          # channels of a plane = bytes of a code row
    KS: tl.constexpr = 2 * CAP * W     # page byte offsets (quant.page_offsets)
    VS: tl.constexpr = KS + 4 * D
    e = tl.arange(0, W)
    t = tl.arange(0, QT)
    pg = tl.arange(0, PB)
    q0 = _q_plane(q_ptr, q_off, row_ok, scale2, 0, W, PB, BLOCK_M, F32)
    q1 = q0
    q2 = q0
    q3 = q0
    if NP >= 2:
        q1 = _q_plane(q_ptr, q_off, row_ok, scale2, 1, W, PB, BLOCK_M, F32)
    if NP == 4:
        q2 = _q_plane(q_ptr, q_off, row_ok, scale2, 2, W, PB, BLOCK_M, F32)
        q3 = _q_plane(q_ptr, q_off, row_ok, scale2, 3, W, PB, BLOCK_M, F32)
    m_i = tl.full([PB, BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([PB, BLOCK_M], tl.float32)
    z_i = tl.zeros([PB, BLOCK_M], tl.float32)     # sum p * VZ: the values' zero-points, added at the end
    a0 = tl.zeros([PB, BLOCK_M, W], tl.float32)
    a1 = a0
    a2 = a0
    a3 = a0
    for j0 in tl.range(j_lo, j_hi, PB, num_stages=STAGES):
        j = j0 + pg
        b = tl.load(bt_row + j, mask=j < j_hi, other=0).to(tl.int64)
        hb = b * stride_kb + h * stride_kh                  # page start, in 2-byte units
        # PAIRED bytes gathered from their pair order (paged_attention._code_byte; in
        # registers instead, one GPU test of the forward failed: docs/kernels.md)
        rows = hb[:, None, None] * 2 + t[None, :, None] * W + _code_byte(e, PAIRED, False)[None, None, :]
        valid = (t[None, :] < tl.minimum(CAP, n_tok - (j - jbase)[:, None] * CAP)) & (j < j_hi)[:, None]
        kx = tl.load(kvb_ptr + rows)                        # [PB, QT, W] key code bytes
        sc = hb[:, None] + KS // 2 + e[None, :]
        s = _key_plane(q0, kx, kvh_ptr, sc, 0, BITS, W, D, PB, QT, F32)
        if NP >= 2:
            s += _key_plane(q1, kx, kvh_ptr, sc, 1, BITS, W, D, PB, QT, F32)
        if NP == 4:
            s += _key_plane(q2, kx, kvh_ptr, sc, 2, BITS, W, D, PB, QT, F32)
            s += _key_plane(q3, kx, kvh_ptr, sc, 3, BITS, W, D, PB, QT, F32)
        # rows past a page's tokens: clamped to its last scale (stays in the page), zeroed
        vsz = hb[:, None] + VS // 2 + tl.minimum(t, CAP - 1)[None, :]
        vs = tl.where(valid, tl.load(kvh_ptr + vsz).to(tl.float32), 0.0)
        vz = tl.where(valid, tl.load(kvh_ptr + vsz + CAP).to(tl.float32), 0.0)
        s = tl.where(valid[:, None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 2))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, :, None])
        l_i = l_i * alpha + tl.sum(p, 2)
        m_i = m_new
        z_i = z_i * alpha + tl.sum(p * vz[:, None, :], 2)
        pv = p * vs[:, None, :]
        if not F32:
            pv = pv.to(tl.float16)
        off = (1024.0 * tl.sum(pv.to(tl.float32), 2))[:, :, None]   # the codes' offset, as the dots see pv
        al = alpha[:, :, None]
        vrows = _value_row(hb[:, None, None] * 2, t[None, :, None], PAIRED, CAP, W) + _code_byte(e, PAIRED, True)
        vx = tl.load(kvb_ptr + vrows)                       # [PB, QT, W] value code bytes
        v0, v1, v2, v3 = _value_codes(vx, BITS, F32)
        a0 = _value_plane(a0, al, pv, off, v0, F32)
        if NP >= 2:
            a1 = _value_plane(a1, al, pv, off, v1, F32)
        if NP == 4:
            a2 = _value_plane(a2, al, pv, off, v2, F32)
            a3 = _value_plane(a3, al, pv, off, v3, F32)
    # merge the PB pages' softmax states; each plane's scale 2^(BITS P) off, zero-points on,
    # planes back to channel order
    m = tl.max(m_i, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(m_i - m_safe[None, :])
    l = tl.sum(w * l_i, 0)
    w3 = w[:, :, None]
    z = tl.sum(w * z_i, 0)[:, None]
    acc = tl.sum(a0 * w3, 0) + z
    if NP == 2:
        acc1 = tl.sum(a1 * w3, 0) * (1.0 / (1 << BITS)) + z
        acc = tl.reshape(tl.permute(tl.join(acc, acc1), (0, 2, 1)), (BLOCK_M, D))
    if NP == 4:
        acc1 = tl.sum(a1 * w3, 0) * (1.0 / (1 << BITS)) + z
        acc2 = tl.sum(a2 * w3, 0) * (1.0 / (1 << (2 * BITS))) + z
        acc3 = tl.sum(a3 * w3, 0) * (1.0 / (1 << (3 * BITS))) + z
        acc = tl.reshape(tl.permute(tl.join(tl.join(acc, acc2), tl.join(acc1, acc3)), (0, 2, 3, 1)),
                         (BLOCK_M, D))  # planes 0 1 2 3
    return acc, m, l


@triton.jit
def _qrun_kernel(q_ptr, kvb_ptr, kvh_ptr, tag_ptr, bt_ptr, qsl_ptr, kept_ptr, pacc_ptr, pml_ptr,
                 scale2, max_blocks, stride_qt, stride_qh, stride_kb, stride_kh, stride_bt,
                 H_Q: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr,
                 PSPLITS: tl.constexpr, SPLIT0: tl.constexpr, QSPLITS: tl.constexpr,
                 HAS8: tl.constexpr, HAS4: tl.constexpr, HAS2: tl.constexpr,
                 CAP8: tl.constexpr, CAP4: tl.constexpr, CAP2: tl.constexpr,
                 QT8: tl.constexpr, QT4: tl.constexpr, QT2: tl.constexpr, PB: tl.constexpr, STAGES: tl.constexpr,
                 SCAN: tl.constexpr, F32: tl.constexpr):
    """Program (request, KV head, split of the run's pages): writes partial SPLIT0 + split."""
    r = tl.program_id(0)
    h = tl.program_id(1)
    qs = tl.program_id(2)
    q_start = tl.load(qsl_ptr + r)
    q_len = tl.load(qsl_ptr + r + 1) - q_start
    if q_len == 0:
        return
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < G
    hq = h * G + offs_m % G
    q_off = q_start.to(tl.int64) * stride_qt + hq * stride_qh
    bt_row = bt_ptr + r.to(tl.int64) * stride_bt
    kept = tl.load(kept_ptr + r)
    nc, nf, qbits, sorted_ok = _scan_compacted(bt_row, tag_ptr, kept, max_blocks, BS, CAP8, CAP4, CAP2, SCAN)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    if sorted_ok & (qbits != 0):
        n_q = kept - nf * BS
        per = tl.cdiv(tl.cdiv(nc - nf, QSPLITS), PB) * PB
        j_lo = nf + qs * per
        j_hi = tl.minimum(nc, j_lo + per)
        if HAS4:
            if qbits == 4:
                acc, m, l = _qrun(q_ptr, q_off, row_ok, kvb_ptr, kvh_ptr, bt_row, h, stride_kb, stride_kh, j_lo,
                                  j_hi, nf, n_q, scale2, 4, CAP4, QT4, PB, D, BLOCK_M, STAGES, F32, BS == PAIR_BS)
        if HAS2:
            if qbits == 2:
                acc, m, l = _qrun(q_ptr, q_off, row_ok, kvb_ptr, kvh_ptr, bt_row, h, stride_kb, stride_kh, j_lo,
                                  j_hi, nf, n_q, scale2, 2, CAP2, QT2, PB, D, BLOCK_M, STAGES, F32, BS == PAIR_BS)
        if HAS8:
            if qbits == 8:
                acc, m, l = _qrun(q_ptr, q_off, row_ok, kvb_ptr, kvh_ptr, bt_row, h, stride_kb, stride_kh, j_lo,
                                  j_hi, nf, n_q, scale2, 8, CAP8, QT8, PB, D, BLOCK_M, STAGES, F32, False)
    prow = (q_start.to(tl.int64) * H_Q + hq) * PSPLITS + SPLIT0 + qs
    tl.store(pacc_ptr + prow[:, None] * D + offs_d[None, :], acc, mask=row_ok[:, None])
    tl.store(pml_ptr + prow * 2, m, mask=row_ok)
    tl.store(pml_ptr + prow * 2 + 1, l, mask=row_ok)


# ----------------------------------------------------------------------------- launch
# VLLM_KVCOMP_QRUN=0 leaves the runs to the fused forward (A/B runs end to end; the
# launcher's config={"QRUN": False} does the same per call).
ENABLED = os.environ.get("VLLM_KVCOMP_QRUN", "1") != "0"
# Tiling, measured on an H200 at 64 x 8192 tokens through the launcher (probe_packed.py
# --production, docs/kernels.md): one page a step in one-warp programs, 3 pipeline stages,
# query tiles of G rows -- int4 0.319 ms, int2 0.278, int8 0.452; 16-row query tiles 0.356 /
# 0.338 / 0.486; two pages a step (one per warp) 0.340 / 0.305 / 0.464; two warps a page
# 0.66 / 0.56 / 0.73 (the fused forward: 0.562 / 0.563 / 0.938; bf16 pages 0.490).
PB = 1
NUM_WARPS = 1
STAGES = 3
MIN_M = 4       # rows of the query tile: G padded up to it (Triton pads the MMA's 16 rows)


def _in_page(bits: int, BS: int, D: int, es: int) -> bool:
    """The tile reads QT = pow2(cap) rows of codes without a mask (whole rows, no predicate;
    the masked version of the probe was slower, though not by that alone: docs/kernels.md):
    rows past the page's tokens must still lie inside the page."""
    from vllm_kvcomp.ops.quant import page_bytes, page_offsets

    o = page_offsets(bits, BS, D, es)
    return (o["cap"] + triton.next_power_of_2(o["cap"])) * o["row"] <= page_bytes(BS, D, es)


def supported(D: int, BS: int, dtype: torch.dtype, page_bits: tuple[int, ...]) -> bool:
    """Whether this launch can read the runs of these formats: fp16/bf16 caches, a plane of
    >= 16 channels (the smallest dot), pages of <= 128 tokens (one tile) read in-page."""
    return ENABLED and _supported(D, BS, dtype, page_bits)


@functools.lru_cache(maxsize=None)
def _supported(D: int, BS: int, dtype: torch.dtype, page_bits: tuple[int, ...]) -> bool:
    from vllm_kvcomp.ops.quant import page_capacity  # (once per shape: decode runs per layer)

    if dtype not in (torch.float16, torch.bfloat16) or not page_bits:
        return False
    es = torch.empty((), dtype=dtype).element_size()
    return all(D // (8 // b) >= 16 and page_capacity(b, BS, D, es) <= 128 and _in_page(b, BS, D, es)
               for b in page_bits)


def qrun_splits(num_sms: int, rows: int, max_seq_len: int, caps: dict[int, int], page_bits, per_sm: int = 4) -> int:
    """Splits of a run's pages: enough programs for per_sm per SM, but >= 2 steps per split."""
    pages = -(-max_seq_len // min(caps[b] for b in page_bits))
    return max(1, min(-(-per_sm * num_sms // max(1, rows)), pages // (2 * PB), 32))


# ----------------------------------------------------------------------------- CUDA twin
# csrc/quant_decode.cu: the same partials from a CUDA kernel (mma.sync fed straight from
# vector loads; why: its header, docs/kernels.md). Built at first use per shape by NVRTC
# (torch.cuda._compile_kernel), no toolkit needed. VLLM_KVCOMP_QRUN_CUDA=0 keeps the Triton
# kernel above (A/B runs; it is also the CPU/interpreter path and the fallback).
CUDA = os.environ.get("VLLM_KVCOMP_QRUN_CUDA", "1") != "0"
# Measured on the H200 and H100 (benchmarks/quant_decode_cuda.py, docs/kernels.md): 2 pages in
# shared memory per warp (one in flight while one is read), registers capped for 12 warps
# per SM (3 stages: 9 programs an SM, two waves, slower).
CUDA_STAGES = 2
CUDA_MINB = 12       # __launch_bounds__'s minimum blocks per SM (caps the registers)
CUDA_NIDS = 256      # block ids of a row's first entries kept in shared memory (loaded with the row's
#                      metadata: no round trip to memory for them before the first page's copy)
# Splits: enough programs that, each reading at its own pace, together they could draw
# CUDA_BW_FRACTION of the memory's peak bandwidth -- not all the programs that fit: each
# program pays a start (its region's scan, the query) and each split a partial to merge.
# A warp alone on its SM sub-partition reads runs at CUDA_PROGRAM_GBPS (H200 at 1980 MHz,
# 1 split at 64 x 8192). What it chooses, and what was measured there (int4, 64 x 8192):
# the H100 (3.35 TB/s) 1 split (0.2140 ms; 2 splits 0.2181, 3 0.2245), at 16 x 32768 4
# splits (8: 3% slower, 12: 7%); the H200 (4.9 TB/s) 2 splits (0.163 ms; 1 split 0.196),
# and 2 for int8 and int2 too (int8 7% and int2 20% faster than 1 split).
CUDA_PROGRAM_GBPS = {8: 7.3, 4: 5.75, 2: 3.9}
CUDA_BW_FRACTION = 0.8
CUDA_PER_SM = None   # sweeps: a fixed aim of programs per SM instead (0: as many as fit)
# Programmatic dependent launch (sm_90+): the twin goes first and the forward (live blocks,
# full pages: ~0.012 ms of 64 x 8192 int4 decode on an H200) runs beside its one wave
# instead of before it; the last program of a row, the twin's or the forward's, merges.
# VLLM_KVCOMP_QRUN_PDL=0: the forward first, then the twin (A/B runs; GPUs before Hopper).
PDL = os.environ.get("VLLM_KVCOMP_QRUN_PDL", "1") != "0"
CUDA_CARVEOUT = -1   # the kernel's preferred shared-memory carveout in percent; -1: the driver's choice
# A/B knobs of the twin, off: each measured on the H200 (docs/kernels.md, "When each program
# runs") and checked against the reference on a GPU (test_cuda_twin_variants).
# CHAINS (quant_decode_cuda.py --sweep's 5th field; +1.5% in one run, 0 in the next): 1 = a
# page's score dots start from zero and its common part c comes from two chains of dots, not
# one. Its measurements included int4 reloading 6 spilled values every page; since the
# merge's sum changed (add_outputs, 2026-12-03) nvcc keeps them out of the loop (16 bytes
# stored before it), unmeasured.
CUDA_CHAINS = 0
# PIPE (6th field; int4 +1.5%, int2 +4%, one run): 1 = the next page's key dots are computed
# in the same step as this page's softmax and value dots, so a warp has two pages'
# independent work to interleave; it needs 3 shared-memory slots (8 programs an SM fit).
CUDA_PIPE = 0
# STEAL (7th field; 0 to -5%: the programs that lag share an SM, not a row): > 0 = the run's
# pages go out in chunks of CUDA_STEAL pages to whichever program of the row asks first,
# instead of in fixed splits (probe_timeline.py: equal programs ended 110-166 us apart).
CUDA_STEAL = 0
# (Two more ways to even out the ends were measured slower and are not in the tree, only in
# docs/kernels_runs/h200_tail_pool_variants.patch: chunks of any row's last pages to any
# program, 2.38-2.64x; a block of warps sharing an SM's pages, 2.57-2.71x. The SMs already end
# together; balanced warps pay more cycles a page. docs/kernels.md, "Evening out the ends".)
# EARLY (8th field, PDL builds only; no gain in the benchmark): 1 = the twin is launched as
# the programmatic dependent of the kernel before it, so that its start (metadata, scan)
# runs while that kernel ends; it waits (griddepcontrol.wait) before the query and its writes.
CUDA_EARLY = 0
# ZQUAD (9th field; ready, not yet run on a GPU): 1 = the page's common score part takes the
# key zero-points' words as loaded (a quad of two k-tiles as the mma's A operand, two dots),
# not a quad (kz, kz, kz', kz') built by ~4 register copies a k-tile (~45 of int4's 61
# IMAD.MOV a page). nvcc: int4 802 -> 760 SASS instructions a page, int2 1130 -> 1105, int8
# 565 -> 545, no spills; its operand order checked by simulating the mma (docs/kernels.md).
CUDA_ZQUAD = 0
# probe builds only (benchmarks/probe_timeline.py): > 0 = the twin records when each of that
# many programs passes its phases
CUDA_TIMELINE = 0
_CU = Path(__file__).resolve().parent.parent / "csrc" / "quant_decode.cu"
_log = logging.getLogger(__name__)


def cuda_supported(q: torch.Tensor, D: int, BS: int, G: int, page_bits: tuple[int, ...]) -> bool:
    """Whether the CUDA twin reads these runs: a GPU with mma.sync/cp.async (sm_80+), head
    dims 64/128, a KV group of <= 8 query heads (the mma's 8 columns), pages of <= 128
    tokens (the kernel keeps a page's scores in registers) and a kernel that compiled.
    Blocks of 16 tokens only: the size its GPU tests and measurements ran at (larger
    blocks compile, some with spills, but take the Triton kernel until tested)."""
    return _cuda_if(q, D, BS, G, page_bits) is not None


def _cuda_if(q: torch.Tensor, D: int, BS: int, G: int, page_bits: tuple[int, ...]):
    """The twin's launcher where it applies (cuda_supported), else None."""
    if not (CUDA and q.is_cuda and D in (64, 128) and G <= 8 and BS == 16):
        return None
    return _cuda_for(q, D, BS, page_bits)


def _cuda_for(q: torch.Tensor, D: int, BS: int, page_bits: tuple[int, ...]):
    dev = q.device.index if q.device.index is not None else torch.cuda.current_device()
    stages = max(CUDA_STAGES, 3) if CUDA_PIPE else CUDA_STAGES
    return _cuda_kernel(D, BS, q.element_size(), tuple(sorted(page_bits)), q.dtype == torch.bfloat16, dev, stages,
                        CUDA_MINB, CUDA_CARVEOUT, pdl(q), CUDA_CHAINS, CUDA_PIPE, CUDA_TIMELINE, CUDA_STEAL,
                        bool(CUDA_EARLY) and pdl(q), CUDA_ZQUAD)


def pdl(q: torch.Tensor) -> bool:
    """Whether the twin runs first with the forward as its programmatic dependent: PDL on,
    a Hopper or later GPU, and a Triton that launches with the attribute."""
    return PDL and q.is_cuda and _pdl_device(q.device.index if q.device.index is not None
                                               else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _pdl_device(device: int) -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra.cuda import gdc_wait  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0) and "launch_pdl" in CUDAOptions.__dataclass_fields__


def cuda_source(D: int, BS: int, es: int, page_bits: tuple[int, ...], qbf16: bool, stages: int, minb: int,
                pdl: bool = False, chains: int = 0, pipe: int = 0, timeline: int = 0, steal: int = 0,
                zquad: int = 0) -> str:
    """csrc/quant_decode.cu with this shape's #defines in front (what NVRTC compiles)."""
    from vllm_kvcomp.ops.quant import page_bytes, page_capacity

    caps = {b: page_capacity(b, BS, D, es) for b in (8, 4, 2)}
    defs = dict(D=D, BS=BS, P=page_bytes(BS, D, es), CAP8=caps[8], CAP4=caps[4], CAP2=caps[2],
                HAS8=int(8 in page_bits), HAS4=int(4 in page_bits), HAS2=int(2 in page_bits), STAGES=stages,
                QBF16=int(qbf16), MINB=minb, PDL=int(pdl), CHAINS=int(chains), PIPE=int(pipe), NIDS=CUDA_NIDS,
                TIMELINE=int(timeline), STEAL=int(steal), ZQUAD=int(zquad))
    return "".join(f"#define {k} {v}\n" for k, v in defs.items()) + _CU.read_text()


# NVRTC compiles in "JIT mode", where an unannotated function (the .cu's dispatch lambda) is
# host code unless -default-device; nvcc (the register test) does not need it.
NVRTC_OPTIONS = ("-std=c++17", "-default-device")


@functools.lru_cache(maxsize=None)
def _cuda_kernel(D: int, BS: int, es: int, page_bits: tuple[int, ...], qbf16: bool, device: int, stages: int,
                 minb: int, carveout: int = -1, pdl: bool = False, chains: int = 0, pipe: int = 0, timeline: int = 0,
                 steal: int = 0, early: bool = False, zquad: int = 0):
    """The launcher of this shape's kernel, or None (logged once) where it cannot be built."""
    from vllm_kvcomp.ops.quant import page_capacity

    if torch.cuda.get_device_capability(device) < (8, 0) or any(page_capacity(b, BS, D, es) > 128
                                                                 for b in page_bits):
        return None
    src = cuda_source(D, BS, es, page_bits, qbf16, stages, minb, pdl, chains, pipe, timeline, steal, zquad)
    P = BS * 2 * D * es
    cc = "".join(map(str, torch.cuda.get_device_capability(device)))
    try:
        with torch.cuda.device(device):
            kernel = torch.cuda._compile_kernel(src, "qrun", compute_capability=cc, nvcc_options=list(NVRTC_OPTIONS))
            smem = stages * P + 4 * CUDA_NIDS
            if smem >= 48 * 1024:
                kernel.set_shared_memory_config(smem)
        launcher = _Launcher(kernel.func, smem, carveout, early)
        launcher.module = kernel.module  # (the timeline probe reads a global of it)
    except Exception as ex:  # noqa: BLE001 -- no NVRTC, an old torch: the Triton kernel reads the runs
        _log.warning("vllm-kvcomp: CUDA quant_decode unavailable (%s: %s); using the Triton kernel",
                     type(ex).__name__, str(ex)[:500])
        return None
    return launcher


class _LaunchAttributeValue(ctypes.Union):  # CUlaunchAttributeValue (64 bytes)
    _fields_ = [("pad", ctypes.c_char * 64), ("u32", ctypes.c_uint)]


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", _LaunchAttributeValue)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttribute)), ("numAttrs", ctypes.c_uint)]


class _Launcher:
    """cuLaunchKernel with the argument block built once: torch's NVRTC wrapper rebuilds it
    through ctypes on every call (~0.2 ms of host time per launch seen on the H200, longer
    than the kernel); here a call sets 27 values in place."""

    # q, kvb, tags, block_table, query_start_loc, kept, pacc, pml, counters, out, lse | scale2 | 15 ints
    TYPES = [ctypes.c_void_p] * 11 + [ctypes.c_double] + [ctypes.c_int] * 15

    def __init__(self, func, smem: int, carveout: int = -1, early: bool = False):
        self.func, self.smem = func, smem
        self.lib = ctypes.CDLL("libcuda.so.1")
        self.config = None
        if early:  # cuLaunchKernelEx with CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION (6) = 1
            self.attr = _LaunchAttribute(id=6)
            self.attr.value.u32 = 1
            self.config = _LaunchConfig(blockDimX=32, blockDimY=1, blockDimZ=1, sharedMemBytes=smem,
                                        attrs=ctypes.pointer(self.attr), numAttrs=1)
        if carveout >= 0:  # CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT
            self.lib.cuFuncSetAttribute(func, 9, carveout)
        n = ctypes.c_int(0)
        self.lib.cuOccupancyMaxActiveBlocksPerMultiprocessor(ctypes.byref(n), func, 32, ctypes.c_size_t(smem))
        self.per_sm = max(1, n.value)
        self.vals = [t() for t in self.TYPES]
        self.argv = (ctypes.c_void_p * len(self.vals))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p)
                                                         for v in self.vals])

    def __call__(self, grid: tuple[int, int, int], args: list) -> None:
        for v, a in zip(self.vals, args):
            v.value = a.data_ptr() if isinstance(a, torch.Tensor) else a
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        if self.config is not None:
            c = self.config
            c.gridDimX, c.gridDimY, c.gridDimZ, c.hStream = grid[0], grid[1], grid[2], stream
            err = self.lib.cuLaunchKernelEx(ctypes.byref(c), self.func, self.argv, None)
        else:
            err = self.lib.cuLaunchKernel(self.func, grid[0], grid[1], grid[2], 32, 1, 1, self.smem, stream,
                                          self.argv, None)
        if err != 0:
            raise RuntimeError(f"quant_decode CUDA launch failed: CUresult {err}")


@functools.lru_cache(maxsize=None)
def peak_bandwidth(device: int) -> float:
    """The GPU's peak memory bandwidth in bytes/s (2 x memory clock x bus width, from the
    driver); 0.0 where the driver does not say."""
    lib, v, d = ctypes.CDLL("libcuda.so.1"), ctypes.c_int(0), ctypes.c_int(0)
    if lib.cuDeviceGet(ctypes.byref(d), device) != 0:  # (driver ordinals follow CUDA_VISIBLE_DEVICES too)
        return 0.0
    got = []
    # CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE (kHz), CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH (bits)
    for attr in (36, 37):
        if lib.cuDeviceGetAttribute(ctypes.byref(v), attr, d) != 0:
            return 0.0
        got.append(v.value)
    return 2.0 * got[0] * 1e3 * got[1] / 8


def plan(q: torch.Tensor, *, D: int, BS: int, G: int, rows: int, longest: int, caps: dict[int, int],
         page_bits: tuple[int, ...], num_sms: int) -> tuple[str, int]:
    """(kernel, splits) of the run's own launch: the CUDA twin where it applies, else
    _qrun_kernel. The caller sizes the partials with the splits, then calls launch."""
    cuda = _cuda_if(q, D, BS, G, page_bits)
    if cuda is not None:
        rows = max(1, rows)
        if CUDA_PER_SM is not None:
            want = (min(CUDA_PER_SM, cuda.per_sm) if CUDA_PER_SM else cuda.per_sm) * num_sms // rows
        else:
            bw = peak_bandwidth(q.device.index if q.device.index is not None else torch.cuda.current_device())
            rate = min(CUDA_PROGRAM_GBPS[b] for b in page_bits) * 1e9
            want = math.ceil(CUDA_BW_FRACTION * bw / rate / rows) if bw else 4 * num_sms // rows
        # at most one wave: every program resident at once, equal splits end together
        return "cuda", max(1, min(want, cuda.per_sm * num_sms // rows,
                                  qrun_splits(num_sms, rows, longest, caps, page_bits, per_sm=1 << 20)))
    return "triton", qrun_splits(num_sms, rows, longest, caps, page_bits)


_counters: dict[int, list[torch.Tensor]] = {}


def counter(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 counters, kept per device; the kernels leave them zero. A larger batch gets
    a larger buffer; the smaller ones stay alive, since CUDA graphs captured with them keep
    their addresses. The twin and the forward beside it take theirs from row_counters."""
    held = _counters.setdefault(device.index, [])
    if not held or held[-1].numel() < n:
        held.append(torch.zeros(max(n, 1 << 14), dtype=torch.int32, device=device))
    return held[-1]


def row_counters(device: torch.device, rows: int) -> torch.Tensor:
    """The counters of one decode call over rows (row, KV head) pairs, the same buffer for the
    twin and the forward that counts beside it: two a pair -- the programs done (the
    merge's count), then the twin's chunks taken (CUDA_STEAL)."""
    return counter(device, 2 * rows)


def launch(kind: str, qsplits: int, q, kv_cache, kvb, tags, block_table, query_start_loc, kept, pacc, pml,
           scale2: float, *, G: int, psplits: int, split0: int, caps: dict[int, int], page_bits: tuple[int, ...],
           has: dict[int, bool], F32: bool, out: torch.Tensor, lse: torch.Tensor, write_lse: bool,
           nfwd: int = 0) -> bool:
    """Partials [split0, split0 + qsplits) of every decode row from the run's own launch.
    Returns whether the output (and LSE) is merged without paged_attention's _reduce_kernel:
    the last program of each row reduces all partials -- the CUDA twin's, or with nfwd > 0
    (the forward launched next as its dependent, nfwd programs a row) maybe the forward's."""
    B = query_start_loc.shape[0] - 1
    H_kv, BS, D = kv_cache.shape[1], kv_cache.shape[2], q.shape[2]
    strides = (q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), block_table.stride(0))
    if kind == "cuda":
        _cuda_for(q, D, BS, page_bits)((B, H_kv, qsplits), [
            q, kvb, tags, block_table, query_start_loc, kept, pacc, pml, row_counters(q.device, B * H_kv), out, lse,
            float(scale2), block_table.shape[1], *strides, H_kv * G, G, psplits, split0, qsplits, out.stride(0),
            out.stride(1), int(write_lse), nfwd])
        return True
    p2 = triton.next_power_of_2
    _qrun_kernel[(B, H_kv, qsplits)](
        q, kvb, kv_cache.view(torch.float16), tags, block_table, query_start_loc, kept, pacc, pml, scale2,
        block_table.shape[1], *strides,
        H_Q=H_kv * G, D=D, BS=BS, G=G, BLOCK_M=max(MIN_M, p2(G)), PSPLITS=psplits, SPLIT0=split0,
        QSPLITS=qsplits, HAS8=has[8], HAS4=has[4], HAS2=has[2], CAP8=caps[8], CAP4=caps[4], CAP2=caps[2],
        QT8=p2(caps[8]), QT4=p2(caps[4]), QT2=p2(caps[2]), PB=PB, STAGES=STAGES, SCAN=64, F32=F32,
        num_warps=NUM_WARPS)
    return False
