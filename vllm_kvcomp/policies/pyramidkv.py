"""PyramidKV (Cai et al., 2024): SnapKV's votes, with layer budgets shaped as a pyramid --
lower layers (broad attention) keep more tokens, upper layers (focused attention) fewer.

The spec's budget is the *average* over layers (the paper's convention): layer 0 keeps
``(2 - 1/beta)`` x budget, the top layer ``budget / beta``, linearly in between. All
layers of a request share one block table, so the request holds the largest layer's
blocks; the other layers leave part of those slots unused (returning them needs per-layer
KV-cache groups). Compresses once, at the end of prefill, like SnapKV.
"""
from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from vllm_kvcomp.policies.base import register_policy
from vllm_kvcomp.policies.snapkv import SnapKVPolicy


@register_policy
class PyramidKVPolicy(SnapKVPolicy):
    name: ClassVar[str] = "pyramidkv"
    per_layer: ClassVar[bool] = True  # (prompt-only: candidates never include older compacted ones)

    beta: float = Field(20.0, ge=1.0, le=1000.0, description="the top layer keeps budget / beta")

    def capacity_scale(self) -> float:
        return 2.0 - 1.0 / self.beta

    def layer_capacity(self, layer_idx: int, num_layers: int, capacity: int) -> int:
        if num_layers <= 1:
            return capacity
        top = capacity / (2.0 * self.beta - 1.0)  # (budget / beta) / ((2 - 1/beta) * budget)
        keep = capacity - (capacity - top) * min(layer_idx, num_layers - 1) / (num_layers - 1)
        return min(capacity, max(self.min_tokens(), int(keep)))
