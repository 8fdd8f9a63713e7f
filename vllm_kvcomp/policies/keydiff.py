"""KeyDiff (Park et al., 2025): keep the keys that differ most from the others.

Needs only the keys, no attention statistics (so it works with fused attention
kernels that never materialise probabilities): the anchor is the mean of the
L2-normalised keys of each KV head; a token's score is the negative cosine
similarity of its key to that anchor. Keys are post-RoPE, as cached. Re-compresses
in decode, like H2O, so the request stays within its budget."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from vllm_kvcomp.policies.base import Policy, ScoreContext, register_policy


@register_policy
class KeyDiffPolicy(Policy):
    name: ClassVar[str] = "keydiff"
    needs: ClassVar[frozenset[str]] = frozenset({"keys"})
    recompress: ClassVar[bool] = True

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        k = F.normalize(ctx.keys.float(), dim=-1)  # [H_kv, n, D]
        anchor = F.normalize(k.mean(dim=1, keepdim=True), dim=-1)  # [H_kv, 1, D]
        return -(k * anchor).sum(dim=-1)
