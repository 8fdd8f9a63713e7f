"""DuoAttention-style head split (Xiao et al., 2024): *retrieval* heads keep the
tokens that SnapKV's observation window votes for; *streaming* heads keep the
attention sinks and the most recent tokens.

Which KV heads are retrieval heads comes from a per-model profile, a YAML file in
``configs/`` (``profile=smollm2`` -> ``configs/duo-smollm2.yaml``, or a path) written by
``python -m vllm_kvcomp.accuracy.calibrate_duo``. It holds one score per (layer, KV
head); the top ``ratio`` of heads by score are retrieval heads (per model, so a layer
may have any mix). Layers missing from the profile treat every head as retrieval.

Layout limit: every KV head of a layer keeps the same number of slots (``keep`` is
``[H_kv, capacity]``), so streaming heads here hold as many tokens as retrieval heads
-- the split decides *which* tokens, not how many. DuoAttention's memory saving
(streaming heads holding only sinks + window) needs per-head capacities in layout.py."""
from __future__ import annotations

import functools
import os
from typing import ClassVar

import torch
import yaml
from pydantic import Field, field_validator

from vllm_kvcomp.policies.base import ScoreContext, register_policy
from vllm_kvcomp.policies.snapkv import SnapKVPolicy

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "configs")


def profile_path(profile: str) -> str:
    if profile.endswith((".yaml", ".yml")) or os.sep in profile:
        if os.path.exists(profile):
            return profile
        return os.path.join(CONFIG_DIR, os.path.basename(profile))
    return os.path.join(CONFIG_DIR, f"duo-{profile}.yaml")


@functools.lru_cache(maxsize=16)
def load_profile(profile: str) -> dict:
    path = profile_path(profile)
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ValueError(f"cannot read DuoAttention profile {path!r}: {e.strerror}") from None
    scores = data.get("head_scores") if isinstance(data, dict) else None
    if not isinstance(scores, list) or not all(isinstance(r, list) and r for r in scores):
        raise ValueError(f"profile {path!r} needs 'head_scores': a list (per layer) of lists (per KV head)")
    return data


@functools.lru_cache(maxsize=64)
def retrieval_mask(profile: str, ratio: float) -> torch.Tensor:
    """[L, H_kv] bool: the top ``ratio`` of all heads by score."""
    scores = torch.tensor(load_profile(profile)["head_scores"], dtype=torch.float32)
    k = int(round(ratio * scores.numel()))
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    if k:
        mask[torch.topk(scores.flatten(), k).indices] = True
    return mask.view_as(scores)


@register_policy
class DuoPolicy(SnapKVPolicy):
    batchable: ClassVar[bool] = False  # combines the heads of one request
    layer_aware: ClassVar[bool] = True  # the head profile is per layer
    name: ClassVar[str] = "duo"

    profile: str = Field(description="head profile: a name (configs/duo-NAME.yaml) or a YAML path")
    ratio: float = Field(0.5, ge=0.0, le=1.0, description="share of KV heads that are retrieval heads")

    @field_validator("profile")
    @classmethod
    def _loads(cls, v: str) -> str:
        load_profile(v)
        return v

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        votes = super().score(ctx)  # [H_kv, n] pooled SnapKV votes
        mask = retrieval_mask(self.profile, self.ratio)
        h = votes.shape[0]
        if ctx.layer_idx >= mask.shape[0] or mask.shape[1] != h:
            return votes
        retrieval = mask[ctx.layer_idx].to(votes.device)[:, None]
        return torch.where(retrieval, votes, ctx.order().to(votes.dtype))
