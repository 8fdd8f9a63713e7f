"""CAKE (Qin et al., ICLR 2025): layer budgets that adapt to each request. Every layer
gets a share of the request's budget in proportion to its *preference*, the dispersion
of its attention over the prompt: the entropy of the observation window's votes,
``pref_l = H_l ** (1 / tau)``. Layers that attend broadly keep more tokens, focused
layers fewer; within a layer, tokens are chosen by SnapKV's votes.

What differs from the paper: its preference also multiplies in the *temporal shift*
(the variance of attention across the window's queries) and its eviction score adds a
variance term -- both need per-query second moments the attention kernel does not
accumulate (it sums votes per slot); here the entropy term alone sets the budgets.

Memory: the spec's budget is the average over layers (as PyramidKV); all layers share
one block table, so the request holds ``max_scale`` x the budget and no layer keeps
more than that. Budgets are computed on the worker at the end of prefill, from the
votes of all layers (backend.compact_group_adaptive), and read back by the metadata
builder for the request's later steps.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from vllm_kvcomp.policies.base import register_policy
from vllm_kvcomp.policies.snapkv import SnapKVPolicy


@register_policy
class CAKEPolicy(SnapKVPolicy):
    name: ClassVar[str] = "cake"
    per_layer: ClassVar[bool] = True
    adaptive_layers: ClassVar[bool] = True  # layer budgets come from the request's own attention

    tau: float = Field(1.0, gt=0, le=100, description="preference temperature: entropy ** (1/tau)")
    max_scale: float = Field(2.0, ge=1.0, le=8.0, description="a layer keeps at most max_scale x "
                                                              "the average budget")

    def capacity_scale(self) -> float:
        return self.max_scale

    def layer_budgets(self, votes: torch.Tensor, capacity: int) -> torch.Tensor:
        """``votes [L, R, H, n]`` (R requests) -> ``[R, L]`` tokens kept per layer: their
        sum is ``L * capacity / max_scale`` (the average budget), each within
        ``[min_tokens, capacity]`` (and ``<= n``)."""
        L, R, H, n = votes.shape
        v = votes.float().clamp_min(0)
        p = v / v.sum(-1, keepdim=True).clamp_min(1e-12)
        entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean(-1)  # [L, R], mean over heads
        entropy = entropy.clamp_min(1e-6)
        # shares are scale-free: relative to the broadest layer, so a low tau cannot overflow
        pref = (entropy / entropy.amax(0, keepdim=True)).pow(1.0 / self.tau).clamp_min(1e-30).t()  # [R, L]
        lo = float(min(self.min_tokens(), capacity, n))
        hi = float(min(capacity, n))
        total = min(L * capacity / self.max_scale, L * hi)
        # Proportional shares, clamped to [lo, hi]; what clamping adds or removes is
        # redistributed over the unclamped layers (a few rounds settle it).
        share = pref / pref.sum(-1, keepdim=True) * total
        for _ in range(8):
            b = share.clamp(lo, hi)
            free = (b > lo) & (b < hi)
            gap = total - b.sum(-1, keepdim=True)
            w = torch.where(free, pref, torch.zeros_like(pref))
            share = b + gap * w / w.sum(-1, keepdim=True).clamp_min(1e-12)
        return share.clamp(lo, hi).floor().long()
