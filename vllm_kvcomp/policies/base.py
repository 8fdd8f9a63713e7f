"""The one extension point for a compression method: ``Policy.score()``.

A policy is a small frozen pydantic model (its fields are the spec's keys) made of
three parts, each overridable:
  * scorer  -- ``score(ctx)``: importance of each candidate token, per KV head;
  * budget  -- how many tokens a request keeps (``Budget`` in spec.py, turned into
               block-aligned capacities by layout.py, identical on scheduler and workers);
  * action  -- what happens to the losers (``action``: "evict" today).
Selection itself (``select``) is shared: sinks and the recent window are always kept,
the rest by top-k score. Where kept tokens end up is the backend's business: a prompt's
compaction packs them in position order; a recompressing policy's later folds leave kept
tokens in their slots and write the new winners into the freed ones (``ctx.positions``
then says which token is where).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

POLICIES: dict[str, type["Policy"]] = {}


def register_policy(cls: type["Policy"]) -> type["Policy"]:
    POLICIES[cls.name] = cls
    return cls


@dataclass
class ScoreContext:
    """What a scorer may look at, for one request in one layer.

    Candidates are the tokens competing for the compacted region: first the
    already-compacted ones, then the live tokens being folded in. Without ``positions``
    they are in position order (candidate index = rank); with it (decode folds of
    recompressing policies, which leave kept tokens where they are) the compacted ones
    are in slot order and ``positions`` holds each candidate's token position.
    """

    layer_idx: int  # -1 when rows of all layers are stacked (policies that ignore it)
    num_candidates: int
    keys: torch.Tensor | None  # [H_kv, n, D] post-RoPE keys of the candidates (needs "keys")
    attn_mass: torch.Tensor | None  # [H_kv, n] attention received so far (needs "attn_mass")
    obs_attn: torch.Tensor | None  # [H_kv, n] attention from the last prompt queries (needs "obs_attn")
    # Batched policies get several requests (and layers) at once, stacked on dim 0 ([R*H_kv, ...]).
    num_kv_heads: int | None = None
    num_rows: int | None = None  # dim 0 (when no tensor above is given)
    device: torch.device | None = None
    positions: torch.Tensor | None = None  # [rows, n] int64 token positions, when not in order

    def __post_init__(self):
        t = next((x for x in (self.keys, self.attn_mass, self.obs_attn) if x is not None), None)
        if t is not None:
            self.num_rows, self.device = t.shape[0], t.device

    def rows(self, start: int, end: int) -> "ScoreContext":
        """The slice of dim 0 belonging to one request."""
        def cut(t):
            return None if t is None else t[start:end]
        return ScoreContext(self.layer_idx, self.num_candidates, cut(self.keys), cut(self.attn_mass),
                            cut(self.obs_attn), self.num_kv_heads, end - start, self.device,
                            cut(self.positions))

    def order(self) -> torch.Tensor:
        """[rows, n] float position of each candidate (its index when they are in order)."""
        if self.positions is not None:
            return self.positions.float()
        return torch.arange(self.num_candidates, dtype=torch.float32, device=self.device).expand(self.num_rows, -1)


class Policy(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: ClassVar[str] = ""
    # Statistics the attention pass must produce for this policy.
    needs: ClassVar[frozenset[str]] = frozenset()
    # Re-compress during decode as new tokens arrive (keeps the request within budget).
    recompress: ClassVar[bool] = False
    # Scores depend on candidates being adjacent in position (e.g. SnapKV's pooling): a
    # recompressing policy that sets this is folded by re-packing in order (slower).
    scores_need_order: ClassVar[bool] = False
    # What a GPU fold in place may rank by without calling score() -- "position" (newer
    # wins) or "mass" (accumulated attention) -- when score() is exactly that and heads are
    # not shared: the whole fold is then one kernel (api.fold_evict). "" = call score().
    fold_score: ClassVar[str] = ""
    action: ClassVar[str] = "evict"  # or "demote": losers go to quantized pages (mikv)
    # score()/select() treat dim 0 as independent (request, head) rows, so the backend may
    # stack several requests; a policy that combines heads sets this False.
    batchable: ClassVar[bool] = True

    sinks: int = Field(4, ge=0, le=4096, description="first tokens always kept")
    window: int = Field(32, ge=0, le=65536, description="most recent tokens always kept")
    shared: bool = Field(False, description="keep the same tokens in every KV head of a layer "
                                            "(per-head scores normalised, then averaged)")
    slack: int = Field(1, ge=1, le=64, description="recompressing policies: fold the live tail "
                                                   "into the kept tokens every `slack` blocks (fewer, "
                                                   "larger compaction events; the tail's blocks come "
                                                   "out of the budget)")

    # Layer budgets (PyramidKV): layers keep different numbers of the request's slots.
    per_layer: ClassVar[bool] = False
    # Scores depend on ctx.layer_idx (e.g. a per-layer head profile).
    layer_aware: ClassVar[bool] = False
    # Layer budgets computed from the request's own statistics at compaction (CAKE):
    # ``layer_budgets()``; the workers remember them per request.
    adaptive_layers: ClassVar[bool] = False

    def capacity_scale(self) -> float:
        """Slots a request holds per unit of budget: layer budgets above the average need
        the largest layer's slots in every layer (one block table per request)."""
        return 1.0

    def layer_capacity(self, layer_idx: int, num_layers: int, capacity: int) -> int:
        """How many of the request's ``capacity`` slots layer ``layer_idx`` fills."""
        return capacity

    def can_stack(self) -> bool:
        """Whether the backend may stack several requests on dim 0 ([R*H_kv, n]); ``shared``
        averages within each request's ``num_kv_heads`` rows, so it stacks too."""
        return self.batchable

    def can_stack_layers(self) -> bool:
        """Whether the backend may also stack all layers ([L*R*H_kv, n], one capacity)."""
        return self.can_stack() and not self.per_layer and not self.layer_aware

    def min_tokens(self) -> int:
        return self.sinks + self.window

    def params(self) -> dict:
        return self.model_dump()

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        """[H_kv, n] float scores; higher is kept. Override this."""
        raise NotImplementedError

    def head_scores(self, ctx: ScoreContext) -> torch.Tensor:
        """``score()``, made one row for all heads when ``shared`` (non-negative scores are
        normalised to sum 1 per head, others standardised, then averaged over heads).
        Per-head selection can drop a token from the heads that do not look at it now
        but need it later (e.g. copying a number digit by digit); sharing keeps it in all."""
        s = self.score(ctx).float()
        h = ctx.num_kv_heads or s.shape[0]
        if not self.shared or h == 1:
            return s.clone()
        # groups of h rows are one request's heads (several requests/layers may be stacked);
        # each group is normalised its own way, with no host sync
        g = s.view(-1, h, s.shape[-1])
        nonneg = (g >= 0).flatten(1).all(-1)[:, None, None]
        norm = g / g.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        std = (g - g.mean(dim=-1, keepdim=True)) / g.std(dim=-1, keepdim=True).clamp_min(1e-12)
        g = torch.where(nonneg, norm, std)
        return g.mean(dim=1, keepdim=True).expand_as(g).reshape(s.shape).clone()

    def select(self, ctx: ScoreContext, capacity: int) -> torch.Tensor:
        """[H_kv, capacity] indices into the candidates, ascending."""
        assert capacity <= ctx.num_candidates, (capacity, ctx.num_candidates)
        idx = torch.topk(self.ranked(ctx), capacity, dim=-1, sorted=False).indices
        return idx.sort(dim=-1).values

    def evict(self, ctx: ScoreContext, count: int) -> torch.Tensor:
        """[H_kv, count] indices of the candidates that lose (the complement of
        ``select(ctx, n - count)``): a decode fold in place needs only these, a top-k of
        ``slack`` blocks rather than of the whole region. A policy overriding ``select``
        overrides this too, or sets ``scores_need_order``."""
        return torch.topk(self.ranked(ctx), count, dim=-1, largest=False, sorted=False).indices

    def ranked(self, ctx: ScoreContext) -> torch.Tensor:
        """``head_scores`` with sinks and window made unbeatable: what selection ranks."""
        scores = self.head_scores(ctx)
        protect_ends(scores, ctx, self.sinks, self.window)
        return scores


def protect_ends(scores: torch.Tensor, ctx: ScoreContext, sinks: int, window: int) -> None:
    """Sinks (the first ``sinks`` positions) and the window (the ``window`` latest
    candidates) win regardless of score (clamped to what exists), in place."""
    n = ctx.num_candidates
    if ctx.positions is None:  # candidates in position order
        scores[:, : min(sinks, n)] = float("inf")
        if window:
            scores[:, max(0, n - window):] = float("inf")
        return
    pos = ctx.positions
    scores.masked_fill_(pos < sinks, float("inf"))
    if window:
        # The latest `window` positions are all candidates (each was protected at every
        # earlier fold), so a threshold on the newest one finds them: no top-k needed.
        scores.masked_fill_(pos > pos.amax(dim=-1, keepdim=True) - window, float("inf"))
