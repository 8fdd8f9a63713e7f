"""Random batches of paged requests for the kernel tests (and the benchmark).

Every block a request must never read is poisoned with NaN -- block-table entries in the
gap and past the end point at a NaN block, and the unused slots of partially used blocks
hold NaN -- so a kernel that reads outside compacted + live shows up as NaN.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_kvcomp.ops import quant


@dataclass
class Req:
    q_len: int
    seq_len: int
    live_start: int = 0
    kept: int = 0  # full-precision compaction when plan is None
    plan: list[int] | None = None  # tags of the compacted pages (mixed precision)
    obs: int = 0


@dataclass
class Batch:
    q: torch.Tensor
    kv: torch.Tensor
    page_tag: torch.Tensor | None
    block_table: torch.Tensor
    qsl: torch.Tensor
    seq_lens: torch.Tensor
    kept: torch.Tensor
    live_start: torch.Tensor
    obs: torch.Tensor
    reqs: list[Req] = field(default_factory=list)
    spare: list[int] = field(default_factory=list)  # block ids no request uses

    def args(self):
        return (self.q, self.kv, self.block_table, self.qsl, self.seq_lens, self.kept, self.live_start)


def make_batch(reqs: list[Req], *, hkv: int, g: int, d: int, bs: int, dtype, device, seed: int = 0,
               tags: bool = False, spare_blocks: int = 2) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    caps = {t: quant.page_capacity(t, bs, d, torch.tensor([], dtype=dtype).element_size())
            for t in (0,) + quant.BITS}
    # resolve kept for mixed plans: full pages to capacity, last page partial
    for r in reqs:
        if r.plan is not None:
            tot = sum(caps[t] for t in r.plan)
            r.kept = tot - (int(torch.randint(0, caps[r.plan[-1]], (1,), generator=gen)) if r.plan else 0)
        assert r.kept <= r.live_start or r.live_start == 0 and r.kept == 0
    n_ent = [-(-r.seq_len // bs) for r in reqs]
    width = max(n_ent) + 1
    nb = 1 + sum(n_ent) + spare_blocks
    kv = torch.randn(nb, hkv, bs, 2 * d, generator=gen).to(dtype)
    kv[0] = float("nan")  # the poison block
    page_tag = torch.zeros(nb, dtype=torch.int8) if tags else None
    perm = (torch.randperm(nb - 1, generator=gen) + 1).tolist()
    bt = torch.zeros(len(reqs), width, dtype=torch.int32)
    for i, r in enumerate(reqs):
        nc = -(-r.kept // bs) if r.plan is None else len(r.plan)
        for j in range(n_ent[i]):
            comp, live = j < nc, j >= r.live_start // bs
            if comp or live:
                b = perm.pop()
                bt[i, j] = b
        # poison what must not be read inside used blocks
        if r.plan is None and r.kept % bs:
            kv[bt[i, nc - 1], :, r.kept % bs:] = float("nan")
        if r.live_start % bs and r.live_start < r.seq_len:
            kv[bt[i, r.live_start // bs], :, : r.live_start % bs] = float("nan")
        if r.seq_len % bs:
            kv[bt[i, n_ent[i] - 1], :, r.seq_len % bs:] = float("nan")
        if r.plan is not None:
            left = r.kept
            for j, t in enumerate(r.plan):
                b = int(bt[i, j])
                page_tag[b] = t
                n = min(caps[t], left)
                left -= n
                if t:
                    kv[b] = 0
                    for h in range(hkv):
                        k = torch.randn(n, d, generator=gen) * (1 + h)
                        v = torch.randn(n, d, generator=gen)
                        quant.write_page(kv, b, h, k, v, t)
                elif n < bs:
                    kv[b, :, n:] = float("nan")
        if tags:
            # live blocks carry stale tags: the kernels must ignore them there
            for j in range(r.live_start // bs, n_ent[i]):
                page_tag[bt[i, j]] = (8, 4, 2)[j % 3]
            page_tag[0] = 4
    qs = [torch.randn(r.q_len, hkv * g, d, generator=gen).to(dtype) for r in reqs]
    qsl = torch.tensor([0] + [sum(r.q_len for r in reqs[: i + 1]) for i in range(len(reqs))], dtype=torch.int32)
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
    return Batch(
        q=torch.cat(qs).to(device), kv=kv.to(device),
        page_tag=page_tag.to(device) if tags else None, block_table=bt.to(device), qsl=qsl.to(device),
        seq_lens=i32([r.seq_len for r in reqs]), kept=i32([r.kept for r in reqs]),
        live_start=i32([r.live_start for r in reqs]), obs=i32([r.obs for r in reqs]), reqs=reqs, spare=perm)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))
