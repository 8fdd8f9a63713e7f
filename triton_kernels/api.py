"""The one entry point the backend calls: Triton kernels on CUDA (or under TRITON_INTERPRET=1),
the PyTorch reference otherwise. Same signatures as the functions they replace.

  paged_attention(q, kv_cache, block_row, kept, live_start, seq_len, scale,
                  want_mass=False, obs_queries=0)                    -> reference.paged_attention
  paged_attention_mixed(q, kv_cache, page_tag, block_row, kept, live_start, seq_len, scale,
                        want_mass=False, obs_queries=0)              -> quant.paged_attention_mixed
  paged_attention_batched(q, kv_cache, block_table, query_start_loc, seq_lens, kept, live_start,
                          scale, *, page_tag=None, out=None, mass_cache=None, obs_cache=None,
                          obs_queries=None, mass_rows=None, stat_table=None, max_query_len=None,
                          max_seq_len=None, num_splits=None)          -> out [T, H_q, D]
  write_kv(kv_cache, key, value, slot_mapping, mass=None, obs=None)   -> reference.write_kv
  compact(kv_cache, mass_cache, block_row, cand_positions, keep, page_tag=None)
                                                                    -> reference.compact
  compact_mixed(kv_cache, mass_cache, page_tag, block_row, kept, cand_positions,
                keep_full, keep_quant, bits)                        -> quant.compact_mixed
  fold_swap(kv, mass, pos, lose, cand_blk, cand_off, cand_pos, k0)   -> reference.fold_swap
  place(kv, mass, pos, keep, cand_blk, cand_off, dst_blk, dst_off, keep_pos)
                                                                    -> reference.place
  fold_evict(kv, mass, pos, cand_blk, cand_off, cand_pos, k0, sinks, window, by_mass)
                                          (Triton only; = policy.evict + fold_swap)

Batched statistics are *accumulated per slot* (``mass_cache[block, h, slot] += ...``), the
layout H2O keeps anyway; per-request calls return ``[H_kv, n]`` in key order like the
reference. See docs/kernels.md.
"""
from __future__ import annotations

import os

import torch

from vllm_kvcomp.ops import quant, reference

# Tests set this (with TRITON_INTERPRET=1 at import of the kernel modules) to run the
# Triton path on CPU tensors; otherwise CPU tensors take the reference path.
FORCE_TRITON = os.environ.get("VLLM_KVCOMP_FORCE_TRITON", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or FORCE_TRITON


def _i32(x, device) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.int32, device=device)


def paged_attention_mixed(q, kv_cache, page_tag, block_row, kept, live_start, seq_len, scale,
                          want_mass=False, obs_queries=0):
    if not use_triton(q):
        return quant.paged_attention_mixed(q, kv_cache, page_tag, block_row, kept, live_start, seq_len,
                                           scale, want_mass, obs_queries)
    from .compaction import _sources
    from .paged_attention import paged_attention_batched

    dev = q.device
    nq = q.shape[0]
    hkv, bs = kv_cache.shape[1], kv_cache.shape[2]
    row = block_row.to(torch.int32)[None].contiguous()
    mass = obs = st = oq = None
    if want_mass or obs_queries:
        # statistics go to a private per-entry tensor (stat_table = 0..n-1), then key order
        nblk = row.shape[1]
        slots = max(quant.capacities(kv_cache).values()) if page_tag is not None else bs
        st = torch.arange(nblk, dtype=torch.int32, device=dev)[None]
        if want_mass:
            mass = torch.zeros(nblk, hkv, slots, device=dev)
        if obs_queries:
            obs = torch.zeros(nblk, hkv, slots, device=dev)
            oq = _i32([obs_queries], dev)
    out = paged_attention_batched(
        q, kv_cache, row, _i32([0, nq], dev), _i32([seq_len], dev), _i32([kept], dev),
        _i32([live_start], dev), scale, page_tag=page_tag, mass_cache=mass, obs_cache=obs,
        obs_queries=oq, stat_table=st, max_query_len=nq, max_seq_len=seq_len)
    m = o = None
    if st is not None:
        pos = reference.request_key_positions(kept, live_start, seq_len, dev)
        local = st[0]
        if page_tag is not None:
            # entry index j of each key: map block ids -> entry ids via a tag table on entries
            tag_local = page_tag[block_row.long()]
            blk, slot, _ = _sources(kv_cache, tag_local, local, kept, pos)
        else:
            blk, slot, _ = _sources(kv_cache, None, local, kept, pos)
        if mass is not None:
            m = mass[blk, :, slot].t()
        if obs is not None:
            o = obs[blk, :, slot].t()
    return out, m, o


