"""Paged attention (decode and varlen/chunked prefill) over compacted + live KV, with pages
of mixed precision and optional attention statistics.

Semantics: ``vllm_kvcomp.ops.reference.paged_attention`` (all pages full precision) and
``vllm_kvcomp.ops.quant.paged_attention_mixed`` (with ``page_tag``), batched over requests.

Kernels
  _fwd_kernel    one program per (query tile, KV head, split). A query tile packs
                 BLOCK_Q query tokens x the G = H_q/H_kv query heads of one KV group into
                 BLOCK_M = BLOCK_Q*G rows (padded), so K/V is read once per group (GQA) and
                 tl.dot has M >= 16 even for one decode token. Keys are walked as
                 *entries* of the block table: compacted pages [0, nc) then live blocks
                 [live_start//bs, ...); every entry is one page of the same byte size
                 whatever its precision, so splitting entries evenly (flash-decoding
                 split-K) splits the bytes evenly. A compacted region shaped as
                 compaction writes it -- full pages, then pages all at one precision --
                 is read by two branch-free loops (pipelined loads); any other order by a
                 loop that dispatches on each page's tag.
  _reduce_kernel combines the splits (log-sum-exp) when NUM_SPLITS > 1.
  _stats_kernel  attention mass (H2O) and observation-window mass (SnapKV) per key, summed
                 over queries and the heads of the KV group, accumulated into per-slot
                 tensors. Mass needs the final softmax normaliser, so it is a second pass:
                 the forward stores each row's LSE, this kernel recomputes q.k for the
                 keys (reads K again, never V) and sums exp(s - lse). Each program owns a
                 chunk of entries and loops over all query tiles: no atomics,
                 deterministic.

Scores are kept in the log2 domain (scale pre-multiplied by log2(e), exp2).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------- helpers
@triton.jit
def _dot(a, b, F32: tl.constexpr):
    # The interpreter computes bf16 dots wrongly (numpy has no bf16): go through fp32 there.
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _mm_in(x, dtype, F32: tl.constexpr):
    """Operand of _dot: the model dtype on the GPU, fp32 under the interpreter (whose
    int->bf16 and fp32->bf16 conversions are wrong or truncating)."""
    if F32:
        return x.to(tl.float32)
    else:
        return x.to(tl.float32).to(dtype)


@triton.jit
def _cap_of(tag, BS: tl.constexpr, CAP8: tl.constexpr, CAP4: tl.constexpr, CAP2: tl.constexpr):
    return tl.where(tag == 8, CAP8, tl.where(tag == 4, CAP4, tl.where(tag == 2, CAP2, BS)))


@triton.jit
def _scan_compacted(bt_row, tag_ptr, kept, max_blocks, BS: tl.constexpr, CAP8: tl.constexpr,
                    CAP4: tl.constexpr, CAP2: tl.constexpr, SCAN: tl.constexpr):
    """(nc, nf, qbits, sorted): entries of the compacted region, its leading full pages, the
    largest tag in it, and whether it is [full pages][pages all at qbits] -- the shape
    compaction writes, which the forward reads through branch-free loops."""
    upper = tl.minimum(tl.cdiv(kept, BS), max_blocks)
    nc = 0
    done = 0
    first_nz = 1 << 30
    last_z = -1
    min_nz = 127
    max_t = 0
    for c0 in range(0, upper, SCAN):
        j = c0 + tl.arange(0, SCAN)
        valid = j < upper
        b = tl.load(bt_row + j, mask=valid, other=0).to(tl.int64)
        tag = tl.load(tag_ptr + b, mask=valid, other=0).to(tl.int32)
        cap = tl.where(valid, _cap_of(tag, BS, CAP8, CAP4, CAP2), 0)
        before = done + tl.cumsum(cap, 0) - cap
        inreg = (before < kept) & valid
        nc += tl.sum(inreg.to(tl.int32), 0)
        nz = inreg & (tag != 0)
        first_nz = tl.minimum(first_nz, tl.min(tl.where(nz, j, 1 << 30), 0))
        last_z = tl.maximum(last_z, tl.max(tl.where(inreg & (tag == 0), j, -1), 0))
        min_nz = tl.minimum(min_nz, tl.min(tl.where(nz, tag, 127), 0))
        max_t = tl.maximum(max_t, tl.max(tl.where(inreg, tag, 0), 0))
        done += tl.sum(cap, 0)
    nf = tl.minimum(first_nz, nc)
    ok = (last_z < first_nz) & ((min_nz == max_t) | (max_t == 0))
    return nc, nf, max_t, ok


@triton.jit
def _tokens_before(bt_row, tag_ptr, e0, BS: tl.constexpr, CAP8: tl.constexpr, CAP4: tl.constexpr,
                   CAP2: tl.constexpr, SCAN: tl.constexpr):
    """Compacted tokens held by entries [0, e0)."""
    off = 0
    for c0 in range(0, e0, SCAN):
        j = c0 + tl.arange(0, SCAN)
        valid = j < e0
        b = tl.load(bt_row + j, mask=valid, other=0).to(tl.int64)
        tag = tl.load(tag_ptr + b, mask=valid, other=0)
        off += tl.sum(tl.where(valid, _cap_of(tag, BS, CAP8, CAP4, CAP2), 0), 0)
    return off


@triton.jit
def _unpack(x, BITS: tl.constexpr, N: tl.constexpr, D: tl.constexpr):
    """[N, D*BITS/8] int32 bytes -> [N, D] codes; channel c sits in byte c // (8/BITS)."""
    if BITS == 8:
        return x
    elif BITS == 4:
        return tl.reshape(tl.join(x & 15, (x >> 4) & 15), (N, D))
    else:
        c02 = tl.join(x & 3, (x >> 4) & 3)
        c13 = tl.join((x >> 2) & 3, (x >> 6) & 3)
        return tl.reshape(tl.join(c02, c13), (N, D))


