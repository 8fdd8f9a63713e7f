"""Attention backend: where the kernel reads compacted pages, where statistics are
produced, and where kept tokens are moved (compaction) -- per layer, right after that
layer's attention, so no second pass over the KV cache is needed.

Per step, ``KVCompMetadataBuilder.build`` turns each batch row into a ``RowStep`` (one
dataclass: the request's old/new layout and policy). ``KVCompImpl.forward`` then, per row:
  1. attends over the *old* layout (compacted + live tokens),
  2. accumulates statistics the row's policy needs (H2O mass, SnapKV votes),
  3. if the layout changes in this step, scores the candidates and compacts them.
The scheduler frees the gap blocks once this step is processed (allocator.py).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, fields

import torch
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.v1.attention.backend import AttentionImpl, AttentionMetadataBuilder, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec

from vllm_kvcomp.allocator import KVCompSpec
from vllm_kvcomp.layout import NO_PLAN, Layout, Plan, make_plan
from vllm_kvcomp.ops import reference as ref
from vllm_kvcomp.policies import Policy, ScoreContext
from vllm_kvcomp.spec import resolve_request_spec

logger = init_logger(__name__)

# The model runner publishes, just before building attention metadata, what the
# builder cannot see in CommonAttentionMetadata: each row's request (plugin.py).
_rows = threading.local()


@dataclass(frozen=True)
class RowInfo:
    req_id: str
    num_prompt_tokens: int
    extra_args: dict | None


def publish_rows(rows: list[RowInfo]) -> None:
    _rows.value = rows


def published_rows() -> list[RowInfo]:
    return getattr(_rows, "value", [])


@dataclass
class RowStep:
    """One request in this step."""

    q_start: int
    q_end: int
    seq_len: int  # tokens after this step
    old: Layout  # layout the attention reads
    new: Layout  # layout after this step's compaction
    policy: Policy | None

    @property
    def compress_now(self) -> bool:
        return self.new != self.old


@dataclass
class KVCompMetadata:
    num_actual_tokens: int
    block_table: torch.Tensor
    rows: list[RowStep]


class KVCompMetadataBuilder(AttentionMetadataBuilder[KVCompMetadata]):
    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str],
                 vllm_config: VllmConfig, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.block_size = kv_cache_spec.block_size  # the scheduler's unit: layouts agree
        self.server_spec = (vllm_config.additional_config or {}).get("kv_compression")
        self._plans: dict[tuple, Plan] = {}

    def _plan(self, row: RowInfo) -> tuple[Plan, Policy | None]:
        spec = resolve_request_spec(self.server_spec, row.extra_args)
        if spec is None:
            return NO_PLAN, None
        key = (spec, row.num_prompt_tokens)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) > 4096:
                self._plans.clear()
            plan = self._plans[key] = make_plan(spec, row.num_prompt_tokens, self.block_size)
        return plan, spec.policy

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> KVCompMetadata:
        cm = common_attn_metadata
        qsl = cm.query_start_loc_cpu.tolist()
        seq_lens = (cm.seq_lens_cpu_upper_bound if cm.seq_lens_cpu_upper_bound is not None
                    else cm.seq_lens.cpu()).tolist()
        infos = published_rows()
        rows = []
        for i in range(cm.num_reqs):
            q_start, q_end, seq_len = qsl[i], qsl[i + 1], seq_lens[i]
            plan, policy = self._plan(infos[i]) if i < len(infos) else (NO_PLAN, None)
            old = plan.layout(seq_len - (q_end - q_start))
            new = plan.layout(seq_len)
            rows.append(RowStep(q_start, q_end, seq_len, old, new, policy))
        return KVCompMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            block_table=cm.block_table_tensor,
            rows=rows,
        )


class KVCompImpl(AttentionImpl):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes, sliding_window, kv_cache_dtype: str, logits_soft_cap=None,
                 attn_type: str = "decoder", kv_sharing_target_layer_name=None, sinks=None, **kw) -> None:
        if alibi_slopes is not None or sliding_window is not None or sinks is not None or logits_soft_cap:
            raise ValueError("kv-compression supports plain causal attention only "
                             "(no ALiBi, sliding window, attention sinks or soft-capping)")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self._mass: torch.Tensor | None = None
        self._layer_idx: int | None = None

    def _mass_cache(self, kv_cache: torch.Tensor) -> torch.Tensor:
        # Per-slot statistics beside the KV cache (float32, 1/(2*D) of an fp32 KV cache).
        nb, h, bs, _ = kv_cache.shape
        if self._mass is None or self._mass.shape != (nb, h, bs) or self._mass.device != kv_cache.device:
            self._mass = torch.zeros(nb, h, bs, dtype=torch.float32, device=kv_cache.device)
        return self._mass

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        ref.write_kv(kv_cache, key, value, slot_mapping, self._mass_cache(kv_cache))

    def forward(self, layer, query, key, value, kv_cache, attn_metadata: KVCompMetadata | None,
                output, output_scale=None, output_block_scale=None, **kw):
        if attn_metadata is None:  # profiling / warm-up
            return output
        if self._layer_idx is None:
            self._layer_idx = _layer_index(getattr(layer, "layer_name", ""))
        mass_cache = self._mass_cache(kv_cache)
        out = output.view(output.shape[0], self.num_heads, self.head_size)
        q_all = query.view(query.shape[0], self.num_heads, self.head_size)
        for i, row in enumerate(attn_metadata.rows):
            if row.q_end == row.q_start:
                continue
            block_row = attn_metadata.block_table[i]
            policy = row.policy
            want_mass = policy is not None and "attn_mass" in policy.needs
            obs_q = 0
            if row.compress_now and policy is not None and "obs_attn" in policy.needs:
                obs_q = min(max(policy.window, 1), row.q_end - row.q_start)
            o, mass, obs = ref.paged_attention(
                q_all[row.q_start:row.q_end], kv_cache, block_row, row.old.kept,
                row.old.live_start, row.seq_len, self.scale, want_mass=want_mass, obs_queries=obs_q)
            out[row.q_start:row.q_end] = o
            if want_mass:
                positions = ref.request_key_positions(row.old.kept, row.old.live_start, row.seq_len,
                                                      kv_cache.device)
                ref.add_mass(mass_cache, block_row, positions, mass)
            if row.compress_now and policy is not None:
                self._compress(kv_cache, mass_cache, block_row, row, policy, obs)
        return output

    def _compress(self, kv_cache, mass_cache, block_row, row: RowStep, policy: Policy,
                  obs: torch.Tensor | None) -> None:
        """Fold old compacted + newly-old live tokens into the first ``capacity`` slots."""
        dev = kv_cache.device
        cand = torch.cat([torch.arange(row.old.kept, device=dev),
                          torch.arange(row.old.live_start, row.new.live_start, device=dev)])
        n = cand.numel()
        ctx = ScoreContext(
            layer_idx=self._layer_idx or 0,
            num_candidates=n,
            keys=ref.gather_keys(kv_cache, block_row, cand),
            attn_mass=ref.read_mass(mass_cache, block_row, cand) if "attn_mass" in policy.needs else None,
            # The attention read old-compacted then live tokens: candidates are its prefix.
            obs_attn=obs[:, :n] if obs is not None else None,
        )
        if "obs_attn" in policy.needs and ctx.obs_attn is None:
            ctx.obs_attn = torch.zeros(kv_cache.shape[1], n, device=dev)
        keep = policy.select(ctx, row.new.kept)
        ref.compact(kv_cache, mass_cache, block_row, cand, keep)


def _layer_index(name: str) -> int:
    try:
        from vllm.model_executor.models.utils import extract_layer_index
        return extract_layer_index(name)
    except Exception:
        return 0


def _to_kvcomp_spec(spec: AttentionSpec) -> AttentionSpec:
    if type(spec) is FullAttentionSpec:
        return KVCompSpec(**{f.name: getattr(spec, f.name) for f in fields(spec) if f.init})
    return spec


class KVCompCPUBackend(CPUAttentionBackend):
    """CPU: vLLM only ever picks CPU_ATTN there; the plugin swaps this class in when
    compression is on. Reads and writes the cache with the PyTorch reference."""

    supported_kv_cache_dtypes = ["auto"]

    @staticmethod
    def get_impl_cls():
        return KVCompImpl

    @staticmethod
    def get_builder_cls():
        return KVCompMetadataBuilder

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        return _to_kvcomp_spec(spec)
