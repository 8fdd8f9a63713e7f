"""Scheduler side: the KV-cache spec and manager that free evicted blocks while a
request runs -- the same mechanism vLLM uses for R-SWA gaps.

Each step, vLLM calls ``remove_skipped_blocks`` with the number of *processed* tokens
(computed and no longer in flight), so by the time a block is freed here the worker
has already compacted that layer's kept tokens out of it (backend.py). Freed entries
become the null block; the worker keeps stale ids there but never reads them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec

from vllm_kvcomp.layout import NO_PLAN, Plan, make_plan
from vllm_kvcomp.ops import quant
from vllm_kvcomp.spec import CompressionSpec

# request_id -> the request's resolved spec; filled by the scheduler hook in plugin.py
# (engine-core process). Absent = not compressed.
REQUEST_SPECS: dict[str, CompressionSpec] = {}


def page_capacity_fn(spec) -> Callable[[int], int]:
    """bits -> tokens a quantized page of this cache holds (scheduler and workers agree)."""
    import torch

    es = torch.empty((), dtype=spec.dtype).element_size()
    return lambda bits: quant.page_capacity(bits, spec.block_size, spec.head_size, es)


@dataclass(frozen=True, kw_only=True)
class KVCompSpec(FullAttentionSpec):
    """Full attention whose blocks may be compacted and freed mid-request."""

    @property
    def prefix_cacheable(self) -> bool:
        # A compacted block's content no longer matches its hash.
        return False


class KVCompManager(FullAttentionManager):
    def __init__(self, kv_cache_spec: KVCompSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self._plans: dict[str, Plan] = {}
        from vllm_kvcomp.plugin import hook_scheduler
        hook_scheduler()  # so requests' specs reach REQUEST_SPECS

    def plan(self, request_id: str, num_prompt_tokens: int) -> Plan:
        plan = self._plans.get(request_id)
        if plan is None or plan.num_prompt_tokens != num_prompt_tokens:
            spec = REQUEST_SPECS.get(request_id)
            plan = (make_plan(spec, num_prompt_tokens, self.block_size, page_capacity_fn(self.kv_cache_spec))
                    if spec else NO_PLAN)
            self._plans[request_id] = plan
        return plan

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        if num_prompt_tokens is None:
            return
        layout = self.plan(request_id, num_prompt_tokens).layout(processed_computed_tokens)
        if layout.compressed:
            gap = layout.blocks_freed(self.block_size)
            self._remove_blocks_in_range(request_id, gap.start, gap.stop)

    def free(self, request_id: str) -> None:
        super().free(request_id)
        self._plans.pop(request_id, None)

    # Compacted blocks must never become prefix-cache hits.
    def cache_blocks(self, *args, **kwargs) -> None:
        return None

    @classmethod
    def find_longest_cache_hit(cls, block_hashes, max_length, kv_cache_group_ids, *args, **kwargs):
        return tuple([] for _ in kv_cache_group_ids), 0


def register_spec() -> None:
    """Idempotent registration in vLLM's KV-cache spec registry."""
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    # Built-ins register only into an empty registry: fill it first.
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(KVCompSpec, KVCompManager, uniform_type_base_spec=FullAttentionSpec)
