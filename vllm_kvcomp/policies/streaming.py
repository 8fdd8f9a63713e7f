"""StreamingLLM (Xiao et al., 2023): attention sinks + a recent window."""
from __future__ import annotations

from typing import ClassVar

import torch

from vllm_kvcomp.policies.base import Policy, ScoreContext, register_policy


@register_policy
class StreamingPolicy(Policy):
    name: ClassVar[str] = "streaming"
    # A sliding window: fold new tokens in as they arrive so memory stays flat.
    recompress: ClassVar[bool] = True
    fold_score: ClassVar[str] = "position"  # score() below, computed by the fold kernel too

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        # Newer is better: top-k of the position keeps the most recent tokens.
        return ctx.order()
