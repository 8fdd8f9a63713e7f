"""Quantized KV pages: the byte format, and its PyTorch reference (CPU path and oracle).

A *page* is what one KV head of one block holds: ``kv_cache[b, h]``, ``block_size * 2 * D``
elements of the model dtype (``P`` bytes). A page is either a *full* page (the model dtype,
``block_size`` tokens, exactly vLLM's layout) or a *quantized* page that reinterprets the
same ``P`` bytes to hold ``page_capacity(bits, ...)`` tokens at ``bits`` in {8, 4, 2}:

    byte 0                                                                        P
    | KQ: cap x D*bits/8 | VQ: cap x D*bits/8 | KS | KZ | VS | VZ |  (unused)  |
      key codes, token-  value codes          fp16[D] fp16[cap]
      major, packed      (same packing)       keys: per channel  values: per token

* keys   (KIVI): per channel over the page's tokens  k = KQ[t, c] * KS[c] + KZ[c]
* values: per token (one group = the head dim)        v = VQ[t, c] * VS[t] + VZ[t]
* codes are unsigned (0 .. 2^bits - 1), asymmetric min/max, round half up;
  packing in planes: channel c sits in byte c % ROW at bit (c // ROW) * bits, ROW = D*bits/8.
* int4/int2 pages of blocks of 16 (``paired``: the CUDA twin's) store their code rows in
  the tensor cores' pair order (``key_byte``, ``value_byte``): key bytes 1 and 2 of every
  4 swapped, value rows of token pairs interleaved 2 bytes at a time; such a page holds
  an even number of tokens.

The precision of each page is a per-block tag ``page_tag: int8[num_blocks]`` (0 = full,
else the bits); all heads of a block share it. A request's *compacted region* is its
block-table entries ``[0, nc)``, filled in order, every page to its capacity except the
last: compacted token ``i`` (``0 <= i < kept``) lives in the page whose cumulative
capacity first exceeds ``i``. With all tags 0 that is exactly ``reference.py``'s mapping
(token ``i`` at position ``i``). The live region ``[live_start, seq_len)`` is always full
precision; tags are read only inside a compacted region. See docs/page_format.md.
"""
from __future__ import annotations

import torch

from vllm_kvcomp.ops import reference as ref

FULL = 0
BITS = (8, 4, 2)
META_DTYPE = torch.float16


# ----------------------------------------------------------------------------- format
def page_bytes(block_size: int, head_dim: int, elem_size: int) -> int:
    return block_size * 2 * head_dim * elem_size


def page_capacity(bits: int, block_size: int, head_dim: int, elem_size: int) -> int:
    """Tokens a page holds at ``bits`` (0 = full precision: ``block_size``)."""
    if bits == FULL:
        return block_size
    assert bits in BITS, bits
    assert head_dim * bits % 8 == 0
    row = head_dim * bits // 8
    # 4*D bytes of per-channel key scale/zero; per token 2 code rows + value scale/zero.
    cap = (page_bytes(block_size, head_dim, elem_size) - 4 * head_dim) // (2 * row + 4)
    return cap & ~1 if paired(bits, block_size) else cap  # value rows go in pairs


PAIR_BLOCK_SIZE = 16  # the block size of pages in pair order: the CUDA twin's only one


def paired(bits: int, block_size: int) -> bool:
    """Whether a page stores its code bytes in the order the CUDA twin's tensor-core operands
    take them (int4/int2 pages of blocks of 16, the only ones the twin reads): one 32-bit word
    then gives two fp16 operand pairs with one lop3 each, on the word and on the word shifted
    by 8 -- no byte permute (csrc/quant_decode.cu; the prmt cost ~75 of 871 SASS instructions
    an int4 page). The Triton kernels gather such bytes one at a time, so other block sizes,
    which only Triton reads, keep the plain order (docs/kernels.md, "pair order")."""
    return bits in (4, 2) and block_size == PAIR_BLOCK_SIZE


def key_byte(e, pair: bool):
    """Where byte ``e`` of a key code row lies in the stored row: in pair order bytes 1 and 2
    of every 4 are swapped, so a word holds bytes (0, 1) in its halves' low bytes and (2, 3)
    8 bits up."""
    return (e & ~3) | ((e & 1) << 1) | ((e >> 1) & 1) if pair else e


