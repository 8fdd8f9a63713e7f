"""MiKV (Yang et al., 2024, "No Token Left Behind"): instead of evicting the less
important tokens, keep them at low precision. The most important tokens stay in
full-precision pages; the next ones are *demoted* into quantized pages (int8/int4/int2,
docs/page_format.md) that hold 1.8-7x more tokens in the same block.

The budget is memory: ``mikv:0.25`` holds 25% of the prompt's blocks, a share ``full`` of
them full precision, the rest quantized pages -- so it keeps far more than 25% of the
tokens. Importance comes from SnapKV's observation-window votes (the paper scores with
accumulated attention; votes were the better scorer on our suite, docs/accuracy.md), and
the request is compressed once, at the end of prefill.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field, field_validator

from vllm_kvcomp.policies.base import ScoreContext, register_policy
from vllm_kvcomp.policies.snapkv import SnapKVPolicy


@register_policy
class MiKVPolicy(SnapKVPolicy):
    name: ClassVar[str] = "mikv"
    action: ClassVar[str] = "demote"

    bits: int = Field(4, description="precision of demoted tokens: 8, 4 or 2 bits")
    full: float = Field(0.5, gt=0, le=1, description="share of the budget's blocks holding the most "
                                                     "important tokens at full precision")

    @field_validator("bits")
    @classmethod
    def _known_bits(cls, v: int) -> int:
        if v not in (8, 4, 2):
            raise ValueError("must be 8, 4 or 2")
        return v

    def select_mixed(self, ctx: ScoreContext, n_full: int, n_quant: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``([H_kv, n_full], [H_kv, n_quant])`` candidate indices, each in position order:
        the ``n_full`` best stay full precision (sinks and window first), the next
        ``n_quant`` are demoted, the rest dropped."""
        n = ctx.num_candidates
        assert n_full + n_quant <= n, (n_full, n_quant, n)
        order = torch.topk(self.ranked(ctx), n_full + n_quant, dim=-1, sorted=True).indices
        return order[:, :n_full].sort(dim=-1).values, order[:, n_full:].sort(dim=-1).values