def paged_attention(q, kv_cache, block_row, kept, live_start, seq_len, scale, want_mass=False, obs_queries=0):
    if not use_triton(q):
        return reference.paged_attention(q, kv_cache, block_row, kept, live_start, seq_len, scale, want_mass,
                                         obs_queries)
    return paged_attention_mixed(q, kv_cache, None, block_row, kept, live_start, seq_len, scale, want_mass,
                                 obs_queries)


def paged_attention_batched(q, kv_cache, block_table, query_start_loc, seq_lens, kept, live_start, scale,
                            **kwargs):
    if not use_triton(q):
        return _batched_reference(q, kv_cache, block_table, query_start_loc, seq_lens, kept, live_start, scale,
                                  **kwargs)
    from .paged_attention import paged_attention_batched as _batched

    return _batched(q, kv_cache, block_table, query_start_loc, seq_lens, kept, live_start, scale, **kwargs)


def _batched_reference(q, kv_cache, block_table, query_start_loc, seq_lens, kept, live_start, scale, *,
                       page_tag=None, out=None, mass_cache=None, obs_cache=None, obs_queries=None,
                       mass_rows=None, stat_table=None, stats_tags=True, **_):
    """CPU twin of the batched kernel: a loop over requests through the reference."""
    out = torch.empty_like(q) if out is None else out
    qsl = query_start_loc.tolist()
    st = block_table if stat_table is None else stat_table
    bs = kv_cache.shape[2]
    for r in range(seq_lens.shape[0]):
        s, e = qsl[r], qsl[r + 1]
        if e == s:
            continue
        k, ls, sl = int(kept[r]), int(live_start[r]), int(seq_lens[r])
        w = int(obs_queries[r]) if obs_cache is not None else 0
        want_m = mass_cache is not None and (mass_rows is None or int(mass_rows[r]) != 0)
        # a compacted region without quantized pages reads like plain pages
        mixed = page_tag is not None and k > 0 and bool(page_tag[block_table[r, : -(-k // bs)].long()].any())
        if mixed and not stats_tags:
            assert not (want_m or w), "stats_tags=False: a row with statistics has quantized pages"
        if not mixed:  # full-precision pages: the plain reference (faster on CPU)
            o, m, ob = reference.paged_attention(q[s:e], kv_cache, block_table[r], k, ls, sl, scale,
                                                 want_m, w)
            out[s:e] = o
            pos = reference.request_key_positions(k, ls, sl, q.device)
            if m is not None:
                reference.add_mass(mass_cache, st[r], pos, m, bs)
            if ob is not None:
                reference.add_mass(obs_cache, st[r], pos, ob, bs)
            continue
        o, m, ob = quant.paged_attention_mixed(q[s:e], kv_cache, page_tag, block_table[r], k, ls, sl, scale,
                                               want_m, w)
        out[s:e] = o
        if m is not None or ob is not None:
            _, slot = quant.key_slots(kv_cache, page_tag, block_table[r], k, ls, sl)
            # stats are addressed through stat_table: map block ids back to entries
            pos = reference.request_key_positions(k, ls, sl)
            ent = _entries(kv_cache, page_tag, block_table[r], k, pos)
            sblk = st[r].long()[ent]
            if m is not None:
                mass_cache[sblk, :, slot] += m.t()
            if ob is not None:
                obs_cache[sblk, :, slot] += ob.t()
    return out


def _entries(kv_cache, page_tag, block_row, kept, positions):
    """Block-table entry index of each key position (compacted ordinals through the tags)."""
    bs = kv_cache.shape[2]
    ent = positions.long() // bs
    for j, _, first, n in quant.compacted_pages(kv_cache, page_tag, block_row, kept):
        sel = (positions >= first) & (positions < first + n)
        ent[sel] = j
    return ent


def write_kv(kv_cache, key, value, slot_mapping, mass=None, obs=None):
    if not use_triton(kv_cache):
        return reference.write_kv(kv_cache, key, value, slot_mapping, mass, obs)
    from .cache_write import write_kv as _write

    return _write(kv_cache, key, value, slot_mapping, mass, obs)


def compact(kv_cache, mass_cache, block_row, cand_positions, keep, page_tag=None):
    if not use_triton(kv_cache):
        reference.compact(kv_cache, mass_cache, block_row, cand_positions, keep)
        if page_tag is not None and keep.shape[1]:
            page_tag[block_row[: -(-keep.shape[1] // kv_cache.shape[2])].long()] = 0
        return
    from .compaction import compact as _compact

    _compact(kv_cache, mass_cache, block_row, cand_positions, keep, page_tag)


def compact_mixed(kv_cache, mass_cache, page_tag, block_row, kept, cand_positions, keep_full, keep_quant, bits):
    if not use_triton(kv_cache):
        return quant.compact_mixed(kv_cache, mass_cache, page_tag, block_row, kept, cand_positions, keep_full,
                                   keep_quant, bits)
    from .compaction import compact_mixed as _cm

    return _cm(kv_cache, mass_cache, page_tag, block_row, kept, cand_positions, keep_full, keep_quant, bits)


def compact_mixed_layers(kv, page_tag, block_rows, n_cand, keep_full, keep_quant, bits):
    """A prompt's first mixed compaction, for rows ``block_rows [G, W]`` in all layers of
    ``kv [L, nb, H, bs, 2D]`` (see compaction.compact_mixed_layers)."""
    if not use_triton(kv):
        cand = torch.arange(n_cand, device=kv.device)
        for layer in range(kv.shape[0]):
            for g in range(block_rows.shape[0]):
                quant.compact_mixed(kv[layer], None, page_tag, block_rows[g], 0, cand, keep_full[layer, g],
                                    keep_quant[layer, g], bits)
        return
    from .compaction import compact_mixed_layers as _cml

    _cml(kv, page_tag, block_rows, n_cand, keep_full, keep_quant, bits)


# Above this many folded tokens the kernel's register pairing (an e x e one-hot) stops
# paying; such folds (huge `slack`) are rare and take the PyTorch path.
FOLD_SWAP_MAX = 256


def fold_swap(kv, mass, pos, lose, cand_blk, cand_off, cand_pos, k0):
    if not use_triton(kv) or lose.shape[-1] > FOLD_SWAP_MAX:
        return reference.fold_swap(kv, mass, pos, lose, cand_blk, cand_off, cand_pos, k0)
    from .compaction import fold_swap as tri_fold_swap

    return tri_fold_swap(kv, mass, pos, lose, cand_blk, cand_off, cand_pos, k0)


def can_fold_evict(kv: torch.Tensor, n: int, e: int) -> bool:
    """Whether ``fold_evict`` (one launch for a whole StreamingLLM/H2O fold) takes a fold
    of ``n`` candidates, ``e`` of them folded in."""
    from .compaction import FOLD_EVICT_MAX

    return use_triton(kv) and n <= FOLD_EVICT_MAX and e <= FOLD_SWAP_MAX


def fold_evict(kv, mass, pos, cand_blk, cand_off, cand_pos, k0, sinks, window, by_mass):
    from .compaction import fold_evict as tri_fold_evict

    return tri_fold_evict(kv, mass, pos, cand_blk, cand_off, cand_pos, k0, sinks, window, by_mass)


def place(kv, mass, pos, keep, cand_blk, cand_off, dst_blk, dst_off, keep_pos):
    if not use_triton(kv):
        return reference.place(kv, mass, pos, keep, cand_blk, cand_off, dst_blk, dst_off, keep_pos)
    from .compaction import place as tri_place

    return tri_place(kv, mass, pos, keep, cand_blk, cand_off, dst_blk, dst_off, keep_pos)
