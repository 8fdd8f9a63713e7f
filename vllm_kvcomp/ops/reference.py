"""PyTorch reference kernels: the CPU execution path and the oracle for the Triton ones.

KV cache of one layer: ``kv_cache[num_blocks, H_kv, block_size, 2*D]`` (vLLM's LBHNC
layout; K in ``[..., :D]``, V in ``[..., D:]``). A request's logical position ``p`` lives
at block ``block_row[p // bs]``, offset ``p % bs``. Attention reads a request's
compacted region ``[0, kept)`` and live region ``[live_start, seq_len)`` -- never the gap,
whose block-table entries may be stale (see layout.py).

Statistics use a per-slot float32 tensor ``mass[num_blocks, H_kv, block_size]``: the
attention each cached token has received so far (summed over the query heads of its
KV group). It moves with the token on compaction and is zeroed when a slot is written.
"""
from __future__ import annotations

import torch

# Queries are processed in tiles so a long prefill never materialises a huge score matrix.
Q_TILE = 512


def split_kv(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = kv_cache.shape[-1] // 2
    return kv_cache[..., :d], kv_cache[..., d:]


def slots_for(block_row: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Global slot ids (block * bs + offset) of logical positions of one request."""
    return block_row[positions // block_size].long() * block_size + positions % block_size


def write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             slot_mapping: torch.Tensor, mass: torch.Tensor | None = None,
             obs: torch.Tensor | None = None) -> None:
    """Store new tokens' K/V ([T, H_kv, D]) at their slots; padding slots are < 0. The
    slots' statistics restart from zero (a block may have served another request)."""
    n = slot_mapping.shape[0]
    # Padding tokens go to slot 0 of block 0, vLLM's null block, which no attention reads;
    # filtering them instead would cost a device sync per layer on the GPU.
    slots = slot_mapping.long().clamp(min=0)
    key, value = key[:n], value[:n]
    bs = kv_cache.shape[2]
    blk, off = slots // bs, slots % bs
    d = key.shape[-1]
    # Advanced indices around a slice put the token dim first: [T, H, D].
    kv_cache[blk, :, off, :d] = key.to(kv_cache.dtype)
    kv_cache[blk, :, off, d:] = value.to(kv_cache.dtype)
    if mass is not None:
        mass[blk, :, off] = 0.0
    if obs is not None:
        obs[blk, :, off] = 0.0


def request_key_positions(kept: int, live_start: int, seq_len: int, device=None) -> torch.Tensor:
    """Logical positions a request's attention reads, in order: compacted then live."""
    return torch.cat([torch.arange(kept, device=device),
                      torch.arange(live_start, seq_len, device=device)])


def paged_attention(
    q: torch.Tensor,  # [nq, H_q, D] queries of one request, positions seq_len-nq .. seq_len-1
    kv_cache: torch.Tensor,
    block_row: torch.Tensor,
    kept: int,
    live_start: int,
    seq_len: int,
    scale: float,
    want_mass: bool = False,
    obs_queries: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Causal attention of one request over its compacted + live tokens.

    Returns ``(out [nq, H_q, D], mass [H_kv, n] | None, obs [H_kv, n] | None)`` where ``n``
    indexes ``request_key_positions(...)``; ``mass`` sums probabilities over all queries
    and the heads of each KV group (H2O); ``obs`` the same over the last ``obs_queries``
    queries only (SnapKV's observation window).

    Without ``want_mass`` the output comes from PyTorch's fused SDPA (the probabilities
    are never materialised) and only the ``obs_queries`` rows are recomputed explicitly.
    With it, probabilities are computed in query tiles, each against the prefix of keys
    its queries may see (keys are in position order), so masked work is skipped.
    """
    nq, hq, d = q.shape
    bs = kv_cache.shape[2]
    hkv = kv_cache.shape[1]
    g = hq // hkv
    pos = request_key_positions(kept, live_start, seq_len, q.device)
    n = pos.numel()
    slots = slots_for(block_row, pos, bs)
    kv = kv_cache[slots // bs, :, slots % bs, :].float().transpose(0, 1)  # [H_kv, n, 2D]
    k, v = kv[..., :d], kv[..., d:]
    # Compacted tokens all precede every query; live ones are masked causally.
    key_pos = torch.where(pos < kept, torch.full_like(pos, -1), pos) if kept else pos
    q_pos0 = seq_len - nq
    qh = q.float().view(nq, hkv, g, d).permute(1, 2, 0, 3)  # [H_kv, g, nq, D]

    def visible(last_q_pos: int) -> int:  # keys a query at this position may see: a prefix
        return int(torch.searchsorted(key_pos, torch.tensor([last_q_pos], device=q.device), right=True))

    def probs_of(qt: torch.Tensor, q_first: int) -> tuple[torch.Tensor, int]:
        """[H_kv, g, t, nk] softmax of queries ``qt`` ([H_kv, g, t, D]) at positions q_first..."""
        t = qt.shape[2]
        nk = visible(q_first + t - 1)
        s = torch.baddbmm(k.new_zeros(()), qt.reshape(hkv, g * t, d), k[:, :nk].transpose(1, 2),
                          beta=0.0, alpha=scale)
        s = s.view(hkv, g, t, nk)
        lo = visible(q_first)  # keys before this column are visible to every query of the tile
        if lo < nk:
            q_pos = torch.arange(q_first, q_first + t, device=q.device)
            s[..., lo:].masked_fill_(key_pos[None, lo:nk] > q_pos[:, None], float("-inf"))
        return torch.softmax(s, dim=-1), nk

    mass = torch.zeros(hkv, n, device=q.device) if want_mass else None
    obs = torch.zeros(hkv, n, device=q.device) if obs_queries else None
    obs_from = nq - obs_queries
    if want_mass:
        out = torch.empty(nq, hq, d, dtype=q.dtype, device=q.device)
        for s in range(0, nq, Q_TILE):
            e = min(nq, s + Q_TILE)
            probs, nk = probs_of(qh[:, :, s:e], q_pos0 + s)
            o = torch.bmm(probs.view(hkv, g * (e - s), nk), v[:, :nk]).view(hkv, g, e - s, d)
            out[s:e] = o.permute(2, 0, 1, 3).reshape(e - s, hq, d).to(q.dtype)
            mass[:, :nk] += probs.sum(dim=(1, 2))
            if obs is not None and e > obs_from:
                obs[:, :nk] += probs[:, :, max(0, obs_from - s):].sum(dim=(1, 2))
        return out, mass, obs
    if int(key_pos[-1]) <= q_pos0:
        mask, causal = None, False  # every query sees every key (decode)
    elif kept == 0 and live_start == 0 and nq == n:
        mask, causal = None, True  # a whole prompt at once
    else:
        q_pos = torch.arange(q_pos0, seq_len, device=q.device)
        mask, causal = key_pos[None, :] <= q_pos[:, None], False
    o = torch.nn.functional.scaled_dot_product_attention(
        qh.reshape(1, hq, nq, d), k[None], v[None], attn_mask=mask, is_causal=causal,
        scale=scale, enable_gqa=g > 1)[0]  # [H_q, nq, D]
    out = o.transpose(0, 1).to(q.dtype)
    if obs is not None:
        for s in range(obs_from, nq, Q_TILE):
            e = min(nq, s + Q_TILE)
            probs, nk = probs_of(qh[:, :, s:e], q_pos0 + s)
            obs[:, :nk] += probs.sum(dim=(1, 2))
    return out, mass, obs


def add_mass(mass_cache: torch.Tensor, block_row: torch.Tensor, positions: torch.Tensor,
             mass: torch.Tensor, block_size: int | None = None) -> None:
    """Accumulate ``mass[H_kv, n]`` into the per-slot statistics at ``positions``
    (``block_size``: the cache's, when the statistics have more slots per block than it)."""
    bs = block_size or mass_cache.shape[2]
    blk = block_row[positions // bs].long()
    mass_cache[blk, :, positions % bs] += mass.t()


def read_mass(mass_cache: torch.Tensor, block_row: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    bs = mass_cache.shape[2]
    slots = slots_for(block_row, positions, bs)
    return mass_cache[slots // bs, :, slots % bs].t()  # [H_kv, n]


def gather_keys(kv_cache: torch.Tensor, block_row: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    bs, d = kv_cache.shape[2], kv_cache.shape[-1] // 2
    slots = slots_for(block_row, positions, bs)
    return kv_cache[slots // bs, :, slots % bs, :d].transpose(0, 1)  # [H_kv, n, D]


def compact(kv_cache: torch.Tensor, mass_cache: torch.Tensor | None, block_row: torch.Tensor,
            cand_positions: torch.Tensor, keep: torch.Tensor) -> None:
    """Move the kept candidates into logical positions ``[0, capacity)``, per KV head.

    ``keep[H_kv, capacity]``: sorted indices into ``cand_positions``. Heads keep different
    tokens; that is fine because keys carry their position (RoPE) already.
    """
    bs = kv_cache.shape[2]
    hkv, cap = keep.shape
    src = slots_for(block_row, cand_positions, bs)
    # Gather first (a copy), then scatter: sources and destinations overlap.
    cand = kv_cache[src // bs, :, src % bs, :].transpose(0, 1)  # [H_kv, n, 2D]
    sel = cand.gather(1, keep[..., None].expand(-1, -1, cand.shape[-1]))
    dst = slots_for(block_row, torch.arange(cap, device=keep.device), bs)
    heads = torch.arange(hkv, device=keep.device)[:, None]
    kv_cache[(dst // bs)[None, :], heads, (dst % bs)[None, :]] = sel
    if mass_cache is not None:
        m = mass_cache[src // bs, :, src % bs].t().gather(1, keep)
        mass_cache[(dst // bs)[None, :], heads, (dst % bs)[None, :]] = m


def fold_swap(kv: torch.Tensor, mass: torch.Tensor, pos: torch.Tensor, lose: torch.Tensor,
              cand_blk: torch.Tensor, cand_off: torch.Tensor, cand_pos: torch.Tensor, k0: int) -> None:
    """A decode fold in place (recompressing policies): of the ``n = k0 + e`` candidates --
    the old compacted slots ``[0, k0)``, then ``e`` live tokens folded in -- ``lose``
    (``[Lc, G, H, e]`` candidate indices, any order) lose. Kept old tokens stay in their
    slots; the folded tokens that won take the slots of the old ones that lost, both in
    ascending order (as many of each). ``kv`` ``[Lc, nb, H, bs, 2D]``, ``mass``/``pos``
    ``[Lc, nb, H, bs]``; ``cand_blk``/``cand_off``/``cand_pos`` ``[G, n]`` (``cand_pos``:
    token positions, read for the folded ones). Each written slot gets its token's KV,
    attention mass and position; a folded loser's own slot gets its position (a no-op
    otherwise). The Triton twin (``triton_kernels/compaction.fold_swap``) does this in
    one launch."""
    lc, g, h, e = lose.shape
    n = cand_blk.shape[1]
    lose = lose.sort(dim=-1).values  # the old slots that lost first, then the folded losers
    # Folded winners, ascending: the folded candidates not among the losers.
    won = torch.ones(lc, g, h, e + 1, dtype=torch.uint8, device=lose.device)
    won.scatter_(3, torch.where(lose >= k0, lose - k0, e), 0)  # column e: old losers (dropped)
    won = torch.sort(won[..., :e], dim=3, descending=True, stable=True).indices + k0
    # As many old losers as folded winners; past them each folded loser stays where it is.
    src = torch.where(lose < k0, won, lose)
    cb, co = cand_blk[None, :, None, :].expand(lc, g, h, n), cand_off[None, :, None, :].expand(lc, g, h, n)
    # Sources are folded (live) slots, destinations old slots or the source itself: no
    # destination is another move's source, so one gather then one scatter is exact.
    _move_slots(kv, mass, pos, (cb.gather(3, src), co.gather(3, src)), (cb.gather(3, lose), co.gather(3, lose)),
                cand_pos[None, :, None, :].expand(lc, g, h, n).gather(3, src))


def place(kv: torch.Tensor, mass: torch.Tensor, pos: torch.Tensor | None, keep: torch.Tensor,
          cand_blk: torch.Tensor, cand_off: torch.Tensor, dst_blk: torch.Tensor, dst_off: torch.Tensor,
          keep_pos: torch.Tensor | None) -> None:
    """A packing compaction (a prompt's, or a re-packing fold): the winners ``keep``
    (``[Lc, G, H, cap]`` ascending candidate indices) go to destination slots ``[0, cap)``
    (``dst_blk [G, 1, >=cap]``, ``dst_off [1, 1, >=cap]``), in candidate order, with their
    attention mass; ``pos`` gets ``keep_pos`` (``[Lc, G, H, cap]`` token positions) when
    given. ``kv`` ``[Lc, nb, H, bs, 2D]``, ``mass``/``pos`` ``[Lc, nb, H, bs]``;
    ``cand_blk``/``cand_off`` ``[G, n]``. Candidate ``i`` sits at or after slot ``i``
    (old compacted slots first, then live tokens further on) and ``keep[j] >= j``, so
    destination ``j`` can only be the source of a winner ranked at or before ``j``: moving
    winners in rank order never overwrites a source still to be read. The Triton twin
    (``triton_kernels/compaction.place``) relies on that, one program per (layer, row,
    head); the gather below copies anyway."""
    lc, g, h, cap = keep.shape
    n = cand_blk.shape[1]
    src = (cand_blk[None, :, None, :].expand(lc, g, h, n).gather(3, keep),
           cand_off[None, :, None, :].expand(lc, g, h, n).gather(3, keep))
    _move_slots(kv, mass, pos, src, (dst_blk[None, ..., :cap], dst_off[None, ..., :cap]), keep_pos)


def _move_slots(kv, mass, pos, src, dst, positions) -> None:
    """Tokens of slots ``src`` -> slots ``dst`` (``(block, offset)`` pairs broadcasting to
    ``[Lc, G, H, m]``), each layer and head its own: KV and attention mass (H2O keeps
    accumulating it), and ``positions`` into ``pos`` when given. A gather (a copy: sources
    and destinations may overlap), then a scatter."""
    dev = kv.device
    ls = torch.arange(kv.shape[0], device=dev)[:, None, None, None]
    heads = torch.arange(kv.shape[2], device=dev)[None, None, :, None]
    sel, msel = kv[ls, src[0], heads, src[1]], mass[ls, src[0], heads, src[1]]
    kv[ls, dst[0], heads, dst[1]] = sel
    mass[ls, dst[0], heads, dst[1]] = msel
    if pos is not None:
        pos[ls, dst[0], heads, dst[1]] = positions.to(pos.dtype)