def value_byte(t, e, row: int, pair: bool):
    """Offset from VQ of byte ``e`` of token ``t``'s value code row: in pair order the rows of
    tokens 2i and 2i + 1 are interleaved two bytes at a time, so a word holds one byte of each
    token in each half (the value dots' operand pairs are two tokens of one channel)."""
    if pair:
        return (t >> 1) * (2 * row) + (t & 1) * 2 + (e >> 1) * 4 + (e & 1)
    return t * row + e


def page_offsets(bits: int, block_size: int, head_dim: int, elem_size: int) -> dict[str, int]:
    """Byte offsets of the parts of a quantized page (see the module docstring)."""
    cap = page_capacity(bits, block_size, head_dim, elem_size)
    row = head_dim * bits // 8
    kq, vq = 0, cap * row
    ks = 2 * cap * row
    kz = ks + 2 * head_dim
    vs = kz + 2 * head_dim
    vz = vs + 2 * cap
    end = vz + 2 * cap
    assert end <= page_bytes(block_size, head_dim, elem_size)
    return dict(cap=cap, row=row, kq=kq, vq=vq, ks=ks, kz=kz, vs=vs, vz=vz, end=end)


def capacities(kv_cache: torch.Tensor) -> dict[int, int]:
    """{tag: tokens per page} for this cache's geometry."""
    bs, d2 = kv_cache.shape[2], kv_cache.shape[3]
    es = kv_cache.element_size()
    return {t: page_capacity(t, bs, d2 // 2, es) for t in (FULL,) + BITS}


# ----------------------------------------------------------------------------- quantize
def _round(x: torch.Tensor) -> torch.Tensor:
    return torch.floor(x + 0.5)  # half up: the Triton kernels do the same


def quantize_group(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization of ``x`` (float) with statistics reduced over ``dim``.

    Returns ``(codes uint8, scale fp16, zero fp16)``; codes are computed against the fp16
    rounded scale/zero, so ``codes * scale + zero`` is what every reader reconstructs.
    Error bound per group (tested): ``|x - x^| <= (max-min) / (2 (2^bits - 1)) + 2^-10 * max|x|``.
    """
    x = x.float()
    qmax = (1 << bits) - 1
    mn, mx = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = ((mx - mn) / qmax).to(META_DTYPE)
    zero = mn.to(META_DTYPE)
    s, z = scale.float(), zero.float()
    q = torch.where(s > 0, _round((x - z) / torch.where(s > 0, s, 1.0)), 0.0).clamp(0, qmax)
    return q.to(torch.uint8), scale.squeeze(dim), zero.squeeze(dim)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., D] codes -> [..., ROW] bytes, ROW = D*bits/8, in *planes*: channel c sits in
    byte c % ROW at bit (c // ROW) * bits. Plane i (channels [i*ROW, (i+1)*ROW)) is then one
    shift and mask of a row's bytes -- what lets the attention kernel unpack codes in the
    layout it loaded them in (docs/page_format.md)."""
    per = 8 // bits
    c = codes.to(torch.int32).unflatten(-1, (per, -1))
    shifts = torch.arange(per, dtype=torch.int32, device=codes.device) * bits
    return (c << shifts[:, None]).sum(-2).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
    c = (packed.to(torch.int32)[..., None, :] >> shifts[:, None]) & ((1 << bits) - 1)
    return c.flatten(-2).to(torch.uint8)


def write_page(kv_cache: torch.Tensor, block: int, head: int, k: torch.Tensor, v: torch.Tensor, bits: int) -> None:
    """Quantize ``k, v [n, D]`` (n <= capacity) into page (block, head) at ``bits``."""
    blocks = torch.tensor([block], device=kv_cache.device)
    write_pages(kv_cache[:, head:head + 1], blocks, k[None, None], v[None, None], bits)


def _pages_u8(kv_cache: torch.Tensor) -> torch.Tensor:
    """All pages as bytes: a writable uint8 view ``[num_blocks, H_kv, P]``."""
    assert kv_cache.stride(3) == 1 and kv_cache.stride(2) == kv_cache.shape[3], "page must be contiguous"
    return kv_cache.view(torch.uint8).flatten(2)


def _meta(pages: torch.Tensor, off: int, cnt: int) -> torch.Tensor:
    """fp16 ``[..., cnt]`` stored at byte ``off`` of each page (bytes ``[..., P]``)."""
    return pages[..., off:off + 2 * cnt].contiguous().view(META_DTYPE).float()


def read_pages(kv_cache: torch.Tensor, blocks: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``read_page`` for many pages at once: ``(k, v)`` float32 ``[P, H_kv, cap, D]``, all
    ``cap`` slots of blocks ``blocks [P]`` (slots past a page's count hold garbage)."""
    bs, d = kv_cache.shape[2], kv_cache.shape[3] // 2
    blocks = blocks.long()
    if bits == FULL:
        kv = kv_cache[blocks].float()
        return kv[..., :d], kv[..., d:]
    o = page_offsets(bits, bs, d, kv_cache.element_size())
    cap, row = o["cap"], o["row"]
    pages = _pages_u8(kv_cache)[blocks]  # copy [P, H, bytes]
    kpos, vpos = _code_bytes(cap, row, paired(bits, bs), pages.device)
    kq = unpack(pages[..., o["kq"] + kpos].unflatten(-1, (cap, row)), bits).float()
    vq = unpack(pages[..., o["vq"] + vpos].unflatten(-1, (cap, row)), bits).float()
    k = kq * _meta(pages, o["ks"], d)[:, :, None, :] + _meta(pages, o["kz"], d)[:, :, None, :]
    v = vq * _meta(pages, o["vs"], cap)[..., None] + _meta(pages, o["vz"], cap)[..., None]
    return k, v


def write_pages(kv_cache: torch.Tensor, blocks: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                bits: int) -> None:
    """``write_page`` for many pages at once: ``k, v [P, H_kv, n, D]`` (``n <= cap``, the
    same count in every page) into blocks ``blocks [P]`` at ``bits``."""
    bs, d = kv_cache.shape[2], kv_cache.shape[3] // 2
    o = page_offsets(bits, bs, d, kv_cache.element_size())
    n = k.shape[2]
    assert 0 < n <= o["cap"], (n, o["cap"])
    kq, ks, kz = quantize_group(k, bits, dim=2)  # keys: per channel over the page's tokens
    vq, vs, vz = quantize_group(v, bits, dim=3)  # values: per token
    row = o["row"]
    b = blocks.long()
    u8 = _pages_u8(kv_cache)
    kpos, vpos = _code_bytes(n, row, paired(bits, bs), u8.device)
    bi, hi = b[:, None, None], torch.arange(u8.shape[1], device=u8.device)[None, :, None]
    u8[bi, hi, o["kq"] + kpos] = pack(kq, bits).flatten(2)
    u8[bi, hi, o["vq"] + vpos] = pack(vq, bits).flatten(2)
    u8[b, :, o["ks"]:o["ks"] + 2 * d] = ks.contiguous().view(torch.uint8)
    u8[b, :, o["kz"]:o["kz"] + 2 * d] = kz.contiguous().view(torch.uint8)
    u8[b, :, o["vs"]:o["vs"] + 2 * n] = vs.contiguous().view(torch.uint8)
    u8[b, :, o["vz"]:o["vz"] + 2 * n] = vz.contiguous().view(torch.uint8)


def _code_bytes(n: int, row: int, pair: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte offsets (from KQ, from VQ) of tokens [0, n)'s code rows, token-major: [n * row]."""
    t = torch.arange(n, device=device)[:, None]
    e = torch.arange(row, device=device)[None, :]
    return (t * row + key_byte(e, pair)).flatten(), value_byte(t, e, row, pair).flatten()


def read_region(kv_cache: torch.Tensor, page_tag: torch.Tensor | None, block_row: torch.Tensor,
                kept: int) -> torch.Tensor:
    """float32 ``[H_kv, kept, 2D]``: a request's compacted tokens in order, read through
    the tags with one vectorised read per precision (the CPU path's hot loop)."""
    hkv, d2 = kv_cache.shape[1], kv_cache.shape[3]
    pages = compacted_pages(kv_cache, page_tag, block_row, kept)
    out = torch.empty(hkv, kept, d2, device=kv_cache.device)
    for tag in sorted({p[1] for p in pages}):
        mine = [p for p in pages if p[1] == tag]
        blocks = block_row[torch.tensor([p[0] for p in mine], device=block_row.device)]
        k, v = read_pages(kv_cache, blocks, tag)
        kv = torch.cat([k, v], -1)  # [P, H, cap, 2D]
        for i, (_, _, first, n) in enumerate(mine):
            out[:, first:first + n] = kv[i, :, :n]
    return out


# ----------------------------------------------------------------------------- mapping
def compacted_pages(kv_cache: torch.Tensor, page_tag: torch.Tensor | None, block_row: torch.Tensor,
                    kept: int) -> list[tuple[int, int, int, int]]:
    """The compacted region's pages in order: ``(entry j, tag, first token, count)``."""
    caps = capacities(kv_cache)
    upper = -(-kept // kv_cache.shape[2])  # the region never spans more entries than this
    tags = [FULL] * upper if page_tag is None else page_tag[block_row[:upper].long()].tolist()
    pages, off, j = [], 0, 0
    while off < kept:
        tag = tags[j]
        n = min(caps[tag], kept - off)
        pages.append((j, tag, off, n))
        off, j = off + n, j + 1
    return pages


def num_compacted_pages(kv_cache: torch.Tensor, page_tag: torch.Tensor | None, block_row: torch.Tensor,
                        kept: int) -> int:
    """Block-table entries the compacted region occupies (``kept / block_size`` if no tags)."""
    return len(compacted_pages(kv_cache, page_tag, block_row, kept))


def key_slots(kv_cache: torch.Tensor, page_tag: torch.Tensor | None, block_row: torch.Tensor,
              kept: int, live_start: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(block ids, slot in page)`` of each key a request's attention reads, in order
    (compacted then live): the index space of ``mass``/``obs``. Statistics of quantized
    pages use slots up to the page capacity, so ``mass_cache.shape[2]`` must cover it."""
    pos = ref.request_key_positions(kept, live_start, seq_len, block_row.device)
    return position_slots(kv_cache, page_tag, block_row, kept, pos)


def position_slots(kv_cache: torch.Tensor, page_tag: torch.Tensor | None, block_row: torch.Tensor,
                   kept: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(block, slot) of positions: ``p < kept`` compacted tokens, else live positions."""
    bs = kv_cache.shape[2]
    pos = positions.long()
    blk = torch.empty_like(pos)
    slot = torch.empty_like(pos)
    comp = pos < kept
    for j, _, first, n in compacted_pages(kv_cache, page_tag, block_row, kept):
        sel = comp & (pos >= first) & (pos < first + n)
        blk[sel] = int(block_row[j])
        slot[sel] = pos[sel] - first
    live = ~comp
    s = ref.slots_for(block_row, pos[live], bs)
    blk[live], slot[live] = s // bs, s % bs
    return blk, slot


def gather_kv(kv_cache: torch.Tensor, page_tag: torch.Tensor | None, block_row: torch.Tensor,
              kept: int, positions: torch.Tensor) -> torch.Tensor:
    """float32 ``[H_kv, n, 2D]`` K|V of positions: ``p < kept`` compacted tokens (through the
    tags), ``p >= kept`` live positions."""
    hkv, bs = kv_cache.shape[1], kv_cache.shape[2]
    d = kv_cache.shape[3] // 2
    out = torch.empty(hkv, positions.numel(), 2 * d, device=kv_cache.device)
    pos = positions.long()
    comp = pos < kept
    if bool(comp.any()):
        region = read_region(kv_cache, page_tag, block_row, kept)
        out[:, comp] = region[:, pos[comp]]
    live = ~comp
    if bool(live.any()):
        p = pos[live]
        slots = ref.slots_for(block_row, p, bs)
        out[:, live] = kv_cache[slots // bs, :, slots % bs].float().transpose(0, 1)
    return out


# ----------------------------------------------------------------------------- attention
def paged_attention_mixed(q: torch.Tensor, kv_cache: torch.Tensor, page_tag: torch.Tensor | None,
                          block_row: torch.Tensor, kept: int, live_start: int, seq_len: int,
                          scale: float, want_mass: bool = False, obs_queries: int = 0):
    """``reference.paged_attention`` over a compacted region of mixed-precision pages.

    Same outputs; ``mass``/``obs`` index the keys in ``key_slots`` order. Implemented by
    dequantizing the compacted region into a float32 scratch cache and calling the reference.
    """
    hkv, bs, d2 = kv_cache.shape[1:]
    nblk = -(-seq_len // bs)
    scratch = torch.zeros(max(nblk, 1), hkv, bs, d2, device=kv_cache.device)
    if kept:
        kv = gather_kv(kv_cache, page_tag, block_row, kept, torch.arange(kept, device=kv_cache.device))
        nk = -(-kept // bs) * bs
        pad = torch.zeros(hkv, nk - kept, d2, device=kv.device)
        scratch[: nk // bs] = torch.cat([kv, pad], 1).view(hkv, nk // bs, bs, d2).transpose(0, 1)
    for j in range(live_start // bs, nblk):
        scratch[j] = kv_cache[int(block_row[j])].float()
    row = torch.arange(max(nblk, 1), device=kv_cache.device, dtype=torch.int32)
    return ref.paged_attention(q, scratch, row, kept, live_start, seq_len, scale, want_mass, obs_queries)


# ----------------------------------------------------------------------------- compaction
def compact_mixed(kv_cache: torch.Tensor, mass_cache: torch.Tensor | None, page_tag: torch.Tensor,
                  block_row: torch.Tensor, kept: int, cand_positions: torch.Tensor,
                  keep_full: torch.Tensor, keep_quant: torch.Tensor, bits: int) -> int:
    """Rewrite a request's compacted region from candidates, demoting some to ``bits``.

    ``cand_positions``: ``p < kept`` old compacted tokens (read through their tags),
    ``p >= kept`` live positions. ``keep_full [H_kv, n_full]`` (``n_full`` a multiple of
    block_size) and ``keep_quant [H_kv, n_quant]`` index ``cand_positions``. Afterwards
    entries ``[0, n_full/bs)`` are full pages (tag 0) and the next ``ceil(n_quant/cap)``
    pages hold the demoted tokens at ``bits``; their tags are set. ``mass_cache`` moves with
    the tokens. Returns the new ``kept`` (``n_full + n_quant``).
    """
    hkv, bs = kv_cache.shape[1], kv_cache.shape[2]
    d = kv_cache.shape[3] // 2
    n_full, n_quant = keep_full.shape[1], keep_quant.shape[1]
    assert n_full % bs == 0, "full-precision part must fill whole pages"
    assert bits in BITS or n_quant == 0
    cand = gather_kv(kv_cache, page_tag, block_row, kept, cand_positions)  # copy: sources may be overwritten
    m = None
    if mass_cache is not None:
        blk, slot = position_slots(kv_cache, page_tag, block_row, kept, cand_positions)
        m = mass_cache[blk, :, slot].t()  # [H_kv, n_cand]
    heads = torch.arange(hkv, device=kv_cache.device)[:, None]
    # full part: positions [0, n_full) through the plain block mapping
    if n_full:
        sel = cand.gather(1, keep_full[..., None].expand(-1, -1, 2 * d))
        dst = ref.slots_for(block_row, torch.arange(n_full, device=kv_cache.device), bs)
        kv_cache[(dst // bs)[None, :], heads, (dst % bs)[None, :]] = sel.to(kv_cache.dtype)
        page_tag[block_row[: n_full // bs].long()] = FULL
        if m is not None:
            mass_cache[(dst // bs)[None, :], heads, (dst % bs)[None, :]] = m.gather(1, keep_full)
    if n_quant:
        cap = page_capacity(bits, bs, d, kv_cache.element_size())
        sel = cand.gather(1, keep_quant[..., None].expand(-1, -1, 2 * d))
        mq = m.gather(1, keep_quant) if m is not None else None
        if mq is not None:
            assert mass_cache.shape[2] >= cap, "mass_cache must have a slot per quantized-page token"
        j0 = n_full // bs
        n_pages = -(-n_quant // cap)
        blocks = block_row[j0:j0 + n_pages].long()
        whole = n_quant // cap  # pages filled to capacity: one batched write
        if whole:
            q = sel[:, : whole * cap].unflatten(1, (whole, cap)).transpose(0, 1)  # [P, H, cap, 2D]
            write_pages(kv_cache, blocks[:whole], q[..., :d], q[..., d:], bits)
        if n_quant % cap:
            q = sel[None, :, whole * cap:]
            write_pages(kv_cache, blocks[whole:], q[..., :d], q[..., d:], bits)
        page_tag[blocks] = bits
        if mq is not None:
            for p in range(n_pages):
                n = min(cap, n_quant - p * cap)
                mass_cache[blocks[p], :, :n] = mq[:, p * cap:p * cap + n]
    return n_full + n_quant

