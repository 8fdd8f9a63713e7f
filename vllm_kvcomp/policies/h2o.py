"""H2O (Zhang et al., 2023): heavy hitters = tokens with the largest accumulated
attention, plus a recent window. Re-compresses during decode so the request stays
within its budget."""
from __future__ import annotations

from typing import ClassVar

import torch

from vllm_kvcomp.policies.base import Policy, ScoreContext, register_policy


@register_policy
class H2OPolicy(Policy):
    name: ClassVar[str] = "h2o"
    needs: ClassVar[frozenset[str]] = frozenset({"attn_mass"})
    recompress: ClassVar[bool] = True
    fold_score: ClassVar[str] = "mass"  # score() below, computed by the fold kernel too

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        assert ctx.attn_mass is not None, "h2o needs attn_mass from the attention pass"
        return ctx.attn_mass
