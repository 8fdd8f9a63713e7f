"""KVCrush (Jha et al., 2025): important tokens by score, plus *representatives* of
the unimportant ones chosen by head-behaviour signatures, so no kind of context is
dropped wholesale.

Base score: SnapKV's pooled observation-window votes. Signature of a token: one bit
per KV head, set when the token's score in that head is above the head's median over
the candidates. Among the low-importance tokens (outside the token-level top of the
budget), signatures are bucketed by Hamming distance to an anchor (the majority
signature of the low-importance tokens); ``alpha`` of the free slots go to
representatives spread over the buckets in proportion to their sizes, evenly by
position inside each bucket. Representatives are the same for all heads; each head
fills its remaining slots with its own top scores."""
from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from vllm_kvcomp.policies.base import ScoreContext, register_policy
from vllm_kvcomp.policies.snapkv import SnapKVPolicy


def signatures(scores: torch.Tensor) -> torch.Tensor:
    """[H, n] scores -> [n, H] bool: token above its head's median."""
    med = scores.median(dim=-1, keepdim=True).values
    return (scores > med).t()


def representatives(sig: torch.Tensor, pool: torch.Tensor, count: int) -> torch.Tensor:
    """Pick ``count`` indices from ``pool`` (1-D, position order) spread over the Hamming
    buckets of their signatures ``sig[pool]``."""
    if count <= 0 or pool.numel() == 0:
        return pool[:0]
    count = min(count, pool.numel())
    s = sig[pool].to(torch.int8)  # [m, H]
    anchor = (s.float().mean(dim=0) >= 0.5).to(torch.int8)  # majority signature
    dist = (s != anchor).sum(dim=-1)  # [m] Hamming distance, 0..H
    buckets = [pool[dist == d] for d in range(s.shape[1] + 1)]
    buckets = [b for b in buckets if b.numel()]
    # Proportional shares (largest remainder), at least one per bucket while slots last.
    sizes = torch.tensor([b.numel() for b in buckets], dtype=torch.float64)
    share = sizes / sizes.sum() * count
    take = share.floor().long()
    if count >= len(buckets):
        take = take.clamp(min=1)
    while int(take.sum()) > count:
        take[int(torch.argmax(take))] -= 1
    rem = (share - take.double()).tolist()
    order = sorted(range(len(buckets)), key=lambda i: -rem[i])
    i = 0
    while int(take.sum()) < count:
        j = order[i % len(order)]
        if take[j] < buckets[j].numel():
            take[j] += 1
        i += 1
    picked = []
    for b, t in zip(buckets, take.tolist()):
        if t:
            idx = torch.linspace(0, b.numel() - 1, t).round().long()
            picked.append(b[idx])
    return torch.cat(picked).sort().values


@register_policy
class KVCrushPolicy(SnapKVPolicy):
    batchable: ClassVar[bool] = False  # combines the heads of one request
    name: ClassVar[str] = "kvcrush"

    alpha: float = Field(0.25, ge=0.0, le=1.0, description="share of free slots for representatives")

    def select(self, ctx: ScoreContext, capacity: int) -> torch.Tensor:
        n = ctx.num_candidates
        assert capacity <= n, (capacity, n)
        scores = self.head_scores(ctx)  # [H, n] pooled votes
        forced = torch.zeros(n, dtype=torch.bool, device=scores.device)
        forced[: min(self.sinks, n)] = True
        if self.window:
            forced[max(0, n - self.window):] = True
        free = capacity - int(forced.sum())
        n_rep = int(round(self.alpha * free)) if free > 0 else 0
        if n_rep:
            # Token-level importance: each head's scores normalised to sum 1, then summed.
            imp = (scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-12)).sum(dim=0)
            imp = imp.masked_fill(forced, float("inf"))
            top = torch.topk(imp, capacity - n_rep).indices
            low = torch.ones(n, dtype=torch.bool, device=scores.device)
            low[top] = False
            low &= ~forced
            reps = representatives(signatures(scores), low.nonzero().flatten(), n_rep)
            forced[reps] = True
        scores[:, forced] = float("inf")
        idx = torch.topk(scores, capacity, dim=-1, sorted=False).indices
        return idx.sort(dim=-1).values
