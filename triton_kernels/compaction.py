"""Compaction and quantization of KV pages, on the GPU.

Semantics: ``vllm_kvcomp.ops.reference.compact`` and ``vllm_kvcomp.ops.quant.compact_mixed``.

Compaction moves kept candidates into the request's first block-table entries, and the
destination pages overlap the sources (old compacted tokens are candidates again), so it
runs in two phases, like the reference (gather to a copy, then scatter):

  _gather_kernel       one program per (KV head, kept token): reads the token from its
                       source page (full or quantized, dequantized to fp32) into a dense
                       scratch ``[H_kv, n, 2D]`` fp32 (+ its attention mass). fp32 keeps
                       full-precision tokens bit exact through the round trip.
  _store_full_kernel   one program per (KV head, destination token): scratch -> full page.
  _store_quant_kernel  one program per (KV head, destination page): two passes over the
                       page's tokens in tiles of QT -- per-channel key min/max, then codes;
                       values are per token. Codes are packed in planes (channel c in byte
                       c % ROW at bit (c // ROW) * bits) with a reshape and a shift-sum.

Where a source lives is resolved on the host side with torch ops on the device (cumsum of
page capacities + searchsorted): no host round trip beyond the request's ``kept``.

Decode folds in place (recompressing policies; ``reference.fold_swap``):

  _fold_swap_kernel    one program per (row x KV head, layer): pairs given losers with the
                       folded winners and moves the winners into the losers' slots.
  _fold_evict_kernel   the same, scoring and choosing the losers itself (StreamingLLM,
                       H2O): the whole fold in one launch.

A packing compaction (a prompt's; ``reference.place``):

  _place_kernel        one program per (row x KV head, layer): the winners into the
                       region's first slots, in order, without a scratch copy.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .paged_attention import PAIR_BS, _code_byte, _key_row, _pow2, _unpack, _value_row

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# Counts vary per request: not specialised on (Triton would otherwise compile a variant
# per divisibility class -- ==1, %16 -- in the middle of serving).
@triton.jit(do_not_specialize=["n_sel"])
def _gather_kernel(kv_ptr, kvb_ptr, kvh_ptr, src_blk_ptr, src_slot_ptr, src_tag_ptr, tmp_ptr,
                   mass_ptr, tmp_mass_ptr, n_sel, stride_kb, stride_kh, stride_mb, stride_mh, stride_l, n_rows,
                   HKV: tl.constexpr, D: tl.constexpr, ELEM: tl.constexpr, CAP8: tl.constexpr,
                   CAP4: tl.constexpr, CAP2: tl.constexpr, HAS_MASS: tl.constexpr, BS: tl.constexpr):
    # program 0 = (layer, row, KV head): one call compacts several requests in every layer
    pid = tl.program_id(0)
    h = pid % HKV
    layer = (pid // HKV) // n_rows
    i = tl.program_id(1)
    idx = pid * n_sel + i
    b = tl.load(src_blk_ptr + idx).to(tl.int64)
    t = tl.load(src_slot_ptr + idx)
    tag = tl.load(src_tag_ptr + idx)
    offs_d = tl.arange(0, D)
    page = layer.to(tl.int64) * stride_l + b * stride_kb + h * stride_kh
    dst = tmp_ptr + idx.to(tl.int64) * (2 * D)
    if tag == 0:
        k = tl.load(kv_ptr + page + t * (2 * D) + offs_d).to(tl.float32)
        v = tl.load(kv_ptr + page + t * (2 * D) + D + offs_d).to(tl.float32)
    elif tag == 8:
        k, v = _dequant_token(kvb_ptr, kvh_ptr, page * ELEM, t, 8, CAP8, D, False)
    elif tag == 4:
        k, v = _dequant_token(kvb_ptr, kvh_ptr, page * ELEM, t, 4, CAP4, D, BS == PAIR_BS)
    else:
        k, v = _dequant_token(kvb_ptr, kvh_ptr, page * ELEM, t, 2, CAP2, D, BS == PAIR_BS)
    tl.store(dst + offs_d, k)
    tl.store(dst + D + offs_d, v)
    if HAS_MASS:
        tl.store(tmp_mass_ptr + idx, tl.load(mass_ptr + b * stride_mb + h * stride_mh + t))


@triton.jit
def _dequant_token(kvb_ptr, kvh_ptr, page_byte, t, BITS: tl.constexpr, CAP: tl.constexpr, D: tl.constexpr,
                   PAIRED: tl.constexpr):
    ROW: tl.constexpr = D * BITS // 8
    KS: tl.constexpr = 2 * CAP * ROW
    VS: tl.constexpr = KS + 4 * D
    offs_r = tl.arange(0, ROW)
    offs_d = tl.arange(0, D)
    half = page_byte // 2
    kb = tl.load(kvb_ptr + _key_row(page_byte, t, ROW) + _code_byte(offs_r, PAIRED, False))
    vb = tl.load(kvb_ptr + _value_row(page_byte, t, PAIRED, CAP, ROW) + _code_byte(offs_r, PAIRED, True))
    kb = kb[None, None, :].to(tl.int32)
    vb = vb[None, None, :].to(tl.int32)
    kq = tl.reshape(_unpack(kb, BITS, 1, 1, D), (D,)).to(tl.float32)
    vq = tl.reshape(_unpack(vb, BITS, 1, 1, D), (D,)).to(tl.float32)
    ks = tl.load(kvh_ptr + half + KS // 2 + offs_d).to(tl.float32)
    kz = tl.load(kvh_ptr + half + KS // 2 + D + offs_d).to(tl.float32)
    vs = tl.load(kvh_ptr + half + VS // 2 + t).to(tl.float32)
    vz = tl.load(kvh_ptr + half + VS // 2 + CAP + t).to(tl.float32)
    return kq * ks + kz, vq * vs + vz


@triton.jit
def _round_to(x, dtype, INTERP: tl.constexpr):
    """fp32 -> model dtype, round to nearest even. The interpreter truncates fp32->bf16, so
    there the rounding is done on the bits (finite values)."""
    if INTERP and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit(do_not_specialize=["n_sel", "first"])
def _store_full_kernel(kv_ptr, tmp_ptr, dst_blk_ptr, tmp_mass_ptr, mass_ptr, n_sel, first,
                       stride_kb, stride_kh, stride_mb, stride_mh, stride_l, n_rows, stride_row,
                       HKV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, HAS_MASS: tl.constexpr,
                       INTERP: tl.constexpr):
    pid = tl.program_id(0)  # (layer, row, KV head)
    h = pid % HKV
    row = (pid // HKV) % n_rows
    layer = (pid // HKV) // n_rows
    i = tl.program_id(1)
    offs = tl.arange(0, 2 * D)
    b = tl.load(dst_blk_ptr + row * stride_row + i // BS).to(tl.int64)
    x = tl.load(tmp_ptr + (pid * n_sel + first + i).to(tl.int64) * (2 * D) + offs)
    page = layer.to(tl.int64) * stride_l + b * stride_kb + h * stride_kh
    tl.store(kv_ptr + page + (i % BS) * (2 * D) + offs, _round_to(x, kv_ptr.dtype.element_ty, INTERP))
    if HAS_MASS:
        tl.store(mass_ptr + b * stride_mb + h * stride_mh + i % BS, tl.load(tmp_mass_ptr + pid * n_sel + first + i))


@triton.jit
def _quantize(x, mn, mx, BITS: tl.constexpr):
    """codes of x against the fp16-rounded scale/zero of [mn, mx] (broadcast shapes)."""
    QMAX: tl.constexpr = (1 << BITS) - 1
    s = tl.math.div_rn(mx - mn, tl.full(mx.shape, QMAX, tl.float32)).to(tl.float16).to(tl.float32)
    z = mn.to(tl.float16).to(tl.float32)
    safe = tl.where(s > 0, s, 1.0)
    c = tl.floor(tl.math.div_rn(x - z, safe) + 0.5)
    c = tl.where(s > 0, c, 0.0)
    c = tl.minimum(tl.maximum(c, 0.0), QMAX)
    return c.to(tl.int32), s, z


@triton.jit
def _pack(c, N: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """[N, D] codes -> [N, ROW] bytes in planes (docs/page_format.md): channel c goes to byte
    c % ROW at bit (c // ROW) * BITS."""
    PER: tl.constexpr = 8 // BITS
    ROW: tl.constexpr = D // PER
    if BITS == 8:
        return c.to(tl.uint8)
    c3 = tl.reshape(c, (N, PER, ROW))
    shifts = tl.arange(0, PER) * BITS
    return tl.sum(c3 << shifts[None, :, None], 1).to(tl.uint8)


@triton.jit(do_not_specialize=["n_sel", "first", "n_tok"])
def _store_quant_kernel(kvb_ptr, kvh_ptr, tmp_ptr, dst_blk_ptr, tmp_mass_ptr, mass_ptr, n_sel, first, n_tok,
                        stride_kb, stride_kh, stride_mb, stride_mh, stride_l, n_rows, stride_row,
                        HKV: tl.constexpr, D: tl.constexpr, ELEM: tl.constexpr, BITS: tl.constexpr,
                        CAP: tl.constexpr, QT: tl.constexpr, HAS_MASS: tl.constexpr, PAIRED: tl.constexpr):
    """Page p of a run of quantized pages: scratch tokens [first + p*CAP, ... + count)."""
    pid = tl.program_id(0)  # (layer, row, KV head)
    h = pid % HKV
    row = (pid // HKV) % n_rows
    layer = (pid // HKV) // n_rows
    p = tl.program_id(1)
    ROW: tl.constexpr = D * BITS // 8
    KS: tl.constexpr = 2 * CAP * ROW
    VS: tl.constexpr = KS + 4 * D
    b = tl.load(dst_blk_ptr + row * stride_row + p).to(tl.int64)
    page_byte = (layer.to(tl.int64) * stride_l + b * stride_kb + h * stride_kh) * ELEM
    half = page_byte // 2
    t_first = p * CAP
    count = tl.minimum(CAP, n_tok - t_first)
    src = tmp_ptr + (pid * n_sel + first + t_first).to(tl.int64) * (2 * D)
    offs_d = tl.arange(0, D)
    offs_r = tl.arange(0, ROW)
    # pass 1: per-channel key range over the page's tokens
    mn = tl.full([D], float("inf"), tl.float32)
    mx = tl.full([D], float("-inf"), tl.float32)
    for t0 in range(0, count, QT):
        t = t0 + tl.arange(0, QT)
        ok = t < count
        k = tl.load(src + t[:, None] * (2 * D) + offs_d[None, :], mask=ok[:, None], other=0.0)
        mn = tl.minimum(mn, tl.min(tl.where(ok[:, None], k, float("inf")), 0))
        mx = tl.maximum(mx, tl.max(tl.where(ok[:, None], k, float("-inf")), 0))
    # pass 2: codes (keys per channel, values per token) and value scales
    for t0 in range(0, count, QT):
        t = t0 + tl.arange(0, QT)
        ok = t < count
        k = tl.load(src + t[:, None] * (2 * D) + offs_d[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(src + t[:, None] * (2 * D) + D + offs_d[None, :], mask=ok[:, None], other=0.0)
        kc, ks, kz = _quantize(k, mn[None, :], mx[None, :], BITS)
        vmn = tl.min(v, 1)
        vmx = tl.max(v, 1)
        vc, vs, vz = _quantize(v, vmn[:, None], vmx[:, None], BITS)
        kp = _pack(kc, QT, D, BITS)
        vp = _pack(vc, QT, D, BITS)
        if not PAIRED:
            tl.store(kvb_ptr + page_byte + t[:, None] * ROW + offs_r[None, :], kp, mask=ok[:, None])
            tl.store(kvb_ptr + page_byte + CAP * ROW + t[:, None] * ROW + offs_r[None, :], vp, mask=ok[:, None])
        else:
            # the bytes in the twin's operand pair order (quant.paired, key_byte, value_byte),
            # moved in registers so that the stores stay contiguous: key bytes 1 and 2 of every
            # 4 swapped; value rows of token pairs interleaved 2 bytes at a time
            kp = tl.reshape(tl.permute(tl.reshape(kp, (QT, ROW // 4, 2, 2)), (0, 1, 3, 2)), (QT, ROW))
            tl.store(kvb_ptr + page_byte + t[:, None] * ROW + offs_r[None, :], kp, mask=ok[:, None])
            vp = tl.reshape(tl.permute(tl.reshape(vp, (QT // 2, 2, ROW // 2, 2)), (0, 2, 1, 3)), (QT // 2, 2 * ROW))
            i = t0 // 2 + tl.arange(0, QT // 2)
            c = tl.arange(0, 2 * ROW)  # byte c of a pair's row is token (c >> 1) & 1's
            tl.store(kvb_ptr + page_byte + CAP * ROW + i[:, None] * (2 * ROW) + c[None, :], vp,
                     mask=2 * i[:, None] + ((c[None, :] >> 1) & 1) < count)
        tl.store(kvh_ptr + half + VS // 2 + t, tl.reshape(vs, (QT,)).to(tl.float16), mask=ok)
        tl.store(kvh_ptr + half + VS // 2 + CAP + t, tl.reshape(vz, (QT,)).to(tl.float16), mask=ok)
        if HAS_MASS:
            m = tl.load(tmp_mass_ptr + pid * n_sel + first + t_first + t, mask=ok)
            tl.store(mass_ptr + b * stride_mb + h * stride_mh + t, m, mask=ok)
    s = tl.math.div_rn(mx - mn, tl.full([D], (1 << BITS) - 1, tl.float32))
    tl.store(kvh_ptr + half + KS // 2 + offs_d, s.to(tl.float16))
    tl.store(kvh_ptr + half + KS // 2 + D + offs_d, mn.to(tl.float16))


# ----------------------------------------------------------------------------- launch
def _check_cache(kv_cache: torch.Tensor) -> None:
    assert kv_cache.dim() == 4 and kv_cache.shape[3] % 2 == 0
    assert kv_cache.stride(3) == 1 and kv_cache.stride(2) == kv_cache.shape[3], "pages must be contiguous"
    assert kv_cache.dtype in (torch.float16, torch.bfloat16, torch.float32)
    d = kv_cache.shape[3] // 2
    assert d & (d - 1) == 0 and d >= 32, f"head dim {d} unsupported"


def _sources(kv_cache, page_tag, block_row, kept, positions):
    """(block, slot, tag) of positions: ``p < kept`` compacted tokens (through the tags),
    else live positions at block_row[p // bs]. Torch ops on the device, no sync."""
    from vllm_kvcomp.ops.quant import capacities

    bs = kv_cache.shape[2]
    pos = positions.long()
    blk = block_row.long()[pos // bs]
    slot = pos % bs
    tag = torch.zeros_like(pos, dtype=torch.int8)
    if page_tag is not None and kept > 0:
        upper = -(-kept // bs)
        caps_lut = torch.zeros(9, dtype=torch.long, device=pos.device)
        for t, c in capacities(kv_cache).items():
            caps_lut[t] = c
        ptag = page_tag[block_row[:upper].long()]
        caps = caps_lut[ptag.long()]
        end = caps.cumsum(0)
        comp = pos < kept
        j = torch.searchsorted(end, pos, right=True).clamp(max=upper - 1)
        blk = torch.where(comp, block_row.long()[j], blk)
        slot = torch.where(comp, pos - (end[j] - caps[j]), slot)
        tag = torch.where(comp, ptag[j], tag)
    return blk, slot, tag


def compact_mixed(kv_cache: torch.Tensor, mass_cache: torch.Tensor | None, page_tag: torch.Tensor | None,
                  block_row: torch.Tensor, kept: int, cand_positions: torch.Tensor,
                  keep_full: torch.Tensor, keep_quant: torch.Tensor | None = None, bits: int = 0) -> int:
    """GPU ``quant.compact_mixed`` (see there); ``page_tag=None`` reads all sources as full
    pages and writes no tags. Returns the new ``kept``."""
    from vllm_kvcomp.ops.quant import BITS, page_capacity, paired

    _check_cache(kv_cache)
    nb, hkv, bs, d2 = kv_cache.shape
    d = d2 // 2
    dev = kv_cache.device
    if keep_quant is None:
        keep_quant = torch.empty(hkv, 0, dtype=torch.long, device=dev)
    n_full, n_quant = keep_full.shape[1], keep_quant.shape[1]
    assert keep_full.shape[0] == hkv and keep_quant.shape[0] == hkv
    if n_quant:
        assert bits in BITS and page_tag is not None, "quantized pages need a tag tensor"
        assert n_full % bs == 0, "full-precision part must fill whole pages"
    n_sel = n_full + n_quant
    if n_sel == 0:
        return 0
    has_mass = mass_cache is not None
    if has_mass:
        assert mass_cache.dtype == torch.float32 and mass_cache.stride(2) == 1 and mass_cache.shape[1] == hkv
    blk, slot, tag = _sources(kv_cache, page_tag, block_row, kept, cand_positions)
    sel = torch.cat([keep_full, keep_quant], 1).long()
    src_blk = blk[sel].to(torch.int32).contiguous()
    src_slot = slot[sel].to(torch.int32).contiguous()
    src_tag = tag[sel].contiguous()
    tmp = torch.empty(hkv, n_sel, d2, device=dev, dtype=torch.float32)
    tmp_mass = torch.empty(hkv, n_sel, device=dev, dtype=torch.float32) if has_mass else tmp
    es = kv_cache.element_size()
    caps = {b: page_capacity(b, bs, d, es) for b in BITS}
    kvb, kvh = kv_cache.view(torch.uint8), kv_cache.view(torch.float16)
    mass = mass_cache if has_mass else tmp
    ms = (mass.stride(0), mass.stride(1)) if has_mass else (0, 0)
    _gather_kernel[(hkv, n_sel)](
        kv_cache, kvb, kvh, src_blk, src_slot, src_tag, tmp, mass, tmp_mass, n_sel,
        kv_cache.stride(0), kv_cache.stride(1), *ms, 0, 1,
        HKV=hkv, D=d, ELEM=es, CAP8=caps[8], CAP4=caps[4], CAP2=caps[2], HAS_MASS=has_mass, BS=bs, num_warps=1)
    row = block_row.to(torch.int32)
    if n_full:
        _store_full_kernel[(hkv, n_full)](
            kv_cache, tmp, row, tmp_mass, mass, n_sel, 0, kv_cache.stride(0), kv_cache.stride(1), *ms, 0, 1, 0,
            HKV=hkv, D=d, BS=bs, HAS_MASS=has_mass, INTERP=_INTERPRET, num_warps=1)
        if page_tag is not None:
            page_tag[block_row[: -(-n_full // bs)].long()] = 0
    if n_quant:
        cap = caps[bits]
        if has_mass:
            assert mass_cache.shape[2] >= cap, "mass_cache must have a slot per quantized-page token"
        n_pages = -(-n_quant // cap)
        dst = row[n_full // bs: n_full // bs + n_pages].contiguous()
        qt = min(_pow2(cap), 64 if d <= 128 else 32)
        _store_quant_kernel[(hkv, n_pages)](
            kvb, kvh, tmp, dst, tmp_mass, mass, n_sel, n_full, n_quant,
            kv_cache.stride(0), kv_cache.stride(1), *ms, 0, 1, 0,
            HKV=hkv, D=d, ELEM=es, BITS=bits, CAP=cap, QT=qt, HAS_MASS=has_mass, PAIRED=paired(bits, bs),
            num_warps=4)
        page_tag[dst.long()] = bits
    return n_sel


def compact_mixed_layers(kv: torch.Tensor, page_tag: torch.Tensor, block_rows: torch.Tensor, n_cand: int,
                         keep_full: torch.Tensor, keep_quant: torch.Tensor, bits: int) -> None:
    """``compact_mixed`` of a prompt's first compaction for several requests in every layer
    at once (three launches in all): ``kv [L, nb, H_kv, bs, 2D]`` (layers equally spaced in
    one allocation), ``block_rows [G, W]``, candidates = positions ``[0, n_cand)`` of each
    row (nothing compacted before), ``keep_full [L, G, H_kv, n_full]`` and ``keep_quant
    [L, G, H_kv, n_quant]`` index them. Tags are per block, so every layer writes the same."""
    from vllm_kvcomp.ops.quant import BITS, page_capacity, paired

    L, nb, hkv, bs, d2 = kv.shape
    d = d2 // 2
    _check_cache(kv[0])
    G = block_rows.shape[0]
    n_full, n_quant = keep_full.shape[-1], keep_quant.shape[-1]
    assert keep_full.shape[:3] == (L, G, hkv) and keep_quant.shape[:3] == (L, G, hkv)
    assert bits in BITS and n_full % bs == 0
    n_sel = n_full + n_quant
    if n_sel == 0:
        return
    dev = kv.device
    rows = block_rows.to(torch.int32).contiguous()
    pos = torch.arange(n_cand, device=dev)
    src_blk_all = rows.long()[:, pos // bs]  # [G, n_cand]
    sel = torch.cat([keep_full, keep_quant], -1).long()  # [L, G, H, n_sel]
    src_blk = src_blk_all[None, :, None, :].expand(L, G, hkv, n_cand).gather(3, sel).to(torch.int32).contiguous()
    src_slot = (sel % bs).to(torch.int32).contiguous()  # position p sits at slot p % bs
    src_tag = torch.zeros_like(src_slot, dtype=torch.int8)
    tmp = torch.empty(L * G * hkv, n_sel, d2, device=dev, dtype=torch.float32)
    es = kv.element_size()
    caps = {b: page_capacity(b, bs, d, es) for b in BITS}
    kvb, kvh = kv.view(torch.uint8), kv.view(torch.float16)
    sl, sb, sh = kv.stride(0), kv.stride(1), kv.stride(2)
    grid0 = L * G * hkv
    _gather_kernel[(grid0, n_sel)](
        kv, kvb, kvh, src_blk, src_slot, src_tag, tmp, tmp, tmp, n_sel, sb, sh, 0, 0, sl, G,
        HKV=hkv, D=d, ELEM=es, CAP8=caps[8], CAP4=caps[4], CAP2=caps[2], HAS_MASS=False, BS=bs, num_warps=1)
    if n_full:
        _store_full_kernel[(grid0, n_full)](
            kv, tmp, rows, tmp, tmp, n_sel, 0, sb, sh, 0, 0, sl, G, rows.stride(0),
            HKV=hkv, D=d, BS=bs, HAS_MASS=False, INTERP=_INTERPRET, num_warps=1)
        page_tag[rows[:, : n_full // bs].reshape(-1).long()] = 0
    if n_quant:
        cap = caps[bits]
        n_pages = -(-n_quant // cap)
        dst = rows[:, n_full // bs:]  # row r's quantized pages: its next n_pages entries
        qt = min(_pow2(cap), 64 if d <= 128 else 32)
        _store_quant_kernel[(grid0, n_pages)](
            kvb, kvh, tmp, dst, tmp, tmp, n_sel, n_full, n_quant, sb, sh, 0, 0, sl, G, rows.stride(0),
            HKV=hkv, D=d, ELEM=es, BITS=bits, CAP=cap, QT=qt, HAS_MASS=False, PAIRED=paired(bits, bs),
            num_warps=4)
        page_tag[dst[:, :n_pages].reshape(-1).long()] = bits


def compact(kv_cache: torch.Tensor, mass_cache: torch.Tensor | None, block_row: torch.Tensor,
            cand_positions: torch.Tensor, keep: torch.Tensor, page_tag: torch.Tensor | None = None) -> None:
    """GPU ``reference.compact`` (full-precision pages). With ``page_tag``, the destination
    pages are tagged full (tags of a compacted region must be right; see quant.py)."""
    compact_mixed(kv_cache, mass_cache, None, block_row, 0, cand_positions, keep)
    if page_tag is not None and keep.shape[1]:
        page_tag[block_row[: -(-keep.shape[1] // kv_cache.shape[2])].long()] = 0


# A decode fold in place (reference.fold_swap): one program per (layer, row, KV head) pairs
# the losers with the winners in registers and moves the winners -- one launch where the
# PyTorch version takes ~20 (sorts, scatters, gathers, index_put per tensor), which made a
# fold launch-bound (~0.5 ms at the Llama-3-8B shape, docs/gpu.md).
@triton.jit
def _swap_move(kv_ptr, mass_ptr, pos_ptr, lose, cblk_ptr, coff_ptr, cpos_ptr, k0, e, n, lay, g, h,
               s_kl, s_kb, s_kh, s_ks, s_ml, s_mb, s_mh, s_ms, s_pl, s_pb, s_ph, s_ps,
               E: tl.constexpr, DD: tl.constexpr, CH: tl.constexpr):
    """``lose``: [E] loser candidate indices of one (layer, row, head), padded with INT32_MAX."""
    j = tl.arange(0, E)
    lose = tl.sort(lose)  # old losers (< k0) first, ascending
    f = k0 + j  # the folded candidates
    lost = tl.sum((lose[None, :] == f[:, None]).to(tl.int32), axis=1) > 0
    won = (j < e) & (lost == 0)
    rank = tl.cumsum(won.to(tl.int32), axis=0) - 1
    # the rank-th old loser's candidate index (a gather from registers, as a one-hot sum)
    hole = tl.sum(tl.where(j[None, :] == rank[:, None], lose[None, :], 0), axis=1)
    dst = tl.where(won, hole, f)  # a folded loser "moves" onto itself (its position is written)
    _move_tokens(kv_ptr, mass_ptr, pos_ptr, f, dst, j < e, won, cblk_ptr, coff_ptr, cpos_ptr, n, lay, g, h,
                 s_kl, s_kb, s_kh, s_ks, s_ml, s_mb, s_mh, s_ms, s_pl, s_pb, s_ph, s_ps, DD, CH)


@triton.jit
def _move_tokens(kv_ptr, mass_ptr, pos_ptr, f, dst, ok, won, cblk_ptr, coff_ptr, cpos_ptr, n, lay, g, h,
                 s_kl, s_kb, s_kh, s_ks, s_ml, s_mb, s_mh, s_ms, s_pl, s_pb, s_ph, s_ps,
                 DD: tl.constexpr, CH: tl.constexpr):
    """Candidates ``f`` (folded) -> slots of candidates ``dst``: KV and mass where ``won``,
    the position wherever ``ok`` (a folded loser's own slot included, like the reference)."""
    crow = g.to(tl.int64) * n
    sb = tl.load(cblk_ptr + crow + f, mask=ok, other=0).to(tl.int64)
    so = tl.load(coff_ptr + crow + f, mask=ok, other=0).to(tl.int64)
    db = tl.load(cblk_ptr + crow + dst, mask=ok, other=0).to(tl.int64)
    do = tl.load(coff_ptr + crow + dst, mask=ok, other=0).to(tl.int64)
    src_kv = kv_ptr + lay * s_kl + sb * s_kb + h * s_kh + so * s_ks
    dst_kv = kv_ptr + lay * s_kl + db * s_kb + h * s_kh + do * s_ks
    for c in range(0, DD, CH):  # the token's K|V row in chunks that stay in registers
        ch = c + tl.arange(0, CH)
        x = tl.load(src_kv[:, None] + ch[None, :], mask=won[:, None])
        tl.store(dst_kv[:, None] + ch[None, :], x, mask=won[:, None])
    m = tl.load(mass_ptr + lay * s_ml + sb * s_mb + h * s_mh + so * s_ms, mask=won)
    tl.store(mass_ptr + lay * s_ml + db * s_mb + h * s_mh + do * s_ms, m, mask=won)
    p = tl.load(cpos_ptr + crow + f, mask=ok, other=0)
    tl.store(pos_ptr + lay * s_pl + db * s_pb + h * s_ph + do * s_ps, p.to(tl.int32), mask=ok)


@triton.jit(do_not_specialize=["k0", "e", "n"])
def _fold_swap_kernel(kv_ptr, mass_ptr, pos_ptr, lose_ptr, cblk_ptr, coff_ptr, cpos_ptr, k0, e, n,
                      s_kl, s_kb, s_kh, s_ks, s_ml, s_mb, s_mh, s_ms, s_pl, s_pb, s_ph, s_ps,
                      H: tl.constexpr, E: tl.constexpr, DD: tl.constexpr, CH: tl.constexpr):
    # grid (rows x heads, layers): the number of rows folding together varies step to step
    # and is not a compile-time constant (a recompile per count inside serving)
    r0 = tl.program_id(0)
    r = tl.program_id(1) * tl.num_programs(0) + r0
    j = tl.arange(0, E)
    # Sentinel past every candidate, so padding sorts last and matches no folded index.
    lose = tl.load(lose_ptr + r.to(tl.int64) * e + j, mask=j < e, other=2147483647).to(tl.int32)
    _swap_move(kv_ptr, mass_ptr, pos_ptr, lose, cblk_ptr, coff_ptr, cpos_ptr, k0, e, n,
               tl.program_id(1).to(tl.int64), r0 // H, (r0 % H).to(tl.int64),
               s_kl, s_kb, s_kh, s_ks, s_ml, s_mb, s_mh, s_ms, s_pl, s_pb, s_ph, s_ps, E, DD, CH)


# The whole fold of a policy whose score the kernel can compute itself (StreamingLLM:
# position; H2O: accumulated mass; both per head, unshared): candidate positions and
# scores, sinks and window protected as ``policies.base.protect_ends`` does, the ``e``
# lowest, then the pairing and the move. One launch instead of the policy's ~15 PyTorch
# ops on the host, which bound a fold once the move was one launch (docs/gpu.md).
# The e lowest are found without sorting: bisection on the score's bits for the e-th
# smallest value (~32 block-wide counts; a bitonic sort of 2,048 keys cost ~10x more).
@triton.jit(do_not_specialize=["k0", "e", "n", "sinks", "window"])
def _fold_evict_kernel(kv_ptr, mass_ptr, pos_ptr, scr_ptr, cblk_ptr, coff_ptr, cpos_ptr, k0, e, n, sinks, window,
                       s_kl, s_kb, s_kh, s_ks, s_ml, s_mb, s_mh, s_ms, s_pl, s_pb, s_ph, s_ps,
                       H: tl.constexpr, E: tl.constexpr, NP: tl.constexpr, DD: tl.constexpr,
                       CH: tl.constexpr, BY_MASS: tl.constexpr):
    r0 = tl.program_id(0)  # grid (rows x heads, layers), as _fold_swap_kernel
    r = tl.program_id(1) * tl.num_programs(0) + r0
    lay, g, h = tl.program_id(1).to(tl.int64), r0 // H, (r0 % H).to(tl.int64)
    i = tl.arange(0, NP)
    valid = i < n
    old = i < k0
    crow = g.to(tl.int64) * n
    blk = tl.load(cblk_ptr + crow + i, mask=valid, other=0).to(tl.int64)
    off = tl.load(coff_ptr + crow + i, mask=valid, other=0).to(tl.int64)
    p_old = tl.load(pos_ptr + lay * s_pl + blk * s_pb + h * s_ph + off * s_ps, mask=old, other=0)
    p_new = tl.load(cpos_ptr + crow + i, mask=valid & (i >= k0), other=0)
    p = tl.where(old, p_old.to(tl.int64), p_new.to(tl.int64))
    if BY_MASS:
        s = tl.load(mass_ptr + lay * s_ml + blk * s_mb + h * s_mh + off * s_ms, mask=valid, other=0.0)
    else:
        s = p.to(tl.float32)  # newer wins
    newest = tl.max(tl.where(valid, p, -1), axis=0)
    safe = (p < sinks) | ((window > 0) & (p > newest - window))
    s = tl.where(safe, float("inf"), s)
    # fp32 -> int32 of the same order (negatives: flip the magnitude bits)
    b = s.to(tl.int32, bitcast=True)
    key = tl.where(valid, tl.where(b >= 0, b, b ^ 0x7FFFFFFF), 2147483647)
    lo = tl.min(key, axis=0).to(tl.int64)
    hi = tl.max(key, axis=0).to(tl.int64)
    while lo < hi:  # smallest t with #{key <= t} >= e
        mid = lo + (hi - lo) // 2
        ge = tl.sum((key <= mid).to(tl.int32), axis=0) >= e
        lo, hi = tl.where(ge, lo, mid + 1), tl.where(ge, mid, hi)
    less = key < lo
    eq = key == lo  # ties at the threshold: the lowest indices lose
    lose = less | (eq & (tl.cumsum(eq.to(tl.int32), axis=0) <= e - tl.sum(less.to(tl.int32), axis=0)))
    # Pairing through scratch (2e ints per program): old losers by ascending index, then
    # each folded candidate's destination: the matching old loser's slot, or its own.
    ol = lose & old
    holes = scr_ptr + r.to(tl.int64) * (2 * e)
    tl.store(holes + tl.cumsum(ol.to(tl.int32), axis=0) - 1, i, mask=ol)
    tl.debug_barrier()
    fw = valid & (i >= k0) & (lose == 0)
    hole = tl.load(holes + tl.cumsum(fw.to(tl.int32), axis=0) - 1, mask=fw, other=0)
    tl.store(holes + e + (i - k0), tl.where(fw, hole, i), mask=valid & (i >= k0))
    tl.debug_barrier()
    j = tl.arange(0, E)
    f = k0 + j
    dst = tl.load(holes + e + j, mask=j < e, other=0)
    _move_tokens(kv_ptr, mass_ptr, pos_ptr, f, dst, j < e, (j < e) & (dst != f), cblk_ptr, coff_ptr, cpos_ptr, n,
                 lay, g, h, s_kl, s_kb, s_kh, s_ks, s_ml, s_mb, s_mh, s_ms, s_pl, s_pb, s_ph, s_ps, DD, CH)


def _fold_checks(kv, mass, pos, cand_blk, cand_off, cand_pos, lc, g, h, k0, e):
    n = cand_blk.shape[1]
    assert kv.dim() == 5 and kv.stride(-1) == 1 and kv.shape[0] == lc and kv.shape[2] == h, kv.shape
    assert mass.shape == pos.shape == kv.shape[:4] and pos.dtype == torch.int32, (mass.shape, pos.shape, pos.dtype)
    assert mass.dtype == torch.float32, mass.dtype
    assert cand_blk.shape == cand_off.shape == cand_pos.shape == (g, n) and n == k0 + e, (cand_blk.shape, k0, e)
    dd = kv.shape[-1]
    assert dd % min(dd, 64) == 0, dd
    return n, dict(E=_pow2(max(e, 16)), DD=dd, CH=min(dd, 64))


def fold_swap(kv: torch.Tensor, mass: torch.Tensor, pos: torch.Tensor, lose: torch.Tensor,
              cand_blk: torch.Tensor, cand_off: torch.Tensor, cand_pos: torch.Tensor, k0: int) -> None:
    """GPU ``reference.fold_swap``, one launch. ``kv`` may be a strided stack of layers."""
    lc, g, h, e = lose.shape
    n, const = _fold_checks(kv, mass, pos, cand_blk, cand_off, cand_pos, lc, g, h, k0, e)
    if e == 0 or lc * g * h == 0:
        return
    _fold_swap_kernel[(g * h, lc)](
        kv, mass, pos, lose.contiguous(), cand_blk.contiguous(), cand_off.contiguous(), cand_pos.contiguous(),
        k0, e, n, *kv.stride()[:4], *mass.stride(), *pos.stride(), H=h, num_warps=4, **const)


# Candidates one program sorts (registers); longer folds take the policy's own path.
FOLD_EVICT_MAX = 4096


def fold_evict(kv: torch.Tensor, mass: torch.Tensor, pos: torch.Tensor, cand_blk: torch.Tensor,
               cand_off: torch.Tensor, cand_pos: torch.Tensor, k0: int, sinks: int, window: int,
               by_mass: bool) -> None:
    """A whole decode fold in place in one launch: the ``e = n - k0`` lowest-scoring
    candidates of each (layer, row, KV head) lose -- score = token position
    (StreamingLLM) or accumulated mass (``by_mass``, H2O), sinks and window protected --
    then ``fold_swap``. Same result as ``policy.evict`` + ``fold_swap`` (tests)."""
    lc, h = kv.shape[0], kv.shape[2]
    g, n = cand_blk.shape
    e = n - k0
    _, const = _fold_checks(kv, mass, pos, cand_blk, cand_off, cand_pos, lc, g, h, k0, e)
    assert n <= FOLD_EVICT_MAX, n
    if e <= 0 or lc * g * h == 0:
        return
    np_ = _pow2(max(n, 16))
    scratch = torch.empty(lc * g * h, 2 * e, dtype=torch.int32, device=kv.device)
    _fold_evict_kernel[(g * h, lc)](
        kv, mass, pos, scratch, cand_blk.contiguous(), cand_off.contiguous(), cand_pos.contiguous(),
        k0, e, n, sinks, window, *kv.stride()[:4], *mass.stride(), *pos.stride(), H=h, NP=np_,
        BY_MASS=by_mass, num_warps=4 if np_ <= 1024 else 8, **const)


# A packing compaction (reference.place): a prompt's, once per request -- 6,144 of 8,192
# tokens dropped and 2,048 packed at StreamingLLM 0.25, in every layer -- or a re-packing
# fold. One program per (row x KV head, layer) walks the winners in order, a tile of B
# tokens at a time: winner j goes to slot j and comes from candidate keep[j] >= j, so a
# tile's destinations are never a later tile's sources and no scratch copy is needed
# (the PyTorch version gathers everything to a copy first: twice the traffic, ~10 ops).
# Within a tile a destination can be another token's source: all loads, a barrier, then
# the stores. Tokens already in place (keep[j] == j, e.g. the sinks) are not copied.
@triton.jit(do_not_specialize=["n", "cap", "s_dg"])
def _place_kernel(kv_ptr, mass_ptr, pos_ptr, keep_ptr, kpos_ptr, cblk_ptr, coff_ptr, dblk_ptr, doff_ptr, n, cap,
                  s_dg, s_kl, s_kb, s_kh, s_ks, s_ml, s_mb, s_mh, s_ms, s_pl, s_pb, s_ph, s_ps,
                  H: tl.constexpr, B: tl.constexpr, DD: tl.constexpr, DP: tl.constexpr, HAS_POS: tl.constexpr):
    r0 = tl.program_id(0)  # grid (rows x heads, layers), as _fold_swap_kernel
    r = tl.program_id(1) * tl.num_programs(0) + r0
    lay, g, h = tl.program_id(1).to(tl.int64), r0 // H, (r0 % H).to(tl.int64)
    crow = g.to(tl.int64) * n
    ch = tl.arange(0, DP)
    for t in range(0, cap, B):
        j = t + tl.arange(0, B)
        ok = j < cap
        c = tl.load(keep_ptr + r.to(tl.int64) * cap + j, mask=ok, other=0)
        sb = tl.load(cblk_ptr + crow + c, mask=ok, other=0).to(tl.int64)
        so = tl.load(coff_ptr + crow + c, mask=ok, other=0).to(tl.int64)
        db = tl.load(dblk_ptr + g.to(tl.int64) * s_dg + j, mask=ok, other=0).to(tl.int64)
        do = tl.load(doff_ptr + j, mask=ok, other=0).to(tl.int64)
        mv = ok & ((sb != db) | (so != do))
        src = kv_ptr + lay * s_kl + sb * s_kb + h * s_kh + so * s_ks
        x = tl.load(src[:, None] + ch[None, :], mask=mv[:, None] & (ch[None, :] < DD))
        m = tl.load(mass_ptr + lay * s_ml + sb * s_mb + h * s_mh + so * s_ms, mask=mv)
        tl.debug_barrier()  # every load of the tile before any store
        dst = kv_ptr + lay * s_kl + db * s_kb + h * s_kh + do * s_ks
        tl.store(dst[:, None] + ch[None, :], x, mask=mv[:, None] & (ch[None, :] < DD))
        tl.store(mass_ptr + lay * s_ml + db * s_mb + h * s_mh + do * s_ms, m, mask=mv)
        if HAS_POS:
            p = tl.load(kpos_ptr + r.to(tl.int64) * cap + j, mask=ok, other=0)
            tl.store(pos_ptr + lay * s_pl + db * s_pb + h * s_ph + do * s_ps, p.to(tl.int32), mask=ok)


def place(kv: torch.Tensor, mass: torch.Tensor, pos: torch.Tensor | None, keep: torch.Tensor,
          cand_blk: torch.Tensor, cand_off: torch.Tensor, dst_blk: torch.Tensor, dst_off: torch.Tensor,
          keep_pos: torch.Tensor | None) -> None:
    """GPU ``reference.place``, one launch. ``kv`` may be a strided stack of layers."""
    lc, g, h, cap = keep.shape
    n = cand_blk.shape[1]
    assert kv.dim() == 5 and kv.stride(-1) == 1 and kv.shape[0] == lc and kv.shape[2] == h, kv.shape
    assert mass.shape == kv.shape[:4] and mass.dtype == torch.float32, (mass.shape, mass.dtype)
    assert cand_blk.shape == cand_off.shape == (g, n) and cap <= n, (cand_blk.shape, cap)
    assert dst_blk.shape[:2] == (g, 1) and dst_blk.shape[2] >= cap and dst_off.shape[2] >= cap, dst_blk.shape
    if pos is not None:
        assert pos.shape == mass.shape and pos.dtype == torch.int32 and keep_pos.shape == keep.shape, pos.shape
    if cap == 0 or lc * g * h == 0:
        return
    dd = kv.shape[-1]
    dp = _pow2(dd)
    b = max(1, min(64, 8192 // dp))  # a tile of B x 2D elements stays in registers (4 warps)
    dblk = dst_blk.reshape(g, -1).contiguous()
    p = pos if pos is not None else mass  # placeholders when there are no positions
    _place_kernel[(g * h, lc)](
        kv, mass, p, keep.contiguous(), keep_pos.contiguous() if pos is not None else keep, cand_blk.contiguous(),
        cand_off.contiguous(), dblk, dst_off.reshape(-1).contiguous(), n, cap, dblk.stride(0),
        *kv.stride()[:4], *mass.stride(), *p.stride(), H=h, B=b, DD=dd, DP=dp, HAS_POS=pos is not None,
        num_warps=4)
