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

Decode over a region's run of quantized pages ([full][one precision], what compaction
writes) is not read here but by quant_decode._qrun_kernel (QSEP), whose partials
_reduce_kernel merges with ours; the quantized loops below serve prefill tiles, regions in
any other order, fp32 caches, and QRUN off. Measured (docs/kernels.md): bf16 decode reads
K/V at 98-100% of the copy bandwidth on an H200.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from vllm_kvcomp.ops.quant import PAIR_BLOCK_SIZE

LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# int4/int2 pages of this block size are in pair order (quant.paired): BS == PAIR_BS
PAIR_BS = tl.constexpr(PAIR_BLOCK_SIZE)

try:
    if _INTERPRET:  # programs run one after another there: nothing to wait for
        raise ImportError
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # (or a Triton without grid dependency control: quant_decode.pdl() is False then)
    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


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
    """(nc, nf, qbits, sorted): entries of the compacted region (first n whose cumulative
    capacity reaches kept), its leading full pages, the largest tag in it, and whether it is
    [full pages][pages all at qbits] -- the shape compaction writes, read by branch-free
    loops. Entries past nc but below kept/BS lie in the gap: stale but valid block ids."""
    upper = tl.minimum(tl.cdiv(kept, BS), max_blocks)  # every page holds >= BS tokens
    nc = 0
    done = 0
    first_nz = 1 << 30
    last_z = -1
    min_nz = 127
    max_t = 0
    c0 = 0
    while (c0 < upper) & (done < kept):  # stops at the region's end, not at kept / BS entries
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
        c0 += SCAN
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
def _unpack(x, BITS: tl.constexpr, P: tl.constexpr, N: tl.constexpr, D: tl.constexpr):
    """[P, N, ROW] int32 bytes -> [P, N, D] codes (ROW = D*BITS/8). Planes format: channel c
    sits in byte c % ROW at bit (c // ROW) * BITS, so plane i (channels [i*ROW, (i+1)*ROW))
    is one shift and mask of the row's bytes. Join + permute put the planes back in channel
    order (a layout shuffle: only the statistics pass and compaction use this; the forward
    reads plane by plane, _attend_qrun)."""
    ROW: tl.constexpr = D * BITS // 8
    if BITS == 8:
        return x
    elif BITS == 4:
        return tl.reshape(tl.permute(tl.join(x & 15, x >> 4), (0, 1, 3, 2)), (P, N, D))
    else:
        j = tl.join(tl.join(x & 3, (x >> 4) & 3), tl.join((x >> 2) & 3, x >> 6))  # [.., ROW, y, x]: plane 2y + x
        return tl.reshape(tl.permute(j, (0, 1, 3, 4, 2)), (P, N, D))