@triton.jit
def _online_softmax(s, m_i, l_i):
    """One flash-attention step on log2-domain scores s [M, N] (masked = -inf)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_new = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_new


@triton.jit
def _attend_positions(acc, m_i, l_i, q, q_pos, kv_ptr, bt_row, h, stride_kb, stride_kh, p0, p1,
                      CAUSAL: tl.constexpr, scale2, D: tl.constexpr, BS: tl.constexpr,
                      TILE_N: tl.constexpr, F32: tl.constexpr):
    """Full-precision keys at logical positions [p0, p1) (position p at block_row[p//BS])."""
    offs_d = tl.arange(0, D)
    for t0 in range(p0, p1, TILE_N):
        pos = t0 + tl.arange(0, TILE_N)
        valid = pos < p1
        blk = tl.load(bt_row + pos // BS, mask=valid, other=0).to(tl.int64)
        base = blk * stride_kb + h * stride_kh + (pos % BS) * (2 * D)
        k = tl.load(kv_ptr + base[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(kv_ptr + base[:, None] + D + offs_d[None, :], mask=valid[:, None], other=0.0)
        s = _dot(q, tl.trans(k), F32) * scale2
        keep = valid[None, :]
        if CAUSAL:
            keep = keep & (pos[None, :] <= q_pos[:, None])
        s = tl.where(keep, s, float("-inf"))
        p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i)
        acc = acc * alpha[:, None] + _dot(_mm_in(p, v.dtype, F32), v, F32)
    return acc, m_i, l_i


@triton.jit
def _attend_qrun(acc, m_i, l_i, q, kvb_ptr, kvh_ptr, bt_row, h, stride_kb, stride_kh, j0, j1, jbase, n_tok,
                 scale2, ELEM: tl.constexpr, BITS: tl.constexpr, CAP: tl.constexpr, QT: tl.constexpr,
                 D: tl.constexpr, F32: tl.constexpr):
    """Entries [j0, j1) of a run of quantized pages that starts at entry jbase and holds n_tok
    tokens (every page full but the last); all visible (compacted region).

    One flat loop over (page, tile of QT tokens) with no branch in it, so Triton can
    software-pipeline the loads across pages. Scales are folded instead of dequantizing:
    s = (q*KS).KQ + q.KZ and o += (p*VS).VQ + sum(p*VZ); the codes enter the dot as exact
    small integers in the model dtype.
    """
    ROW: tl.constexpr = D * BITS // 8
    KS: tl.constexpr = 2 * CAP * ROW
    VS: tl.constexpr = KS + 4 * D
    TPP: tl.constexpr = (CAP + QT - 1) // QT
    offs_d = tl.arange(0, D)
    offs_r = tl.arange(0, ROW)
    qf = q.to(tl.float32)
    for it in range(j0 * TPP, j1 * TPP):
        j = it // TPP
        b = tl.load(bt_row + j).to(tl.int64)
        page_byte = (b * stride_kb + h * stride_kh) * ELEM
        half = page_byte // 2
        cnt = tl.minimum(CAP, n_tok - (j - jbase) * CAP)
        t = (it % TPP) * QT + tl.arange(0, QT)
        valid = t < cnt
        ks = tl.load(kvh_ptr + half + KS // 2 + offs_d).to(tl.float32)
        kz = tl.load(kvh_ptr + half + KS // 2 + D + offs_d).to(tl.float32)
        kb = tl.load(kvb_ptr + page_byte + t[:, None] * ROW + offs_r[None, :], mask=valid[:, None], other=0)
        vb = tl.load(kvb_ptr + page_byte + CAP * ROW + t[:, None] * ROW + offs_r[None, :],
                     mask=valid[:, None], other=0)
        vs = tl.load(kvh_ptr + half + VS // 2 + t, mask=valid, other=0.0).to(tl.float32)
        vz = tl.load(kvh_ptr + half + VS // 2 + CAP + t, mask=valid, other=0.0).to(tl.float32)
        qs = _mm_in(qf * ks[None, :], q.dtype, F32)
        bias = tl.sum(qf * kz[None, :], 1) * scale2
        kq = _mm_in(_unpack(kb.to(tl.int32), BITS, QT, D), q.dtype, F32)
        s = _dot(qs, tl.trans(kq), F32) * scale2 + bias[:, None]
        s = tl.where(valid[None, :], s, float("-inf"))
        p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i)
        vq = _mm_in(_unpack(vb.to(tl.int32), BITS, QT, D), q.dtype, F32)
        acc = acc * alpha[:, None] + _dot(_mm_in(p * vs[None, :], q.dtype, F32), vq, F32)
        acc += tl.sum(p * vz[None, :], 1)[:, None]
    return acc, m_i, l_i


@triton.jit
def _find_request(pid, qsl_ptr, num_reqs, BLOCK_Q: tl.constexpr):
    """Request r owning query-tile pid: tiles of r start at qsl[r] // BLOCK_Q + r (vLLM's trick:
    a monotone upper bound, so a binary search over qsl finds it)."""
    lo = 0
    hi = num_reqs
    while lo < hi:
        mid = (lo + hi + 1) // 2
        start = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
        if start <= pid:
            lo = mid
        else:
            hi = mid - 1
    return lo


# ----------------------------------------------------------------------------- forward
@triton.jit
def _fwd_kernel(
    q_ptr, kv_ptr, kvb_ptr, kvh_ptr, tag_ptr,
    bt_ptr, qsl_ptr, seq_ptr, kept_ptr, live_ptr,
    out_ptr, lse_ptr, pacc_ptr, pml_ptr,
    scale2, num_reqs, max_blocks,
    stride_qt, stride_qh, stride_kb, stride_kh, stride_bt, stride_ot, stride_oh,
    H_Q: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr, TILE_P: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    HAS_TAGS: tl.constexpr, ELEM: tl.constexpr, CAP8: tl.constexpr, CAP4: tl.constexpr,
    CAP2: tl.constexpr, QT8: tl.constexpr, QT4: tl.constexpr, QT2: tl.constexpr,
    SCAN: tl.constexpr, WRITE_LSE: tl.constexpr, F32: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    r = _find_request(pid, qsl_ptr, num_reqs, BLOCK_Q)
    q_start = tl.load(qsl_ptr + r)
    q_len = tl.load(qsl_ptr + r + 1) - q_start
    q_tile = pid - (q_start // BLOCK_Q + r)
    if q_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_ptr + r)
    kept = tl.load(kept_ptr + r)
    live_start = tl.load(live_ptr + r)
    bt_row = bt_ptr + r.to(tl.int64) * stride_bt

    # rows: (query token, head of the group)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    tok = q_tile * BLOCK_Q + offs_m // G
    row_ok = (offs_m // G < BLOCK_Q) & (tok < q_len)
    hq = h * G + offs_m % G
    q_pos = seq_len - q_len + tok
    q_off = (q_start + tok).to(tl.int64) * stride_qt + hq * stride_qh
    q = tl.load(q_ptr + q_off[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    # entries: compacted pages [0, nc), then live blocks up to the tile's last query
    if HAS_TAGS:
        nc, nf, qbits, sorted_ok = _scan_compacted(bt_row, tag_ptr, kept, max_blocks, BS, CAP8, CAP4, CAP2,
                                                   SCAN)
    else:
        nc = tl.cdiv(kept, BS)
    last_pos = seq_len - q_len + tl.minimum(q_len, (q_tile + 1) * BLOCK_Q) - 1
    lb0 = live_start // BS
    n_live = tl.maximum(tl.cdiv(last_pos + 1, BS) - lb0, 0)
    n_ent = nc + n_live
    per = tl.cdiv(n_ent, NUM_SPLITS)
    e0 = split * per
    e1 = tl.minimum(n_ent, e0 + per)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)

    ce1 = tl.minimum(e1, nc)
    if HAS_TAGS:
        if sorted_ok:
            # [full pages][quantized pages at qbits]: two branch-free loops
            acc, m_i, l_i = _attend_positions(acc, m_i, l_i, q, q_pos, kv_ptr, bt_row, h, stride_kb, stride_kh,
                                              e0 * BS, tl.minimum(tl.minimum(ce1, nf) * BS, kept), False,
                                              scale2, D, BS, TILE_N, F32)
            j0 = tl.maximum(e0, nf)
            n_q = kept - nf * BS
            if qbits == 4:
                acc, m_i, l_i = _attend_qrun(acc, m_i, l_i, q, kvb_ptr, kvh_ptr, bt_row, h, stride_kb, stride_kh,
                                             j0, ce1, nf, n_q, scale2, ELEM, 4, CAP4, QT4, D, F32)
            elif qbits == 2:
                acc, m_i, l_i = _attend_qrun(acc, m_i, l_i, q, kvb_ptr, kvh_ptr, bt_row, h, stride_kb, stride_kh,
                                             j0, ce1, nf, n_q, scale2, ELEM, 2, CAP2, QT2, D, F32)
            elif qbits == 8:
                acc, m_i, l_i = _attend_qrun(acc, m_i, l_i, q, kvb_ptr, kvh_ptr, bt_row, h, stride_kb, stride_kh,
                                             j0, ce1, nf, n_q, scale2, ELEM, 8, CAP8, QT8, D, F32)
        else:
            # any order: one page at a time, dispatching on its tag
            off = _tokens_before(bt_row, tag_ptr, e0, BS, CAP8, CAP4, CAP2, SCAN)
            for j in range(e0, ce1):
                b = tl.load(bt_row + j).to(tl.int64)
                tag = tl.load(tag_ptr + b)
                cap = _cap_of(tag, BS, CAP8, CAP4, CAP2)
                cnt = tl.minimum(cap, kept - off)
                if tag == 4:
                    acc, m_i, l_i = _attend_qrun(acc, m_i, l_i, q, kvb_ptr, kvh_ptr, bt_row, h, stride_kb,
                                                 stride_kh, j, j + 1, j, cnt, scale2, ELEM, 4, CAP4, QT4, D, F32)
                elif tag == 2:
                    acc, m_i, l_i = _attend_qrun(acc, m_i, l_i, q, kvb_ptr, kvh_ptr, bt_row, h, stride_kb,
                                                 stride_kh, j, j + 1, j, cnt, scale2, ELEM, 2, CAP2, QT2, D, F32)
                elif tag == 8:
                    acc, m_i, l_i = _attend_qrun(acc, m_i, l_i, q, kvb_ptr, kvh_ptr, bt_row, h, stride_kb,
                                                 stride_kh, j, j + 1, j, cnt, scale2, ELEM, 8, CAP8, QT8, D, F32)
                else:
                    acc, m_i, l_i = _attend_positions(acc, m_i, l_i, q, q_pos, kv_ptr, bt_row, h, stride_kb,
                                                      stride_kh, j * BS, j * BS + cnt, False, scale2, D, BS,
                                                      TILE_P, F32)
                off += cap
    else:
        acc, m_i, l_i = _attend_positions(acc, m_i, l_i, q, q_pos, kv_ptr, bt_row, h, stride_kb, stride_kh,
                                          e0 * BS, tl.minimum(ce1 * BS, kept), False, scale2, D, BS,
                                          TILE_N, F32)
    le0 = tl.maximum(e0, nc) - nc + lb0
    le1 = tl.maximum(e1, nc) - nc + lb0
    acc, m_i, l_i = _attend_positions(acc, m_i, l_i, q, q_pos, kv_ptr, bt_row, h, stride_kb, stride_kh,
                                      tl.maximum(le0 * BS, live_start), tl.minimum(le1 * BS, last_pos + 1),
                                      True, scale2, D, BS, TILE_N, F32)

    o_row = (q_start + tok).to(tl.int64) * stride_ot + hq * stride_oh
    if NUM_SPLITS == 1:
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        tl.store(out_ptr + o_row[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None])
        if WRITE_LSE:
            tl.store(lse_ptr + (q_start + tok).to(tl.int64) * H_Q + hq, m_i + tl.log2(l_safe), mask=row_ok)
    else:
        # partials: [T, H_Q, NUM_SPLITS, D] and [T, H_Q, NUM_SPLITS, 2]
        prow = ((q_start + tok).to(tl.int64) * H_Q + hq) * NUM_SPLITS + split
        tl.store(pacc_ptr + prow[:, None] * D + offs_d[None, :], acc, mask=row_ok[:, None])
        tl.store(pml_ptr + prow * 2, m_i, mask=row_ok)
        tl.store(pml_ptr + prow * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _reduce_kernel(pacc_ptr, pml_ptr, out_ptr, lse_ptr, stride_ot, stride_oh,
                   H_Q: tl.constexpr, D: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr,
                   WRITE_LSE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    hq = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_P2)
    offs_d = tl.arange(0, D)
    ok = offs_s < NUM_SPLITS
    prow = (t * H_Q + hq) * NUM_SPLITS + offs_s
    m = tl.load(pml_ptr + prow * 2, mask=ok, other=float("-inf"))
    l = tl.load(pml_ptr + prow * 2 + 1, mask=ok, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)
    l_tot = tl.sum(w * l, 0)
    acc = tl.load(pacc_ptr + prow[:, None] * D + offs_d[None, :], mask=ok[:, None], other=0.0)
    l_safe = tl.where(l_tot == 0.0, 1.0, l_tot)
    out = tl.sum(acc * w[:, None], 0) / l_safe
    tl.store(out_ptr + t * stride_ot + hq * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))
    if WRITE_LSE:
        tl.store(lse_ptr + t * H_Q + hq, m_max + tl.log2(l_safe))


# ----------------------------------------------------------------------------- statistics
@triton.jit
def _stats_tile(mass, obs, s_keys_ok, kpos, CAUSAL: tl.constexpr, k, q_ptr, lse_ptr, q_start, q_len,
                seq_len, obs_len, h, scale2, stride_qt, stride_qh, H_Q: tl.constexpr, D: tl.constexpr,
                G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, HAS_OBS: tl.constexpr,
                F32: tl.constexpr):
    """Sum exp(s - lse) over all query rows of the request for one key tile k [N, D]."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    hq = h * G + offs_m % G
    for q0 in range(0, q_len, BLOCK_Q):
        tok = q0 + offs_m // G
        row_ok = (offs_m // G < BLOCK_Q) & (tok < q_len)
        q_off = (q_start + tok).to(tl.int64) * stride_qt + hq * stride_qh
        q = tl.load(q_ptr + q_off[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(lse_ptr + (q_start + tok).to(tl.int64) * H_Q + hq, mask=row_ok, other=0.0)
        s = _dot(q, tl.trans(k), F32) * scale2
        keep = row_ok[:, None] & s_keys_ok[None, :]
        if CAUSAL:
            keep = keep & (kpos[None, :] <= (seq_len - q_len + tok)[:, None])
        p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
        mass += tl.sum(p, 0)
        if HAS_OBS:
            in_obs = tok >= q_len - obs_len
            obs += tl.sum(tl.where(in_obs[:, None], p, 0.0), 0)
    return mass, obs


@triton.jit
def _stats_kernel(
    q_ptr, kv_ptr, kvb_ptr, kvh_ptr, tag_ptr,
    bt_ptr, st_ptr, qsl_ptr, seq_ptr, kept_ptr, live_ptr, obs_ptr, lse_ptr,
    mass_ptr, obsout_ptr,
    scale2, max_blocks,
    stride_qt, stride_qh, stride_kb, stride_kh, stride_bt, stride_st,
    stride_mb, stride_mh,
    H_Q: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr, ENT: tl.constexpr,
    HAS_TAGS: tl.constexpr, ELEM: tl.constexpr, CAP8: tl.constexpr, CAP4: tl.constexpr,
    CAP2: tl.constexpr, QT8: tl.constexpr, QT4: tl.constexpr, QT2: tl.constexpr,
    SCAN: tl.constexpr, WANT_MASS: tl.constexpr, HAS_OBS: tl.constexpr, F32: tl.constexpr,
):
    """Program (request, KV head, chunk of ENT entries): per-key sums over all query rows."""
    r = tl.program_id(0)
    h = tl.program_id(1)
    chunk = tl.program_id(2)
    q_start = tl.load(qsl_ptr + r)
    q_len = tl.load(qsl_ptr + r + 1) - q_start
    seq_len = tl.load(seq_ptr + r)
    kept = tl.load(kept_ptr + r)
    live_start = tl.load(live_ptr + r)
    obs_len = 0
    if HAS_OBS:
        obs_len = tl.load(obs_ptr + r)
    if q_len == 0:
        return
    bt_row = bt_ptr + r.to(tl.int64) * stride_bt
    st_row = st_ptr + r.to(tl.int64) * stride_st
    if HAS_TAGS:
        nc, _, _, _ = _scan_compacted(bt_row, tag_ptr, kept, max_blocks, BS, CAP8, CAP4, CAP2, SCAN)
    else:
        nc = tl.cdiv(kept, BS)
    lb0 = live_start // BS
    n_ent = nc + tl.maximum(tl.cdiv(seq_len, BS) - lb0, 0)
    e0 = chunk * ENT
    if e0 >= n_ent:
        return
    e1 = tl.minimum(n_ent, e0 + ENT)
    off = e0 * BS
    if HAS_TAGS:
        off = _tokens_before(bt_row, tag_ptr, e0, BS, CAP8, CAP4, CAP2, SCAN)
    offs_d = tl.arange(0, D)
    for j in range(e0, e1):
        compacted = j < nc
        lj = j - nc + lb0
        ent = tl.where(compacted, j, lj)
        b = tl.load(bt_row + ent).to(tl.int64)
        sb = tl.load(st_row + ent).to(tl.int64)
        page_byte = (b * stride_kb + h * stride_kh) * ELEM
        tag = 0
        if HAS_TAGS:
            tag = tl.where(compacted, tl.load(tag_ptr + b), 0)
        cap = _cap_of(tag, BS, CAP8, CAP4, CAP2)
        if tag == 4:
            _stats_qpage(mass_ptr, obsout_ptr, sb, h, stride_mb, stride_mh, tl.minimum(cap, kept - off),
                         q_ptr, kvb_ptr, kvh_ptr, lse_ptr, page_byte, q_start, q_len, seq_len, obs_len,
                         scale2, stride_qt, stride_qh, 4, CAP4, QT4, H_Q, D, G, BLOCK_M, BLOCK_Q,
                         WANT_MASS, HAS_OBS, F32)
        elif tag == 2:
            _stats_qpage(mass_ptr, obsout_ptr, sb, h, stride_mb, stride_mh, tl.minimum(cap, kept - off),
                         q_ptr, kvb_ptr, kvh_ptr, lse_ptr, page_byte, q_start, q_len, seq_len, obs_len,
                         scale2, stride_qt, stride_qh, 2, CAP2, QT2, H_Q, D, G, BLOCK_M, BLOCK_Q,
                         WANT_MASS, HAS_OBS, F32)
        elif tag == 8:
            _stats_qpage(mass_ptr, obsout_ptr, sb, h, stride_mb, stride_mh, tl.minimum(cap, kept - off),
                         q_ptr, kvb_ptr, kvh_ptr, lse_ptr, page_byte, q_start, q_len, seq_len, obs_len,
                         scale2, stride_qt, stride_qh, 8, CAP8, QT8, H_Q, D, G, BLOCK_M, BLOCK_Q,
                         WANT_MASS, HAS_OBS, F32)
        else:
            # a full page: compacted (tokens [0, cnt), all visible) or live (positions, causal)
            slot = tl.arange(0, BS)
            if compacted:
                s_ok = slot < kept - off
                kpos = tl.full([BS], -1, tl.int32)
            else:
                kpos = lj * BS + slot
                s_ok = (kpos >= live_start) & (kpos < seq_len)
            k = tl.load(kv_ptr + b * stride_kb + h * stride_kh + slot[:, None] * (2 * D) + offs_d[None, :],
                        mask=s_ok[:, None], other=0.0)
            mass = tl.zeros([BS], tl.float32)
            obs = tl.zeros([BS], tl.float32)
            mass, obs = _stats_tile(mass, obs, s_ok, kpos, True, k, q_ptr, lse_ptr, q_start, q_len,
                                    seq_len, obs_len, h, scale2, stride_qt, stride_qh, H_Q, D, G, BLOCK_M,
                                    BLOCK_Q, HAS_OBS, F32)
            _stats_store(mass_ptr, obsout_ptr, sb, h, stride_mb, stride_mh, slot, s_ok, mass, obs,
                         WANT_MASS, HAS_OBS)
        off += tl.where(compacted, cap, 0)


@triton.jit
def _stats_store(mass_ptr, obsout_ptr, sb, h, stride_mb, stride_mh, slot, ok, mass, obs,
                 WANT_MASS: tl.constexpr, HAS_OBS: tl.constexpr):
    ptr = sb * stride_mb + h * stride_mh + slot
    if WANT_MASS:
        old = tl.load(mass_ptr + ptr, mask=ok, other=0.0)
        tl.store(mass_ptr + ptr, old + mass, mask=ok)
    if HAS_OBS:
        old = tl.load(obsout_ptr + ptr, mask=ok, other=0.0)
        tl.store(obsout_ptr + ptr, old + obs, mask=ok)


@triton.jit
def _stats_qpage(mass_ptr, obsout_ptr, sb, h, stride_mb, stride_mh, count, q_ptr, kvb_ptr, kvh_ptr, lse_ptr,
                 page_byte, q_start, q_len, seq_len, obs_len, scale2, stride_qt, stride_qh,
                 BITS: tl.constexpr, CAP: tl.constexpr, QT: tl.constexpr, H_Q: tl.constexpr, D: tl.constexpr,
                 G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, WANT_MASS: tl.constexpr,
                 HAS_OBS: tl.constexpr, F32: tl.constexpr):
    ROW: tl.constexpr = D * BITS // 8
    KS: tl.constexpr = 2 * CAP * ROW
    offs_d = tl.arange(0, D)
    offs_r = tl.arange(0, ROW)
    half = page_byte // 2
    ks = tl.load(kvh_ptr + half + KS // 2 + offs_d).to(tl.float32)
    kz = tl.load(kvh_ptr + half + KS // 2 + D + offs_d).to(tl.float32)
    for t0 in range(0, count, QT):
        t = t0 + tl.arange(0, QT)
        valid = t < count
        kb = tl.load(kvb_ptr + page_byte + t[:, None] * ROW + offs_r[None, :], mask=valid[:, None], other=0)
        # dequantized keys in fp32 (statistics need no speed records here)
        k = _unpack(kb.to(tl.int32), BITS, QT, D).to(tl.float32) * ks[None, :] + kz[None, :]
        mass = tl.zeros([QT], tl.float32)
        obs = tl.zeros([QT], tl.float32)
        kpos = tl.full([QT], -1, tl.int32)
        mass, obs = _stats_tile(mass, obs, valid, kpos, False, k, q_ptr, lse_ptr, q_start, q_len,
                                seq_len, obs_len, h, scale2, stride_qt, stride_qh, H_Q, D, G, BLOCK_M,
                                BLOCK_Q, HAS_OBS, True)
        _stats_store(mass_ptr, obsout_ptr, sb, h, stride_mb, stride_mh, t, valid, mass, obs,
                     WANT_MASS, HAS_OBS)


# ----------------------------------------------------------------------------- launch
def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def paged_attention_batched(
    q: torch.Tensor,  # [T, H_q, D]
    kv_cache: torch.Tensor,  # [num_blocks, H_kv, bs, 2D]
    block_table: torch.Tensor,  # [B, max_blocks] int32
    query_start_loc: torch.Tensor,  # [B+1] int32
    seq_lens: torch.Tensor,  # [B] int32
    kept: torch.Tensor,  # [B] int32
    live_start: torch.Tensor,  # [B] int32
    scale: float,
    *,
    page_tag: torch.Tensor | None = None,  # [num_blocks] int8
    out: torch.Tensor | None = None,
    mass_cache: torch.Tensor | None = None,  # [num_blocks, H_kv, S] float32, accumulated
    obs_cache: torch.Tensor | None = None,  # same shape, accumulated over the last obs_queries[r] queries
    obs_queries: torch.Tensor | None = None,  # [B] int32
    stat_table: torch.Tensor | None = None,  # [B, max_blocks]: where stats of an entry go (default block_table)
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    config: dict | None = None,  # tile overrides for benchmarking: BLOCK_M, TILE_N, num_warps, num_stages
) -> torch.Tensor:
    """Batched causal attention over compacted + live KV; see the module docstring."""
    T, H_q, D = q.shape
    nb, H_kv, BS, D2 = kv_cache.shape
    B = seq_lens.shape[0]
    assert D2 == 2 * D and D in (32, 64, 128, 256), f"head dim {D} unsupported"
    assert H_q % H_kv == 0
    assert kv_cache.stride(3) == 1 and kv_cache.stride(2) == D2, "pages must be contiguous [bs, 2D]"
    assert q.stride(2) == 1
    assert kv_cache.dtype in (torch.float16, torch.bfloat16, torch.float32)
    assert BS & (BS - 1) == 0 and BS >= 16, "block size must be a power of two >= 16"
    for t in (block_table, query_start_loc, seq_lens, kept, live_start):
        assert t.dtype == torch.int32 and t.is_contiguous(), "metadata must be contiguous int32"
    assert block_table.stride(1) == 1 and query_start_loc.shape[0] == B + 1
    if page_tag is not None:
        assert page_tag.dtype == torch.int8 and page_tag.shape[0] == nb
    G = H_q // H_kv
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.stride(2) == 1
    want_mass = mass_cache is not None
    has_obs = obs_cache is not None
    if has_obs:
        assert obs_queries is not None and obs_queries.dtype == torch.int32
    stats = want_mass or has_obs
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max()) if B else 0
    if max_seq_len is None and (stats or num_splits is None):
        max_seq_len = int(seq_lens.max()) if B else 0
    if B == 0 or T == 0:
        return out

    from vllm_kvcomp.ops.quant import page_capacity

    es = kv_cache.element_size()
    caps = {b: page_capacity(b, BS, D, es) for b in (8, 4, 2)}
    qts = {b: min(_pow2(c), 128 if D <= 128 else 64) for b, c in caps.items()}
    kvb = kv_cache.view(torch.uint8)
    kvh = kv_cache.view(torch.float16)
    tags = page_tag if page_tag is not None else seq_lens  # dummy pointer when unused
    f32 = _INTERPRET or kv_cache.dtype == torch.float32

    # Tiling: a decode tile is one token x the G heads of a KV group (>= 16 rows for
    # tl.dot); prefill tiles pack 64-128 rows. Key tiles of 64 tokens (32 at D=256) keep
    # K+V of one tile at 32 KB in bf16 so two pipeline stages fit.
    decode = max_query_len <= 1
    if decode:
        BLOCK_M = max(16, _pow2(G))
    else:
        BLOCK_M = max(64 if D > 128 else 128, _pow2(G))
    TILE_N = 64 if D <= 128 else 32
    num_warps, num_stages = (4, 2) if decode else (8, 2)
    if config:
        BLOCK_M = config.get("BLOCK_M", BLOCK_M)
        TILE_N = config.get("TILE_N", TILE_N)
        num_warps = config.get("num_warps", num_warps)
        num_stages = config.get("num_stages", num_stages)
    BLOCK_Q = BLOCK_M // G
    n_qtiles = T // BLOCK_Q + B
    if num_splits is None:
        if decode:
            # enough programs to fill the GPU twice over, but >= 4 entries per split
            want = -(-2 * _num_sms(q.device) // max(1, B * H_kv))
            entries = -(-max_seq_len // BS) + 1
            num_splits = max(1, min(want, entries // 4, 64))
        else:
            num_splits = 1
    write_lse = stats
    lse = torch.empty(T, H_q, device=q.device, dtype=torch.float32) if (write_lse or num_splits > 1) else out
    if num_splits > 1:
        pacc = torch.empty(T, H_q, num_splits, D, device=q.device, dtype=torch.float32)
        pml = torch.empty(T, H_q, num_splits, 2, device=q.device, dtype=torch.float32)
    else:
        pacc = pml = out
    scale2 = float(scale) * LOG2E
    common = dict(H_Q=H_q, D=D, BS=BS, G=G, BLOCK_M=BLOCK_M, BLOCK_Q=BLOCK_Q, TILE_N=TILE_N,
                  HAS_TAGS=page_tag is not None, ELEM=es, CAP8=caps[8], CAP4=caps[4], CAP2=caps[2],
                  QT8=qts[8], QT4=qts[4], QT2=qts[2], SCAN=64, F32=f32)
    _fwd_kernel[(n_qtiles, H_kv, num_splits)](
        q, kv_cache, kvb, kvh, tags, block_table, query_start_loc, seq_lens, kept, live_start,
        out, lse, pacc, pml, scale2, B, block_table.shape[1],
        q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), block_table.stride(0),
        out.stride(0), out.stride(1),
        TILE_P=min(TILE_N, BS), NUM_SPLITS=num_splits, WRITE_LSE=write_lse, num_warps=num_warps, num_stages=num_stages,
        **common)
    if num_splits > 1:
        _reduce_kernel[(T, H_q)](pacc, pml, out, lse, out.stride(0), out.stride(1), H_Q=H_q, D=D,
                                 NUM_SPLITS=num_splits, SPLITS_P2=_pow2(num_splits), WRITE_LSE=write_lse)
    if stats:
        stat = mass_cache if want_mass else obs_cache
        assert stat.dtype == torch.float32 and stat.stride(2) == 1 and stat.shape[1] == H_kv
        if want_mass and has_obs:
            assert obs_cache.stride() == mass_cache.stride() and obs_cache.shape == mass_cache.shape
        need = max(caps.values()) if page_tag is not None else BS
        assert stat.shape[2] >= need, f"stat tensors need {need} slots per page"
        st = stat_table if stat_table is not None else block_table
        assert st.dtype == torch.int32 and st.stride(1) == 1
        ENT = 8
        n_chunks = -(-(-(-max_seq_len // BS) + 1) // ENT)
        _stats_kernel[(B, H_kv, n_chunks)](
            q, kv_cache, kvb, kvh, tags, block_table, st, query_start_loc, seq_lens, kept, live_start,
            obs_queries if has_obs else seq_lens, lse,
            mass_cache if want_mass else stat, obs_cache if has_obs else stat, scale2, block_table.shape[1],
            q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), block_table.stride(0),
            st.stride(0), stat.stride(0), stat.stride(1),
            ENT=ENT, WANT_MASS=want_mass, HAS_OBS=has_obs, num_warps=4, **common)
    return out
