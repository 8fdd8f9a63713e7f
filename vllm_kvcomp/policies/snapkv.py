"""SnapKV (Li et al., 2024): the last prompt queries ("observation window") vote
for the prompt tokens they attend to; votes are pooled so neighbours of a hit survive.
Compresses once, at the end of prefill."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field

from vllm_kvcomp.policies.base import Policy, ScoreContext, register_policy


@register_policy
class SnapKVPolicy(Policy):
    name: ClassVar[str] = "snapkv"
    needs: ClassVar[frozenset[str]] = frozenset({"obs_attn"})
    scores_need_order: ClassVar[bool] = True  # pooling smears votes onto position neighbours

    pool: int = Field(7, ge=1, le=63, description="odd pooling kernel over the votes")

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        assert ctx.obs_attn is not None, "snapkv needs obs_attn from the attention pass"
        votes = ctx.obs_attn.float()
        if self.pool > 1:
            k = self.pool | 1  # odd, so the pooled signal stays centred
            votes = F.avg_pool1d(votes[:, None, :], kernel_size=k, stride=1, padding=k // 2,
                                 count_include_pad=False)[:, 0, :]
        return votes