@triton.jit
def _codes(x, dtype, MAG: tl.constexpr, F32: tl.constexpr):
    """int32 codes -> the same small integers in the model dtype, exactly, without an
    int->float conversion (a quarter-rate instruction): OR the code into the mantissa of
    MAG (bf16 128.0 = 0x4300, fp16 1024.0 = 0x6400), reinterpret, subtract MAG (exact).
    MAG = 0: plain conversion (fp32 caches, and int8 codes in bf16, whose 7-bit mantissa
    holds only 128 consecutive integers)."""
    if MAG == 128:
        y = (x | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
    elif MAG == 1024:
        y = (x | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
    else:
        y = x.to(tl.float32).to(dtype)
    tl.static_assert(y.dtype == dtype, "codes must reach the dot in the model dtype")
    if F32:  # the interpreter has no bf16 arithmetic
        return y.to(tl.float32) - MAG
    else:
        return (y - MAG).to(dtype)


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
def _flash_step(acc, m_i, l_i, s, v, F32: tl.constexpr):
    """Scores s [M, N] (log2 domain, masked = -inf) and values v [N, D] into the running
    output: one online-softmax step."""
    p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i)
    return acc * alpha[:, None] + _dot(_mm_in(p, v.dtype, F32), v, F32), m_i, l_i


@triton.jit
def _pos_base(bt_row, h, stride_kb, stride_kh, pos, valid, D: tl.constexpr, BS: tl.constexpr):
    """Element offset of K of logical position pos (block_row[pos // BS], slot pos % BS)."""
    blk = tl.load(bt_row + pos // BS, mask=valid, other=0).to(tl.int64)
    return blk * stride_kb + h * stride_kh + (pos % BS) * (2 * D)


@triton.jit
def _attend_positions(acc, m_i, l_i, q, q_pos, kv_ptr, bt_row, h, stride_kb, stride_kh, p0, p1,
                      CAUSAL: tl.constexpr, scale2, D: tl.constexpr, BS: tl.constexpr,
                      TILE_N: tl.constexpr, F32: tl.constexpr, TWO_LOOPS: tl.constexpr):
    """Full-precision keys at logical positions [p0, p1), TILE_N per step (any number of
    blocks per tile: the block is looked up per token). TWO_LOOPS (prefill): whole tiles
    that every row sees (below the tile's first query, causally) go without masks; only
    the diagonal and a last partial tile pay for them (as flash attention's two loops)."""
    offs_d = tl.arange(0, D)
    t_free = p0
    if TWO_LOOPS:
        p_free = p1
        if CAUSAL:  # q_pos grows with the row: the first row's is the smallest
            p_free = tl.minimum(p1, tl.min(q_pos, 0) + 1)
        t_free = p0 + tl.maximum(p_free - p0, 0) // TILE_N * TILE_N
    for t0 in range(p0, t_free, TILE_N):
        pos = t0 + tl.arange(0, TILE_N)
        base = tl.load(bt_row + pos // BS).to(tl.int64) * stride_kb + h * stride_kh + (pos % BS) * (2 * D)
        k = tl.load(kv_ptr + base[:, None] + offs_d[None, :])
        v = tl.load(kv_ptr + base[:, None] + D + offs_d[None, :])
        acc, m_i, l_i = _flash_step(acc, m_i, l_i, _dot(q, tl.trans(k), F32) * scale2, v, F32)
    for t0 in range(t_free, p1, TILE_N):
        pos = t0 + tl.arange(0, TILE_N)
        valid = pos < p1
        base = _pos_base(bt_row, h, stride_kb, stride_kh, pos, valid, D, BS)
        k = tl.load(kv_ptr + base[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(kv_ptr + base[:, None] + D + offs_d[None, :], mask=valid[:, None], other=0.0)
        s = _dot(q, tl.trans(k), F32) * scale2
        keep = valid[None, :]
        if CAUSAL:
            keep = keep & (pos[None, :] <= q_pos[:, None])
        acc, m_i, l_i = _flash_step(acc, m_i, l_i, tl.where(keep, s, float("-inf")), v, F32)
    return acc, m_i, l_i


@triton.jit
def _qtile(bt_row, h, stride_kb, stride_kh, it, jbase, n_tok, ELEM: tl.constexpr, CAP: tl.constexpr,
           QT: tl.constexpr):
    """Tile ``it`` of a run of quantized pages that starts at entry jbase with n_tok tokens
    (each page full but the last): one page, or a QT slice of it when the page is larger.
    Returns (page byte offset, slots [QT], valid [QT], entry)."""
    TPP: tl.constexpr = (CAP + QT - 1) // QT
    j = jbase + it // TPP
    b = tl.load(bt_row + j).to(tl.int64)
    t = (it % TPP) * QT + tl.arange(0, QT)
    return (b * stride_kb + h * stride_kh) * ELEM, t, t < tl.minimum(CAP, n_tok - (j - jbase) * CAP), j


@triton.jit
def _code_byte(e, PAIRED: tl.constexpr, VALUES: tl.constexpr):
    """Where byte e of a code row lies from the row's start (_key_row, _value_row). PAIRED
    (quant.paired: int4/int2 pages of blocks of 16, the CUDA twin's) stores the bytes in the
    twin's operand pair order (quant.key_byte, value_byte): a key row's bytes 1 and 2 of
    every 4 swapped; a value row interleaved with its pair token's, 2 bytes at a time."""
    if not PAIRED:
        return e
    elif VALUES:
        return (e >> 1) * 4 + (e & 1)
    else:
        return (e & -4) | ((e & 1) << 1) | ((e >> 1) & 1)


@triton.jit
def _key_row(page_byte, t, ROW: tl.constexpr):
    """Byte offset of token t's key code row (its byte 0; the rest: _code_byte)."""
    return page_byte + t * ROW


@triton.jit
def _value_row(page_byte, t, PAIRED: tl.constexpr, CAP: tl.constexpr, ROW: tl.constexpr):
    """Byte offset of token t's value code row (its byte 0): PAIRED rows come in pairs of
    tokens, 2 bytes of each in turn (quant.value_byte)."""
    if not PAIRED:
        return page_byte + CAP * ROW + t * ROW
    else:
        return page_byte + CAP * ROW + (t >> 1) * (2 * ROW) + (t & 1) * 2


@triton.jit
def _rows(kvb_ptr, row_byte, valid, PAIRED: tl.constexpr, W: tl.constexpr, VALUES: tl.constexpr):
    """The W bytes of the key (value) code rows starting at row_byte [QT], in order: int32
    [QT, W]. PAIRED bytes are gathered from their pair order (_code_byte): byte loads.
    (Loading the rows contiguously and ordering them in registers measured 2.6x faster for
    the forward's int4 pages at block size 32, but one GPU test failed with it; kept as
    docs/kernels_runs/h200_triton_in_registers.patch, docs/kernels.md.)"""
    e = _code_byte(tl.arange(0, W), PAIRED, VALUES)
    return tl.load(kvb_ptr + row_byte[:, None] + e[None, :], mask=valid[:, None], other=0).to(tl.int32)


@triton.jit
def _qcodes(kvb_ptr, row_byte, valid, BITS: tl.constexpr, QT: tl.constexpr, D: tl.constexpr,
            PAIRED: tl.constexpr, VALUES: tl.constexpr):
    """The key (value) code rows starting at row_byte [QT], unpacked: int32 [QT, D] in channel order."""
    ROW: tl.constexpr = D * BITS // 8
    x = tl.reshape(_rows(kvb_ptr, row_byte, valid, PAIRED, ROW, VALUES), (1, QT, ROW))
    return tl.reshape(_unpack(x, BITS, 1, QT, D), (QT, D))


@triton.jit
def _deq_keys(c, kvh_ptr, ks_half, C0: tl.constexpr, W: tl.constexpr, D: tl.constexpr, dtype, F32: tl.constexpr):
    """Keys of channels [C0, C0 + W) in the model dtype: codes * KS + KZ (fp32 FMA, one
    rounding). Dequantizing K costs less than folding KS into q: that needs a second (lo)
    dot to stay accurate and a reduction for KZ every page (measured 1.6x slower). The
    int->float conversion stays: the exponent trick (as _codes) measured 1-4% slower here,
    bf16 arithmetic 5% faster but 1.6e-2 off the reference (benchmarks/probe_qtile.py)."""
    offs = C0 + tl.arange(0, W)
    ks = tl.load(kvh_ptr + ks_half + offs).to(tl.float32)
    kz = tl.load(kvh_ptr + ks_half + D + offs).to(tl.float32)
    return _mm_in(c.to(tl.float32) * ks[None, :] + kz[None, :], dtype, F32)


@triton.jit
def _join_planes(a0, a1, a2, a3, NP: tl.constexpr, M: tl.constexpr, D: tl.constexpr):
    """Plane accumulators [M, D/NP] -> [M, D] in channel order (once per run)."""
    if NP == 1:
        return a0
    elif NP == 2:
        return tl.reshape(tl.permute(tl.join(a0, a1), (0, 2, 1)), (M, D))
    else:
        return tl.reshape(tl.permute(tl.join(tl.join(a0, a2), tl.join(a1, a3)), (0, 2, 3, 1)), (M, D))


@triton.jit
def _attend_qrun(acc, m_i, l_i, q_ptr, q_off, row_ok, kvb_ptr, kvh_ptr, bt_row, h, stride_kb, stride_kh, j0, j1,
                 jbase, n_tok, scale2, dtype, ELEM: tl.constexpr, BITS: tl.constexpr, CAP: tl.constexpr,
                 QT: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, MAG: tl.constexpr, F32: tl.constexpr,
                 QSTAGES: tl.constexpr, PLANES: tl.constexpr, PAIRED: tl.constexpr):
    """Entries [j0, j1) of a run of quantized pages (all visible: compacted region).

    One flat loop over tiles (one page each), no branch in it, so Triton pipelines the
    loads across pages. The codes are read *plane by plane* (page format: plane i of a code
    row holds channels [i*ROW, (i+1)*ROW) at bit i*BITS), so unpacking is a shift and a
    mask in the layout they were loaded in -- no join/reshape per tile, which made this path
    instruction-bound (1.2 ms vs 0.49 ms for int4 at 64 x 8192, docs/kernels.md). NP planes
    -> NP dots per side, NP accumulators of D/NP channels, joined once at the end:
    int8 1 plane, int4 2, int2 4 (1 through _unpack when D/4 < 16, the smallest dot).
    PLANES=False (prefill tiles of 64-128 query rows): one unpacked [QT, D] tile per side
    (join/reshape, cheap next to 128-row dots) into the caller's accumulator -- NP extra
    accumulators there miscompiled on the H100 with a pipelined loop (docs/kernels.md).
    Keys are dequantized (per-channel scales) into the dot operand; values' per-token scales
    are folded into p: o += (p*VS).VQ + sum(p*VZ).
    """
    ROW: tl.constexpr = D * BITS // 8
    NP: tl.constexpr = 8 // BITS if PLANES and D * BITS // 8 >= 16 else 1
    W: tl.constexpr = D // NP
    KS: tl.constexpr = 2 * CAP * ROW
    VS: tl.constexpr = KS + 4 * D
    TPP: tl.constexpr = (CAP + QT - 1) // QT
    offs_w = tl.arange(0, W)
    q0 = tl.load(q_ptr + q_off[:, None] + offs_w[None, :], mask=row_ok[:, None], other=0.0)
    q1 = q0
    q2 = q0
    q3 = q0
    if NP >= 2:
        q1 = tl.load(q_ptr + q_off[:, None] + W + offs_w[None, :], mask=row_ok[:, None], other=0.0)
    if NP == 4:
        q2 = tl.load(q_ptr + q_off[:, None] + 2 * W + offs_w[None, :], mask=row_ok[:, None], other=0.0)
        q3 = tl.load(q_ptr + q_off[:, None] + 3 * W + offs_w[None, :], mask=row_ok[:, None], other=0.0)
    a0 = tl.zeros([BLOCK_M, W], tl.float32)
    if NP == 1:  # one accumulator: the incoming one
        a0 = acc
    a1 = a0
    a2 = a0
    a3 = a0
    grow = tl.full([BLOCK_M], 1.0, tl.float32)  # how much the incoming acc is rescaled
    for it in tl.range((j0 - jbase) * TPP, (j1 - jbase) * TPP, num_stages=QSTAGES):
        page_byte, t, valid, _ = _qtile(bt_row, h, stride_kb, stride_kh, it, jbase, n_tok, ELEM, CAP, QT)
        ks_half = page_byte // 2 + KS // 2
        kr = _key_row(page_byte, t, ROW)
        vr = _value_row(page_byte, t, PAIRED, CAP, ROW)
        # keys first, values after the softmax: the value codes are loaded and unpacked
        # where they are used, so they do not stay live across the key dots
        if NP == 1:
            kc = _qcodes(kvb_ptr, kr, valid, BITS, QT, D, PAIRED, False)
            s = _dot(q0, tl.trans(_deq_keys(kc, kvh_ptr, ks_half, 0, D, D, dtype, F32)), F32)
        if NP == 2:  # int4: both planes in one byte
            kx = _rows(kvb_ptr, kr, valid, PAIRED, W, False)
            s = _dot(q0, tl.trans(_deq_keys(kx & 15, kvh_ptr, ks_half, 0, W, D, dtype, F32)), F32)
            s += _dot(q1, tl.trans(_deq_keys(kx >> 4, kvh_ptr, ks_half, W, W, D, dtype, F32)), F32)
        if NP == 4:  # int2: four planes in one byte
            kx = _rows(kvb_ptr, kr, valid, PAIRED, W, False)
            s = _dot(q0, tl.trans(_deq_keys(kx & 3, kvh_ptr, ks_half, 0, W, D, dtype, F32)), F32)
            s += _dot(q1, tl.trans(_deq_keys((kx >> 2) & 3, kvh_ptr, ks_half, W, W, D, dtype, F32)), F32)
            s += _dot(q2, tl.trans(_deq_keys((kx >> 4) & 3, kvh_ptr, ks_half, 2 * W, W, D, dtype, F32)), F32)
            s += _dot(q3, tl.trans(_deq_keys(kx >> 6, kvh_ptr, ks_half, 3 * W, W, D, dtype, F32)), F32)
        s = tl.where(valid[None, :], s * scale2, float("-inf"))
        p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i)
        vs = tl.load(kvh_ptr + page_byte // 2 + VS // 2 + t, mask=valid, other=0.0).to(tl.float32)
        vz = tl.load(kvh_ptr + page_byte // 2 + VS // 2 + CAP + t, mask=valid, other=0.0).to(tl.float32)
        pv = _mm_in(p * vs[None, :], dtype, F32)
        z = tl.sum(p * vz[None, :], 1)[:, None]
        grow = grow * alpha
        if NP == 1:
            vc = _qcodes(kvb_ptr, vr, valid, BITS, QT, D, PAIRED, True)
            a0 = a0 * alpha[:, None] + _dot(pv, _codes(vc, dtype, MAG, F32), F32) + z
        if NP == 2:
            vx = _rows(kvb_ptr, vr, valid, PAIRED, W, True)
            a0 = a0 * alpha[:, None] + _dot(pv, _codes(vx & 15, dtype, MAG, F32), F32) + z
            a1 = a1 * alpha[:, None] + _dot(pv, _codes(vx >> 4, dtype, MAG, F32), F32) + z
        if NP == 4:
            vx = _rows(kvb_ptr, vr, valid, PAIRED, W, True)
            a0 = a0 * alpha[:, None] + _dot(pv, _codes(vx & 3, dtype, MAG, F32), F32) + z
            a1 = a1 * alpha[:, None] + _dot(pv, _codes((vx >> 2) & 3, dtype, MAG, F32), F32) + z
            a2 = a2 * alpha[:, None] + _dot(pv, _codes((vx >> 4) & 3, dtype, MAG, F32), F32) + z
            a3 = a3 * alpha[:, None] + _dot(pv, _codes(vx >> 6, dtype, MAG, F32), F32) + z
    if NP == 1:
        acc = a0
    else:
        acc = acc * grow[:, None] + _join_planes(a0, a1, a2, a3, NP, BLOCK_M, D)
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
# The batch's row count is not specialised on (==1, %16 variants would JIT-compile in the
# middle of serving, seconds each for the tagged kernel).
@triton.jit(do_not_specialize=["num_reqs"])
def _fwd_kernel(
    q_ptr, kv_ptr, kvb_ptr, kvh_ptr, tag_ptr,
    bt_ptr, qsl_ptr, seq_ptr, kept_ptr, live_ptr,
    out_ptr, lse_ptr, pacc_ptr, pml_ptr, cnt_ptr,
    scale2, num_reqs, max_blocks,
    stride_qt, stride_qh, stride_kb, stride_kh, stride_bt, stride_ot, stride_oh,
    H_Q: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr, TILE_P: tl.constexpr,
    NUM_SPLITS: tl.constexpr, HAS_TAGS: tl.constexpr, HAS8: tl.constexpr, HAS4: tl.constexpr,
    HAS2: tl.constexpr, ELEM: tl.constexpr, MAG: tl.constexpr, MAG8: tl.constexpr, CAP8: tl.constexpr, CAP4: tl.constexpr,
    CAP2: tl.constexpr, QT8: tl.constexpr, QT4: tl.constexpr, QT2: tl.constexpr,
    SCAN: tl.constexpr, WRITE_LSE: tl.constexpr, F32: tl.constexpr, QSTAGES: tl.constexpr,
    PLANES: tl.constexpr, QSEP: tl.constexpr, PSPLITS: tl.constexpr, ONE_TILE: tl.constexpr = False,
    TWO_LOOPS: tl.constexpr = False, ARRIVE: tl.constexpr = False,
):
    """QSEP: a sorted region's quantized run is read by quant_decode._qrun_kernel, which
    writes partials beside ours (PSPLITS slots per row: NUM_SPLITS of ours, then its).
    ONE_TILE: no request has more than BLOCK_Q queries (decode), program pid is request pid.
    ARRIVE (decode, launched as the CUDA twin's programmatic dependent, quant_decode.PDL):
    the twin runs beside us; each program counts itself done in cnt_ptr[r * H_kv + h] and
    the row's last (of PSPLITS) merges every partial. Program (0, 0, 0) leaves only after the
    twin has finished, so that what follows in the stream sees both kernels done. (Only one:
    a program waiting holds its SM room, and the forward's programs take turns in what the
    twin leaves -- all of them waiting put most of them after the twin, 8.5 us later.)
    Each program lets a kernel launched as our dependent start (quant_decode.CUDA_EARLY:
    the next layer's twin begins its scan; it waits for us before anything we touch)."""
    if ARRIVE:
        gdc_launch_dependents()
    pid = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    if ONE_TILE:  # no binary search over query_start_loc: a chain of dependent loads per program
        r = pid
    else:
        r = _find_request(pid, qsl_ptr, num_reqs, BLOCK_Q)
    q_start = tl.load(qsl_ptr + r)
    q_len = tl.load(qsl_ptr + r + 1) - q_start
    q_tile = 0 if ONE_TILE else pid - (q_start // BLOCK_Q + r)
    if q_tile * BLOCK_Q >= q_len:
        if ARRIVE:
            if (pid == 0) & (h == 0) & (split == 0):
                gdc_wait()
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
        nf = nc
    last_pos = seq_len - q_len + tl.minimum(q_len, (q_tile + 1) * BLOCK_Q) - 1
    lb0 = live_start // BS
    n_ent = nc + tl.maximum(tl.cdiv(last_pos + 1, BS) - lb0, 0)
    per = tl.cdiv(n_ent, NUM_SPLITS)
    e0 = split * per
    e1 = tl.minimum(n_ent, e0 + per)
    ce1 = tl.minimum(e1, nc)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)

    run_sorted = True
    if HAS_TAGS:
        run_sorted = sorted_ok
    if run_sorted:
        # full compacted pages (all of them without tags), then one run of quantized pages
        acc, m_i, l_i = _attend_positions(acc, m_i, l_i, q, q_pos, kv_ptr, bt_row, h, stride_kb, stride_kh,
                                          e0 * BS, tl.minimum(tl.minimum(ce1, nf) * BS, kept), False,
                                          scale2, D, BS, TILE_N, F32, TWO_LOOPS)
        if HAS_TAGS and not QSEP:
            j0 = tl.maximum(e0, nf)
            n_q = kept - nf * BS
            if HAS4:
                if qbits == 4:
                    acc, m_i, l_i = _attend_qrun(acc, m_i, l_i, q_ptr, q_off, row_ok, kvb_ptr, kvh_ptr, bt_row, h,
                                                 stride_kb, stride_kh, j0, ce1, nf, n_q, scale2, q.dtype, ELEM, 4,
                                                 CAP4, QT4, D, BLOCK_M, MAG, F32, QSTAGES, PLANES, BS == PAIR_BS)
            if HAS2:
                if qbits == 2:
                    acc, m_i, l_i = _attend_qrun(acc, m_i, l_i, q_ptr, q_off, row_ok, kvb_ptr, kvh_ptr, bt_row, h,
                                                 stride_kb, stride_kh, j0, ce1, nf, n_q, scale2, q.dtype, ELEM, 2,
                                                 CAP2, QT2, D, BLOCK_M, MAG, F32, QSTAGES, PLANES, BS == PAIR_BS)
            if HAS8:
                if qbits == 8:
                    acc, m_i, l_i = _attend_qrun(acc, m_i, l_i, q_ptr, q_off, row_ok, kvb_ptr, kvh_ptr, bt_row, h,
                                                 stride_kb, stride_kh, j0, ce1, nf, n_q, scale2, q.dtype, ELEM, 8,
                                                 CAP8, QT8, D, BLOCK_M, MAG8, F32, QSTAGES, PLANES, False)
    else:
        # any order: one page at a time, dispatching on its tag
        off = _tokens_before(bt_row, tag_ptr, e0, BS, CAP8, CAP4, CAP2, SCAN)
        for j in range(e0, ce1):
            tag = tl.load(tag_ptr + tl.load(bt_row + j).to(tl.int64))
            cap = _cap_of(tag, BS, CAP8, CAP4, CAP2)
            cnt = tl.minimum(cap, kept - off)
            if tag == 0:
                acc, m_i, l_i = _attend_positions(acc, m_i, l_i, q, q_pos, kv_ptr, bt_row, h, stride_kb,
                                                  stride_kh, j * BS, j * BS + cnt, False, scale2, D, BS,
                                                  TILE_P, F32, TWO_LOOPS)
            if HAS4:
                if tag == 4:
                    acc, m_i, l_i = _attend_qrun(acc, m_i, l_i, q_ptr, q_off, row_ok, kvb_ptr, kvh_ptr, bt_row, h,
                                                 stride_kb, stride_kh, j, j + 1, j, cnt, scale2, q.dtype, ELEM,
                                                 4, CAP4, QT4, D, BLOCK_M, MAG, F32, QSTAGES, PLANES, BS == PAIR_BS)
            if HAS2:
                if tag == 2:
                    acc, m_i, l_i = _attend_qrun(acc, m_i, l_i, q_ptr, q_off, row_ok, kvb_ptr, kvh_ptr, bt_row, h,
                                                 stride_kb, stride_kh, j, j + 1, j, cnt, scale2, q.dtype, ELEM,
                                                 2, CAP2, QT2, D, BLOCK_M, MAG, F32, QSTAGES, PLANES, BS == PAIR_BS)
            if HAS8:
                if tag == 8:
                    acc, m_i, l_i = _attend_qrun(acc, m_i, l_i, q_ptr, q_off, row_ok, kvb_ptr, kvh_ptr, bt_row, h,
                                                 stride_kb, stride_kh, j, j + 1, j, cnt, scale2, q.dtype, ELEM,
                                                 8, CAP8, QT8, D, BLOCK_M, MAG8, F32, QSTAGES, PLANES, False)
            off += cap
    le0 = tl.maximum(e0, nc) - nc + lb0
    le1 = tl.maximum(e1, nc) - nc + lb0
    acc, m_i, l_i = _attend_positions(acc, m_i, l_i, q, q_pos, kv_ptr, bt_row, h, stride_kb, stride_kh,
                                      tl.maximum(le0 * BS, live_start), tl.minimum(le1 * BS, last_pos + 1),
                                      True, scale2, D, BS, TILE_N, F32, TWO_LOOPS)

    if PSPLITS == 1:
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        o_row = (q_start + tok).to(tl.int64) * stride_ot + hq * stride_oh
        tl.store(out_ptr + o_row[:, None] + offs_d[None, :], (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None])
        if WRITE_LSE:
            tl.store(lse_ptr + (q_start + tok).to(tl.int64) * H_Q + hq, m_i + tl.log2(l_safe), mask=row_ok)
    else:
        # partials: [T, H_Q, NUM_SPLITS, D] and [T, H_Q, NUM_SPLITS, 2]
        prow = ((q_start + tok).to(tl.int64) * H_Q + hq) * PSPLITS + split
        tl.store(pacc_ptr + prow[:, None] * D + offs_d[None, :], acc, mask=row_ok[:, None])
        tl.store(pml_ptr + prow * 2, m_i, mask=row_ok)
        tl.store(pml_ptr + prow * 2 + 1, l_i, mask=row_ok)
        if ARRIVE:
            # every thread's partial stored (barrier), then published with the count
            # (release); the last program of the row reads the others' (acquire, from L2)
            tl.debug_barrier()
            c = cnt_ptr + r.to(tl.int64) * tl.num_programs(1) + h
            if tl.atomic_add(c, 1, sem="acq_rel", scope="gpu") == PSPLITS - 1:
                tl.store(c, 0)
                p0 = ((q_start + tok).to(tl.int64) * H_Q + hq) * PSPLITS
                o_row = (q_start + tok).to(tl.int64) * stride_ot + hq * stride_oh
                _merge_rows(pacc_ptr, pml_ptr, out_ptr, lse_ptr, p0, o_row, (q_start + tok).to(tl.int64) * H_Q + hq,
                            row_ok, offs_d, PSPLITS, D, WRITE_LSE)
            if (pid == 0) & (h == 0) & (split == 0):
                gdc_wait()


@triton.jit
def _merge_rows(pacc_ptr, pml_ptr, out_ptr, lse_ptr, p0, o_row, lse_row, row_ok, offs_d, PSPLITS: tl.constexpr,
                D: tl.constexpr, WRITE_LSE: tl.constexpr):
    """_reduce_kernel's merge for a tile of query rows (partials of row i at p0[i] + split),
    read from L2: other programs wrote them."""
    m_max = tl.full(p0.shape, float("-inf"), tl.float32)
    for s in tl.static_range(PSPLITS):
        m_max = tl.maximum(m_max, tl.load(pml_ptr + (p0 + s) * 2, mask=row_ok, other=float("-inf"),
                                          cache_modifier=".cg"))
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    l_tot = tl.zeros(p0.shape, tl.float32)
    acc = tl.zeros([p0.shape[0], D], tl.float32)
    for s in tl.static_range(PSPLITS):
        w = tl.exp2(tl.load(pml_ptr + (p0 + s) * 2, mask=row_ok, other=float("-inf"), cache_modifier=".cg")
                    - m_max)
        l_tot += w * tl.load(pml_ptr + (p0 + s) * 2 + 1, mask=row_ok, other=0.0, cache_modifier=".cg")
        acc += w[:, None] * tl.load(pacc_ptr + (p0 + s)[:, None] * D + offs_d[None, :], mask=row_ok[:, None],
                                    other=0.0, cache_modifier=".cg")
    l_safe = tl.where(l_tot == 0.0, 1.0, l_tot)
    tl.store(out_ptr + o_row[:, None] + offs_d[None, :], (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None])
    if WRITE_LSE:
        tl.store(lse_ptr + lse_row, m_max + tl.log2(l_safe), mask=row_ok)


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
def _stats_rows(k, keys_ok, kpos, CAUSAL: tl.constexpr, q_ptr, lse_ptr, q_start,
                q_len, seq_len, obs_len, do_mass, h, scale2, stride_qt, stride_qh, N: tl.constexpr,
                H_Q: tl.constexpr, D: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_Q: tl.constexpr, HAS_OBS: tl.constexpr, F32: tl.constexpr):
    """Per-key sums of exp2(s - lse) over all query rows of the request for one key tile,
    with the very score arithmetic of the forward (so the LSE matches). A row that only
    votes reads only its last ``obs_len`` queries (SnapKV at the end of an 8k prefill: 32
    query rows instead of 8192)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    hq = h * G + offs_m % G
    mass = tl.zeros([N], tl.float32)
    obs = tl.zeros([N], tl.float32)
    q_lo = tl.where(do_mass != 0, 0, (q_len - obs_len) // BLOCK_Q * BLOCK_Q)
    for q0 in range(q_lo, q_len, BLOCK_Q):
        tok = q0 + offs_m // G
        row_ok = (offs_m // G < BLOCK_Q) & (tok < q_len)
        q_off = (q_start + tok).to(tl.int64) * stride_qt + hq * stride_qh
        q = tl.load(q_ptr + q_off[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(lse_ptr + (q_start + tok).to(tl.int64) * H_Q + hq, mask=row_ok, other=0.0)
        s = _dot(q, tl.trans(k), F32) * scale2
        keep = row_ok[:, None] & keys_ok[None, :]
        if CAUSAL:
            keep = keep & (kpos[None, :] <= (seq_len - q_len + tok)[:, None])
        p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
        mass += tl.sum(p, 0)
        if HAS_OBS:
            obs += tl.sum(tl.where((tok >= q_len - obs_len)[:, None], p, 0.0), 0)
    return mass, obs


@triton.jit
def _stats_add(mass_ptr, obsout_ptr, slot_off, ok, mass, obs, do_mass, WANT_MASS: tl.constexpr,
               HAS_OBS: tl.constexpr):
    # one program owns each slot: plain read-modify-write, no atomics
    if WANT_MASS:
        okm = ok & ((slot_off * 0 + do_mass) != 0)  # full-shape mask (interpreter)
        tl.store(mass_ptr + slot_off, tl.load(mass_ptr + slot_off, mask=okm, other=0.0) + mass, mask=okm)
    if HAS_OBS:
        tl.store(obsout_ptr + slot_off, tl.load(obsout_ptr + slot_off, mask=ok, other=0.0) + obs, mask=ok)


@triton.jit
def _stats_positions(mass_ptr, obsout_ptr, kv_ptr, bt_row, st_row, h, stride_kb, stride_kh, stride_mb, stride_mh,
                     p0, p1, CAUSAL: tl.constexpr, q_ptr, lse_ptr, q_start, q_len, seq_len, obs_len, do_mass, scale2,
                     stride_qt, stride_qh, TILE_N: tl.constexpr, BS: tl.constexpr, H_Q: tl.constexpr,
                     D: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
                     WANT_MASS: tl.constexpr, HAS_OBS: tl.constexpr, F32: tl.constexpr):
    """Full-precision keys at positions [p0, p1) (compacted ones: CAUSAL=False)."""
    offs_d = tl.arange(0, D)
    for t0 in range(p0, p1, TILE_N):
        pos = t0 + tl.arange(0, TILE_N)
        valid = pos < p1
        base = _pos_base(bt_row, h, stride_kb, stride_kh, pos, valid, D, BS)
        k = tl.load(kv_ptr + base[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        mass, obs = _stats_rows(k, valid, pos, CAUSAL, q_ptr, lse_ptr, q_start, q_len,
                                seq_len, obs_len, do_mass, h, scale2, stride_qt, stride_qh, TILE_N, H_Q, D, G, BLOCK_M,
                                BLOCK_Q, HAS_OBS, F32)
        sb = tl.load(st_row + pos // BS, mask=valid, other=0).to(tl.int64)
        _stats_add(mass_ptr, obsout_ptr, sb * stride_mb + h * stride_mh + pos % BS, valid, mass, obs, do_mass,
                   WANT_MASS, HAS_OBS)


@triton.jit
def _stats_qrun(mass_ptr, obsout_ptr, kvb_ptr, kvh_ptr, bt_row, st_row, h, stride_kb, stride_kh, stride_mb,
                stride_mh, j0, j1, jbase, n_tok, q_ptr, lse_ptr, q_start, q_len, seq_len, obs_len, do_mass, scale2,
                stride_qt, stride_qh, ELEM: tl.constexpr, BITS: tl.constexpr, CAP: tl.constexpr, QT: tl.constexpr,
                H_Q: tl.constexpr, D: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_Q: tl.constexpr, WANT_MASS: tl.constexpr, HAS_OBS: tl.constexpr, F32: tl.constexpr,
                PAIRED: tl.constexpr):
    """Entries [j0, j1) of a run of quantized pages (see _attend_qrun), one page per tile.
    Keys are dequantized by the forward's own _deq_keys, so the scores (and the LSE) match."""
    ROW: tl.constexpr = D * BITS // 8
    KS: tl.constexpr = 2 * CAP * ROW
    TPP: tl.constexpr = (CAP + QT - 1) // QT
    for it in range((j0 - jbase) * TPP, (j1 - jbase) * TPP):
        page_byte, t, valid, j = _qtile(bt_row, h, stride_kb, stride_kh, it, jbase, n_tok, ELEM, CAP, QT)
        kc = _qcodes(kvb_ptr, _key_row(page_byte, t, ROW), valid, BITS, QT, D, PAIRED, False)
        k = _deq_keys(kc, kvh_ptr, page_byte // 2 + KS // 2, 0, D, D, q_ptr.dtype.element_ty, F32)
        mass, obs = _stats_rows(k, valid, t, False, q_ptr, lse_ptr, q_start, q_len, seq_len, obs_len, do_mass, h,
                                scale2, stride_qt, stride_qh, QT, H_Q, D, G, BLOCK_M, BLOCK_Q, HAS_OBS, F32)
        sb = tl.load(st_row + j).to(tl.int64)
        _stats_add(mass_ptr, obsout_ptr, sb * stride_mb + h * stride_mh + t, valid, mass, obs, do_mass, WANT_MASS,
                   HAS_OBS)


@triton.jit
def _stats_kernel(
    q_ptr, kv_ptr, kvb_ptr, kvh_ptr, tag_ptr,
    bt_ptr, st_ptr, qsl_ptr, seq_ptr, kept_ptr, live_ptr, obs_ptr, mrow_ptr, lse_ptr,
    mass_ptr, obsout_ptr,
    scale2, max_blocks,
    stride_qt, stride_qh, stride_kb, stride_kh, stride_bt, stride_st,
    stride_mb, stride_mh,
    H_Q: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr, TILE_P: tl.constexpr, ENT: tl.constexpr,
    HAS_TAGS: tl.constexpr, HAS8: tl.constexpr, HAS4: tl.constexpr, HAS2: tl.constexpr, ELEM: tl.constexpr,
    MAG: tl.constexpr, MAG8: tl.constexpr, CAP8: tl.constexpr, CAP4: tl.constexpr, CAP2: tl.constexpr,
    QT8: tl.constexpr,
    QT4: tl.constexpr, QT2: tl.constexpr, SCAN: tl.constexpr, WANT_MASS: tl.constexpr, HAS_OBS: tl.constexpr,
    MASS_ROWS: tl.constexpr, F32: tl.constexpr,
):
    """Program (request, KV head, chunk of ENT entries); the entry walk mirrors _fwd_kernel."""
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
    do_mass = tl.full([], 0, tl.int32)
    if WANT_MASS:
        do_mass = tl.full([], 1, tl.int32)
        if MASS_ROWS:  # per-row flag: one launch (e.g. captured in a CUDA graph) serves any mix
            do_mass = tl.load(mrow_ptr + r)
    if (q_len == 0) | ((do_mass == 0) & (obs_len == 0)):
        return
    bt_row = bt_ptr + r.to(tl.int64) * stride_bt
    st_row = st_ptr + r.to(tl.int64) * stride_st
    if HAS_TAGS:
        nc, nf, qbits, sorted_ok = _scan_compacted(bt_row, tag_ptr, kept, max_blocks, BS, CAP8, CAP4, CAP2,
                                                   SCAN)
    else:
        nc = tl.cdiv(kept, BS)
        nf = nc
    lb0 = live_start // BS
    n_ent = nc + tl.maximum(tl.cdiv(seq_len, BS) - lb0, 0)
    e0 = chunk * ENT
    if e0 >= n_ent:
        return
    e1 = tl.minimum(n_ent, e0 + ENT)
    ce1 = tl.minimum(e1, nc)
    run_sorted = True
    if HAS_TAGS:
        run_sorted = sorted_ok
    if run_sorted:
        _stats_positions(mass_ptr, obsout_ptr, kv_ptr, bt_row, st_row, h, stride_kb, stride_kh, stride_mb,
                         stride_mh, e0 * BS, tl.minimum(tl.minimum(ce1, nf) * BS, kept), False, q_ptr, lse_ptr,
                         q_start, q_len, seq_len, obs_len, do_mass, scale2, stride_qt, stride_qh, TILE_N, BS, H_Q, D, G,
                         BLOCK_M, BLOCK_Q, WANT_MASS, HAS_OBS, F32)
        if HAS_TAGS:
            j0 = tl.maximum(e0, nf)
            n_q = kept - nf * BS
            if HAS4:
                if qbits == 4:
                    _stats_qrun(mass_ptr, obsout_ptr, kvb_ptr, kvh_ptr, bt_row, st_row, h, stride_kb, stride_kh,
                                stride_mb, stride_mh, j0, ce1, nf, n_q, q_ptr, lse_ptr, q_start, q_len, seq_len,
                                obs_len, do_mass, scale2, stride_qt, stride_qh, ELEM, 4, CAP4, QT4, H_Q, D, G, BLOCK_M, BLOCK_Q,
                                WANT_MASS, HAS_OBS, F32, BS == PAIR_BS)
            if HAS2:
                if qbits == 2:
                    _stats_qrun(mass_ptr, obsout_ptr, kvb_ptr, kvh_ptr, bt_row, st_row, h, stride_kb, stride_kh,
                                stride_mb, stride_mh, j0, ce1, nf, n_q, q_ptr, lse_ptr, q_start, q_len, seq_len,
                                obs_len, do_mass, scale2, stride_qt, stride_qh, ELEM, 2, CAP2, QT2, H_Q, D, G, BLOCK_M, BLOCK_Q,
                                WANT_MASS, HAS_OBS, F32, BS == PAIR_BS)
            if HAS8:
                if qbits == 8:
                    _stats_qrun(mass_ptr, obsout_ptr, kvb_ptr, kvh_ptr, bt_row, st_row, h, stride_kb, stride_kh,
                                stride_mb, stride_mh, j0, ce1, nf, n_q, q_ptr, lse_ptr, q_start, q_len, seq_len,
                                obs_len, do_mass, scale2, stride_qt, stride_qh, ELEM, 8, CAP8, QT8, H_Q, D, G, BLOCK_M, BLOCK_Q,
                                WANT_MASS, HAS_OBS, F32, False)
    else:
        off = _tokens_before(bt_row, tag_ptr, e0, BS, CAP8, CAP4, CAP2, SCAN)
        for j in range(e0, ce1):
            tag = tl.load(tag_ptr + tl.load(bt_row + j).to(tl.int64))
            cap = _cap_of(tag, BS, CAP8, CAP4, CAP2)
            cnt = tl.minimum(cap, kept - off)
            if tag == 0:
                _stats_positions(mass_ptr, obsout_ptr, kv_ptr, bt_row, st_row, h, stride_kb, stride_kh, stride_mb,
                                 stride_mh, j * BS, j * BS + cnt, False, q_ptr, lse_ptr, q_start, q_len, seq_len,
                                 obs_len, do_mass, scale2, stride_qt, stride_qh, TILE_P, BS, H_Q, D, G, BLOCK_M, BLOCK_Q,
                                 WANT_MASS, HAS_OBS, F32)
            if HAS4:
                if tag == 4:
                    _stats_qrun(mass_ptr, obsout_ptr, kvb_ptr, kvh_ptr, bt_row, st_row, h, stride_kb, stride_kh,
                                stride_mb, stride_mh, j, j + 1, j, cnt, q_ptr, lse_ptr, q_start, q_len, seq_len,
                                obs_len, do_mass, scale2, stride_qt, stride_qh, ELEM, 4, CAP4, QT4, H_Q, D, G, BLOCK_M, BLOCK_Q,
                                WANT_MASS, HAS_OBS, F32, BS == PAIR_BS)
            if HAS2:
                if tag == 2:
                    _stats_qrun(mass_ptr, obsout_ptr, kvb_ptr, kvh_ptr, bt_row, st_row, h, stride_kb, stride_kh,
                                stride_mb, stride_mh, j, j + 1, j, cnt, q_ptr, lse_ptr, q_start, q_len, seq_len,
                                obs_len, do_mass, scale2, stride_qt, stride_qh, ELEM, 2, CAP2, QT2, H_Q, D, G, BLOCK_M, BLOCK_Q,
                                WANT_MASS, HAS_OBS, F32, BS == PAIR_BS)
            if HAS8:
                if tag == 8:
                    _stats_qrun(mass_ptr, obsout_ptr, kvb_ptr, kvh_ptr, bt_row, st_row, h, stride_kb, stride_kh,
                                stride_mb, stride_mh, j, j + 1, j, cnt, q_ptr, lse_ptr, q_start, q_len, seq_len,
                                obs_len, do_mass, scale2, stride_qt, stride_qh, ELEM, 8, CAP8, QT8, H_Q, D, G, BLOCK_M, BLOCK_Q,
                                WANT_MASS, HAS_OBS, F32, False)
            off += cap
    le0 = tl.maximum(e0, nc) - nc + lb0
    le1 = tl.maximum(e1, nc) - nc + lb0
    _stats_positions(mass_ptr, obsout_ptr, kv_ptr, bt_row, st_row, h, stride_kb, stride_kh, stride_mb, stride_mh,
                     tl.maximum(le0 * BS, live_start), tl.minimum(le1 * BS, seq_len), True, q_ptr, lse_ptr,
                     q_start, q_len, seq_len, obs_len, do_mass, scale2, stride_qt, stride_qh, TILE_N, BS, H_Q, D, G,
                     BLOCK_M, BLOCK_Q, WANT_MASS, HAS_OBS, F32)


# ----------------------------------------------------------------------------- launch
def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _num_sms(device: torch.device) -> int:
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 4


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# Decode with few (request, KV head) rows -- long contexts at small batch, the
# flash-decoding regime: 128-token key tiles, a deeper pipeline and 16 splits. Measured on
# an H200 beside SDPA flash (benchmarks/probe_qtile.py --part fewrows, docs/kernels.md):
# 8 x 64k 0.561 -> 0.509 ms (flash 0.53-0.59), 4 x 128k 0.601 -> 0.503 (0.57-0.63),
# 16 x 32k 0.558 -> 0.520 (0.53-0.58), 2 x 128k 0.325 -> 0.262 (0.29-0.30); 16 x 8k
# 0.157 -> 0.161 (0.144). The default (64-token tiles, 3 stages, splits to fill the GPU
# twice) stays for batches that fill the GPU by themselves (tuned at 64 x 8192).
FEW_ROWS_SPLITS = 16


def _few_rows_decode(device: torch.device, rows: int, D: int, BS: int, es: int, max_seq_len: int):
    """(config, num_splits) of a decode launch over ``rows`` = B x H_kv rows of full-precision
    pages; (None, None) = the default heuristic."""
    if rows > _num_sms(device) or D > 128:
        return None, None
    index = -1  # the interpreter
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
    config = _few_rows_config(index, D, es)
    if config is None:
        return None, None
    entries = -(-max_seq_len // BS) + 1
    return config, max(1, min(FEW_ROWS_SPLITS, entries * BS // 128))


@functools.lru_cache(maxsize=None)
def _few_rows_config(index: int, D: int, es: int) -> dict | None:
    """The few-rows tiling on device ``index`` (-1: the interpreter, no shared-memory limit):
    the deepest pipeline whose K+V tiles fit -- Triton's pipeliner keeps num_stages - 1 of
    them in shared memory. Computed once (decode launches run per layer)."""
    smem = 1 << 30 if index < 0 else \
        int(getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", 0))
    stages = next((st for st in (4, 3, 2) if (st - 1) * 128 * 2 * D * es + 16384 <= smem), None)
    return None if stages is None else {"TILE_N": 128, "num_stages": stages}


def _default_splits(device: torch.device, rows: int, max_seq_len: int, BS: int) -> int:
    """Flash-decoding splits of the default decode launch: enough programs to fill the GPU
    twice over, but >= 4 entries per split."""
    want = -(-2 * _num_sms(device) // max(1, rows))
    entries = -(-max_seq_len // BS) + 1
    return max(1, min(want, entries // 4, 64))


def _freeze(config):
    return tuple(sorted(config.items())) if config else None


@functools.lru_cache(maxsize=256)
def _launch_consts(D, BS, G, dtype, has_tags, page_bits, decode, config):
    from vllm_kvcomp.ops.quant import page_capacity

    config = dict(config) if config else None
    es = torch.empty((), dtype=dtype).element_size()
    caps = {b: page_capacity(b, BS, D, es) for b in (8, 4, 2)}
    qts = {b: min(_pow2(c), 128 if D <= 128 else 64) for b, c in caps.items()}
    # Quantized tiles of this kernel: one page (padded to QT slots) per step. Several pages
    # per step (batched 3-D dots, or one 2-D tile over two pages) measured 1.6-4x slower
    # here on the H100. Decode over a sorted run goes to quant_decode instead (codes
    # converted in packed pairs, one-warp programs): 1.6-1.9x faster on the H200.
    f32 = _INTERPRET or dtype == torch.float32
    mag = {torch.bfloat16: 128, torch.float16: 1024, torch.float32: 0}[dtype]
    assert set(page_bits) <= {8, 4, 2}
    # Tiling: a decode tile is one token x the G heads of a KV group (>= 16 rows for
    # tl.dot); prefill tiles pack 64-128 rows. Key tiles of 64 tokens (32 at D=256): K+V of
    # one tile is 32 KB in bf16, so 3 pipeline stages fit in shared memory. These were the
    # best of a sweep on an H100 (docs/kernels.md): decode 4 warps x 3 stages, 85-90% of
    # copy bandwidth; prefill 128 x 64 tiles, 4 warps (x 3 stages with two loops, below).
    if decode:
        BLOCK_M = max(16, _pow2(G))
    else:
        BLOCK_M = max(64 if D > 128 else 128, _pow2(G))
    TILE_N = 64 if D <= 128 else 32
    num_warps, num_stages = 4, 3
    # Prefill splits the key loop in two (TWO_LOOPS): whole tiles below the query tile's
    # diagonal without masks, then the masked rest. H200, 128 x 64 tiles: 3 stages 1.06-1.13x
    # of SDPA flash, 2 stages 0.92-0.98x (one masked loop: 0.86-0.91x, 3 stages no better).
    # Decode keeps one loop: two cost 0.488 -> 0.673 ms at 64 x 8192 (benchmarks/probe_loops.py).
    two_loops = not decode
    # quantized runs pipeline 2 deep (1: 1.6x slower, 3: within 2%; docs/kernels.md)
    qstages = 2
    # Plane-wise quantized loop for decode tiles (16-32 rows); prefill tiles read unpacked
    # tiles (_attend_qrun): planes at 64/128 rows with a 2-deep pipeline gave wrong results
    # and illegal addresses on the H100 (Triton 3.6); unpacked tiles at 128 rows make a fresh
    # prompt's prefill in an engine with quantized pages 1.10x of no tags (planes at 32 rows,
    # the earlier workaround: 2.3x).
    planes = None
    # Register cap of decode launches that may read quantized pages: the tag paths compile to
    # ~250 registers per thread (2 programs of 4 warps per SM); capped at 128 (4 per SM,
    # some spills) at 64 x 8192 on the H100: int4 0.83 -> 0.66-0.72 ms, int2 0.69 -> 0.66,
    # int8 1.75 -> 1.03, full pages via tags 0.86 -> 0.83; caps of 144-168 were slower than
    # none (benchmarks/probe_qtile.py --part maxnreg, docs/kernels.md). Pages of 32-64
    # tokens (tiles of 128 slots) spill too much under the cap: int4 0.87 ms vs 0.66-0.71.
    maxnreg = 128 if decode and has_tags and BS * D <= 2048 else None
    if config:
        qstages = config.get("QSTAGES", qstages)
        BLOCK_M = config.get("BLOCK_M", BLOCK_M)
        TILE_N = config.get("TILE_N", TILE_N)
        num_warps = config.get("num_warps", num_warps)
        num_stages = config.get("num_stages", num_stages)
        planes = config.get("PLANES", planes)
        maxnreg = config.get("maxnreg", maxnreg)
        two_loops = bool(config.get("TWO_LOOPS", two_loops))
    if planes is None:
        planes = BLOCK_M <= 32
    BLOCK_Q = BLOCK_M // G
    common = dict(D=D, BS=BS, G=G, BLOCK_M=BLOCK_M, BLOCK_Q=BLOCK_Q, TILE_N=TILE_N,
                  TILE_P=min(TILE_N, BS), HAS_TAGS=has_tags, HAS8=has_tags and 8 in page_bits,
                  HAS4=has_tags and 4 in page_bits, HAS2=has_tags and 2 in page_bits, ELEM=es, MAG=mag,
                  MAG8=0 if mag == 128 else mag,
                  CAP8=caps[8], CAP4=caps[4], CAP2=caps[2], QT8=qts[8], QT4=qts[4], QT2=qts[2], SCAN=256, F32=f32)
    return common, caps, (BLOCK_M, TILE_N, num_warps, num_stages, qstages, planes, maxnreg, two_loops)


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
    mass_rows: torch.Tensor | None = None,  # [B] int32: 0 = no mass for this row (default: all rows)
    stat_table: torch.Tensor | None = None,  # [B, max_blocks]: where stats of an entry go (default block_table)
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    page_bits: tuple[int, ...] = (8, 4, 2),  # formats that may appear in compacted regions
    stats_tags: bool = True,  # False: rows with statistics have no quantized pages (caller's promise)
    config: dict | None = None,  # overrides for benchmarking: BLOCK_M, TILE_N, num_warps, num_stages, QSTAGES,
    #                              PLANES, maxnreg, TWO_LOOPS
) -> torch.Tensor:
    """Causal attention of a varlen batch over each request's compacted + live keys.

    Request r owns queries ``q[query_start_loc[r]:query_start_loc[r+1]]`` at positions
    ``seq_lens[r] - q_len .. seq_lens[r] - 1`` and reads compacted tokens ``[0, kept[r])``
    (all visible; through ``page_tag`` if given, see docs/page_format.md) and live positions
    ``[live_start[r], seq_len)`` (causal) -- ``reference.paged_attention`` per request.
    Returns ``out`` (written in place if given).

    Statistics are *accumulated per slot*: ``mass_cache[blk, h, slot] +=`` the probability
    each key got, summed over all queries of the request and the G query heads of KV head h
    (H2O) -- only rows with ``mass_rows[r] != 0`` when given; ``obs_cache`` the same over the
    last ``obs_queries[r]`` queries (SnapKV). Rows with neither are skipped. ``blk`` is
    ``stat_table[r, entry]`` (default: the block itself). Costs a second pass over K.

    ``max_query_len``/``max_seq_len`` avoid a device sync (vLLM has both on the host);
    under CUDA graphs pass a fixed ``num_splits`` (and ``max_seq_len`` for statistics) so the
    grids do not change. ``page_bits`` lists the formats that may occur (fewer = smaller
    kernel); a page of a format not listed would be skipped. ``stats_tags=False`` runs the
    statistics pass as if every page were full: right when no row with statistics has a
    quantized page (the backend's case: only never-compacted rows vote or demote), and
    then statistics need only ``block_size`` slots per page.
    """
    T, H_q, D = q.shape
    nb, H_kv, BS, D2 = kv_cache.shape
    B = seq_lens.shape[0]
    assert D2 == 2 * D and D in (32, 64, 128, 256), f"head dim {D} unsupported"
    assert H_q % H_kv == 0
    assert kv_cache.stride(3) == 1 and kv_cache.stride(2) == D2, "pages must be contiguous [bs, 2D]"
    assert q.stride(2) == 1 and q.dtype == kv_cache.dtype
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
    if mass_rows is not None:
        assert mass_rows.dtype == torch.int32 and mass_rows.shape[0] >= B
    stats = want_mass or has_obs
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max()) if B else 0
    if max_seq_len is None and (stats or num_splits is None):
        max_seq_len = int(seq_lens.max()) if B else 0
    if B == 0 or T == 0:
        return out

    kvb = kv_cache.view(torch.uint8)
    kvh = kv_cache.view(torch.float16)
    tags = page_tag if page_tag is not None else seq_lens  # dummy pointer when unused
    decode = max_query_len <= 1
    fwd_config = config
    if num_splits is None and config is None and decode and page_tag is None:
        fwd_config, num_splits = _few_rows_decode(q.device, B * H_kv, D, BS, kv_cache.element_size(),
                                                  max_seq_len)
    # Everything below depends on shapes only: computed once per shape (host time per
    # layer matters: attention runs between CUDA graph pieces).
    common, caps, tiling = _launch_consts(D, BS, G, kv_cache.dtype, page_tag is not None,
                                          tuple(page_bits), decode, _freeze(fwd_config))
    BLOCK_M, TILE_N, num_warps, num_stages, qstages, planes, maxnreg, two_loops = tiling
    BLOCK_Q = BLOCK_M // G
    one_tile = max_query_len <= BLOCK_Q
    n_qtiles = B if one_tile else T // BLOCK_Q + B
    if num_splits is None:
        num_splits = _default_splits(q.device, B * H_kv, max_seq_len, BS) if decode else 1
    from . import quant_decode  # (imports this module)

    # decode over a sorted region's quantized run: its own launch (quant_decode), whose
    # partials the reduction merges with ours -- unless statistics read quantized pages:
    # they recompute scores with this kernel's arithmetic (bf16 keys), so the LSE must too
    qsep = decode and page_tag is not None and (config or {}).get("QRUN", True) and \
        not (stats and stats_tags) and quant_decode.supported(D, BS, kv_cache.dtype, tuple(page_bits))
    longest = max_seq_len if max_seq_len is not None else block_table.shape[1] * BS  # no host sync
    qkind, qsplits = quant_decode.plan(q, D=D, BS=BS, G=G, rows=B * H_kv, longest=longest, caps=caps,
                                       page_bits=tuple(page_bits), num_sms=_num_sms(q.device)) if qsep else ("", 0)
    psplits = num_splits + qsplits
    write_lse = stats
    lse = torch.empty(T, H_q, device=q.device, dtype=torch.float32) if (write_lse or psplits > 1) else out
    if psplits > 1:
        pacc = torch.empty(T, H_q, psplits, D, device=q.device, dtype=torch.float32)
        pml = torch.empty(T, H_q, psplits, 2, device=q.device, dtype=torch.float32)
    else:
        pacc = pml = out
    scale2 = float(scale) * LOG2E
    common = dict(common, H_Q=H_q)
    # the CUDA twin on a Hopper: launched first, the forward beside it (quant_decode.PDL)
    arrive = qsep and qkind == "cuda" and quant_decode.pdl(q)

    def run_quant(nfwd):
        return quant_decode.launch(
            qkind, qsplits, q, kv_cache, kvb, tags, block_table, query_start_loc, kept, pacc, pml, scale2, G=G,
            psplits=psplits, split0=num_splits, caps=caps, page_bits=tuple(page_bits),
            has={8: common["HAS8"], 4: common["HAS4"], 2: common["HAS2"]}, F32=common["F32"], out=out, lse=lse,
            write_lse=write_lse, nfwd=nfwd)

    merged = arrive and run_quant(num_splits)
    _fwd_kernel[(n_qtiles, H_kv, num_splits)](
        q, kv_cache, kvb, kvh, tags, block_table, query_start_loc, seq_lens, kept, live_start,
        out, lse, pacc, pml, quant_decode.row_counters(q.device, B * H_kv) if arrive else seq_lens, scale2, B,
        block_table.shape[1], q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1),
        block_table.stride(0), out.stride(0), out.stride(1),
        NUM_SPLITS=num_splits, WRITE_LSE=write_lse, num_warps=num_warps, num_stages=num_stages, QSTAGES=qstages,
        PLANES=planes, QSEP=qsep, PSPLITS=psplits, ONE_TILE=one_tile, TWO_LOOPS=two_loops, ARRIVE=arrive,
        **({"maxnreg": maxnreg} if maxnreg and q.is_cuda else {}), **({"launch_pdl": True} if arrive else {}),
        **common)
    if qsep and not arrive:
        merged = run_quant(0)
    if psplits > 1 and not merged:
        _reduce_kernel[(T, H_q)](pacc, pml, out, lse, out.stride(0), out.stride(1), H_Q=H_q, D=D,
                                 NUM_SPLITS=psplits, SPLITS_P2=_pow2(psplits), WRITE_LSE=write_lse)
    if stats:
        stat = mass_cache if want_mass else obs_cache
        assert stat.dtype == torch.float32 and stat.stride(2) == 1 and stat.shape[1] == H_kv
        if want_mass and has_obs:
            assert obs_cache.stride() == mass_cache.stride() and obs_cache.shape == mass_cache.shape
        stat_tags = page_tag is not None and stats_tags  # False: read every page as full
        if stat_tags != (page_tag is not None) or fwd_config is not config:
            # the statistics pass keeps the caller's tiling (the forward may have taken few-rows')
            common = dict(_launch_consts(D, BS, G, kv_cache.dtype, stat_tags, tuple(page_bits), decode,
                                         _freeze(config))[0], H_Q=H_q)
        need = max(caps.values()) if page_tag is not None and stats_tags else BS
        assert stat.shape[2] >= need, f"stat tensors need {need} slots per page"
        st = stat_table if stat_table is not None else block_table
        assert st.dtype == torch.int32 and st.stride(1) == 1
        ENT = 16
        n_chunks = -(-(-(-max_seq_len // BS) + 1) // ENT)
        _stats_kernel[(B, H_kv, n_chunks)](
            q, kv_cache, kvb, kvh, tags, block_table, st, query_start_loc, seq_lens, kept, live_start,
            obs_queries if has_obs else seq_lens, mass_rows if mass_rows is not None else seq_lens, lse,
            mass_cache if want_mass else stat, obs_cache if has_obs else stat, scale2, block_table.shape[1],
            q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), block_table.stride(0),
            st.stride(0), stat.stride(0), stat.stride(1),
            ENT=ENT, WANT_MASS=want_mass, HAS_OBS=has_obs, MASS_ROWS=mass_rows is not None, num_warps=4,
            **common)
    return out
