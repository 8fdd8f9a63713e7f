"""Attention backend: where the kernel reads compacted pages, where statistics are
produced, and where kept tokens are moved (compaction) -- per layer, right after that
layer's attention, so no second pass over the KV cache is needed.

Per step, ``KVCompMetadataBuilder.build`` evaluates each batch row's layout (layout.py,
the same function the scheduler uses), uploads the batch's per-row ``kept``/``live_start``
in one copy, and groups the rows whose layout changes now (``RowStep``) into
``CompressGroup``s with their slots precomputed. ``KVCompImpl.forward`` then, per layer:
  1. attends over each row's *old* layout (compacted + live tokens), the whole batch in
     one kernel, accumulating the statistics policies need (H2O mass, SnapKV votes);
  2. for each group, scores the candidates and compacts the winners.
The scheduler frees the gap blocks once this step is processed (allocator.py).
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, fields

import torch
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.v1.attention.backend import (AttentionBackend, AttentionCGSupport, AttentionImpl,
                                       AttentionMetadataBuilder, CommonAttentionMetadata)
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec

from vllm_kvcomp.allocator import KVCompSpec
from vllm_kvcomp.layout import NO_PLAN, Layout, Plan, make_plan
from vllm_kvcomp.ops import reference as ref
from vllm_kvcomp.triton_kernels import api
from vllm_kvcomp.policies import Policy, ScoreContext
from vllm_kvcomp.spec import resolve_request_spec

logger = init_logger(__name__)

# The model runner publishes, just before building attention metadata, what the
# builder cannot see in CommonAttentionMetadata: each row's request (plugin.py).
_rows = threading.local()


# Opt-in timing of scoring + compaction (VLLM_KVCOMP_TIMING=1; benchmarks/gpu_e2e.py): CUDA
# events, summed when read, so the measured run is not synchronised by the measurement.
_TIMING = os.environ.get("VLLM_KVCOMP_TIMING", "0") == "1"
_marks: list[tuple] = []


def _mark(dev: torch.device):
    if dev.type == "cuda":
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e
    return time.perf_counter()


def reset_timers() -> None:
    _marks.clear()


def read_timers() -> dict[str, float]:
    """Milliseconds spent scoring and compacting (all layers)."""
    if _marks and not isinstance(_marks[0][0], float):
        torch.cuda.synchronize()
    return {"compress_ms": sum((e - s) * 1e3 if isinstance(s, float) else s.elapsed_time(e)
                               for s, e in _marks)}


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
    """One request that compresses in this step (its layout changes)."""

    index: int  # batch row
    seq_len: int  # tokens after this step
    old: Layout  # layout the attention reads
    new: Layout  # layout after this step's compaction
    policy: Policy
    obs_queries: int  # queries whose attention SnapKV-style policies vote with


@dataclass
class KVCompMetadata:
    """Per-step metadata: the batched kernel's arguments plus the rows that compress."""

    num_actual_tokens: int
    block_table: torch.Tensor  # [B, max_blocks] int32
    query_start_loc: torch.Tensor  # [B+1] int32
    seq_lens: torch.Tensor  # [B] int32, tokens after this step
    kept: torch.Tensor  # [B] int32, compacted tokens (old layout)
    live_start: torch.Tensor  # [B] int32, first live position (old layout)
    max_query_len: int
    max_seq_len: int
    want_mass: bool  # some row's policy accumulates H2O attention mass
    obs_queries: torch.Tensor | None  # [B] int32 when some row votes this step
    obs_slots: tuple[torch.Tensor, torch.Tensor] | None  # (block, offset) of the voters' keys
    groups: list["CompressGroup"]
    num_layers: int
    kept_by_layer: torch.Tensor | None = None  # [L, B] int32 when some row has layer budgets


@dataclass
class CompressGroup:
    """Rows compressing in this step with the same policy and candidate shape (decode
    recompression: every row folds one block into the same capacity). Slots are the same
    for every layer, so they are computed once per step."""

    policy: Policy
    rows: list[RowStep]
    cap: int  # kept slots after compaction
    cand_blk: torch.Tensor  # [G, n] block of each candidate (old compacted, then folded live)
    cand_off: torch.Tensor  # [G, n] offset in that block
    dst_blk: torch.Tensor  # [G, 1, cap] destination blocks of the kept tokens
    dst_off: torch.Tensor  # [1, 1, cap]


def make_group(policy: Policy, rows: list[RowStep], block_table: torch.Tensor, idx: torch.Tensor,
               ls0: torch.Tensor, k0: int, d: int, cap: int, block_size: int) -> CompressGroup:
    """Candidate and destination slots of rows ``idx`` (old live starts ``ls0``): the old
    compacted ``[0, k0)`` then the ``d`` live tokens being folded in, into ``[0, cap)``."""
    bt = block_table[idx].long()
    ar = torch.arange(k0 + d, device=bt.device)
    cand = torch.where(ar < k0, ar, ls0[:, None] + ar - k0)  # positions [G, n]
    dpos = torch.arange(cap, device=bt.device)
    return CompressGroup(policy, rows, cap, cand_blk=bt.gather(1, cand // block_size),
                         cand_off=cand % block_size, dst_blk=bt[:, dpos // block_size][:, None, :],
                         dst_off=(dpos % block_size)[None, None, :])


class KVCompMetadataBuilder(AttentionMetadataBuilder[KVCompMetadata]):
    # Compaction runs Python per compressing row between kernels, so attention cannot be
    # captured in a full CUDA graph: vLLM then compiles the model piecewise (graphs around
    # attention) -- see plugin.py, which says so at start-up.
    _cudagraph_support = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str],
                 vllm_config: VllmConfig, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.block_size = kv_cache_spec.block_size  # the scheduler's unit: layouts agree
        self.server_spec = (vllm_config.additional_config or {}).get("kv_compression")
        self.num_layers = vllm_config.model_config.get_num_layers(vllm_config.parallel_config)
        self._plans: dict[tuple, tuple[Plan, Policy | None]] = {}
        self._layer_caps: dict[tuple, list[int]] = {}  # (policy, kept) -> kept per layer

    def _plan(self, row: RowInfo) -> tuple[Plan, Policy | None]:
        key = (row.num_prompt_tokens, _override(row.extra_args))
        hit = self._plans.get(key)
        if hit is None:
            if len(self._plans) > 4096:
                self._plans.clear()
            spec = resolve_request_spec(self.server_spec, row.extra_args)
            hit = self._plans[key] = ((make_plan(spec, row.num_prompt_tokens, self.block_size),
                                      spec.policy) if spec is not None else (NO_PLAN, None))
        return hit

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> KVCompMetadata:
        cm = common_attn_metadata
        b = cm.num_reqs
        qsl = cm.query_start_loc_cpu[: b + 1].tolist()
        seq_lens = (cm.seq_lens_cpu_upper_bound if cm.seq_lens_cpu_upper_bound is not None
                    else cm.seq_lens.cpu())[:b].tolist()
        infos = published_rows()
        if not infos:  # dummy / profiling batch: nothing is compressed
            infos = [None] * b
        elif len(infos) != b:
            # Never guess: the scheduler frees blocks by these rows' layouts.
            raise RuntimeError(f"kv-compression: {b} attention rows but the model runner "
                               f"published {len(infos)} requests")
        kept, live, obs_q, compress, want_mass = [0] * b, [0] * b, [0] * b, [], False
        layered: list[tuple[int, Policy]] = []  # compacted rows with layer budgets
        for i, info in enumerate(infos):
            plan, policy = self._plan(info) if info is not None else (NO_PLAN, None)
            if policy is None:
                continue
            q_len, seq_len = qsl[i + 1] - qsl[i], seq_lens[i]
            old, new = plan.layout(seq_len - q_len), plan.layout(seq_len)
            kept[i], live[i] = old.kept, old.live_start
            if policy.per_layer and old.kept:
                layered.append((i, policy))
            want_mass |= "attn_mass" in policy.needs
            if new != old:
                if "obs_attn" in policy.needs:
                    obs_q[i] = min(max(policy.window, 1), q_len)
                compress.append(RowStep(i, seq_len, old, new, policy, obs_q[i]))
        by_shape: dict[tuple, list[RowStep]] = {}
        for row in compress:
            d = row.new.live_start - row.old.live_start
            by_shape.setdefault((row.policy, row.old.kept, d, row.new.kept), []).append(row)
        # One host->device copy per step, from pinned memory: a pageable copy would
        # synchronise the host with the GPU and stall the launch queue.
        flat = kept + live + obs_q
        for rows in by_shape.values():
            flat += [r.index for r in rows] + [r.old.live_start for r in rows]
        by_layer_at = len(flat)
        if layered:  # each layer reads only the slots it filled
            caps = [(i, self._layer_capacities(policy, kept[i])) for i, policy in layered]
            for layer in range(self.num_layers):
                row = list(kept)
                for i, per_layer in caps:
                    row[i] = per_layer[layer]
                flat += row
        dev = cm.seq_lens.device
        host = torch.tensor(flat, dtype=torch.int32)
        dev_flat = (host.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else host)
        block_table = cm.block_table_tensor[:b]
        groups, at = [], 3 * b
        for (policy, k0, d, cap), rows in by_shape.items():
            g = len(rows)
            idx, ls0 = dev_flat[at: at + g].long(), dev_flat[at + g: at + 2 * g].long()
            at += 2 * g
            groups.append(make_group(policy, rows, block_table, idx, ls0, k0, d, cap, self.block_size))
        return KVCompMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            block_table=block_table,
            query_start_loc=cm.query_start_loc[: b + 1],
            seq_lens=cm.seq_lens[:b],
            kept=dev_flat[:b],
            live_start=dev_flat[b: 2 * b],
            max_query_len=int(cm.max_query_len),
            max_seq_len=int(cm.max_seq_len),
            want_mass=want_mass,
            obs_queries=dev_flat[2 * b: 3 * b] if any(obs_q) else None,
            obs_slots=self._voter_slots(compress, block_table, dev) if any(obs_q) else None,
            groups=groups,
            num_layers=self.num_layers,
            kept_by_layer=(dev_flat[by_layer_at:].view(self.num_layers, b) if layered else None),
        )


    def _layer_capacities(self, policy: Policy, kept: int) -> list[int]:
        key = (policy, kept)
        caps = self._layer_caps.get(key)
        if caps is None:
            if len(self._layer_caps) > 4096:
                self._layer_caps.clear()
            caps = self._layer_caps[key] = [policy.layer_capacity(layer, self.num_layers, kept)
                                            for layer in range(self.num_layers)]
        return caps

    def _voter_slots(self, compress: list[RowStep], block_table, dev):
        """Slots of every key the voting rows read: their votes accumulate per slot, so
        each layer clears them first (the same slots in every layer)."""
        slots = [ref.slots_for(block_table[r.index],
                               ref.request_key_positions(r.old.kept, r.old.live_start, r.seq_len, dev),
                               self.block_size) for r in compress if r.obs_queries]
        slots = torch.cat(slots)
        return slots // self.block_size, slots % self.block_size


def _override(extra_args: dict | None):
    return None if not extra_args else extra_args.get("kv_compression")


class KVCompImpl(AttentionImpl):
    """Shared by the CPU and CUDA backends: ``triton_kernels.api`` runs the Triton kernels
    on CUDA tensors and the PyTorch reference (the same math) on CPU tensors."""

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
        self._stats: dict[str, torch.Tensor] = {}
        self._layer_idx: int | None = None

    def _stat(self, kv_cache: torch.Tensor, name: str) -> torch.Tensor:
        # Per-slot statistics beside the KV cache: float32 [num_blocks, H_kv, bs]
        # (1/(2*D) of the cache's elements: 0.4% of a bf16 cache at D=128).
        nb, h, bs, _ = kv_cache.shape
        t = self._stats.get(name)
        if t is None or t.shape != (nb, h, bs) or t.device != kv_cache.device:
            t = self._stats[name] = torch.zeros(nb, h, bs, dtype=torch.float32, device=kv_cache.device)
        return t

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        api.write_kv(kv_cache, key, value, slot_mapping, self._stat(kv_cache, "mass"))

    def forward(self, layer, query, key, value, kv_cache, attn_metadata: KVCompMetadata | None,
                output, output_scale=None, output_block_scale=None, **kw):
        md = attn_metadata
        if md is None:  # profiling / warm-up
            return output
        if self._layer_idx is None:
            self._layer_idx = _layer_index(getattr(layer, "layer_name", ""))
        n = md.num_actual_tokens
        q = query[:n].view(n, self.num_heads, self.head_size)
        out = output[:n].view(n, self.num_heads, self.head_size)
        mass = self._stat(kv_cache, "mass") if md.want_mass else None
        obs = None
        if md.obs_slots is not None:
            obs = self._stat(kv_cache, "obs")
            obs[md.obs_slots[0], :, md.obs_slots[1]] = 0.0  # votes accumulate per slot
        kept = md.kept if md.kept_by_layer is None else md.kept_by_layer[self._layer_idx or 0]
        # 1. attention over compacted + live tokens (+ statistics), the whole batch at once
        api.paged_attention_batched(
            q, kv_cache, md.block_table, md.query_start_loc, md.seq_lens, kept, md.live_start,
            self.scale, out=out, mass_cache=mass, obs_cache=obs, obs_queries=md.obs_queries,
            max_query_len=md.max_query_len, max_seq_len=md.max_seq_len)
        # 2. rows whose layout changes now: score candidates, compact the winners
        if md.groups:
            t0 = _mark(q.device) if _TIMING else None
            for group in md.groups:
                self._compress(kv_cache, mass, obs, group, md.num_layers)
            if _TIMING:
                _marks.append((t0, _mark(q.device)))
        return output

    def _compress(self, kv_cache, mass, obs, grp: CompressGroup, num_layers: int) -> None:
        """Fold each row's old compacted tokens and newly-old live tokens (the candidates)
        into its first ``cap`` slots (fewer for a layer with a smaller layer budget),
        keeping the policy's choice per KV head."""
        g, n = grp.cand_blk.shape
        h, dd, policy = kv_cache.shape[1], kv_cache.shape[3] // 2, grp.policy
        layer = self._layer_idx or 0
        cap = policy.layer_capacity(layer, num_layers, grp.cap) if policy.per_layer else grp.cap
        cblk, coff = grp.cand_blk, grp.cand_off
        dst_blk, dst_off = grp.dst_blk[..., :cap], grp.dst_off[..., :cap]

        def per_head(stat):  # [G, n, H] -> [G*H, n]
            return stat[cblk, :, coff].permute(0, 2, 1).reshape(g * h, n)

        ctx = ScoreContext(
            layer_idx=layer,
            num_candidates=n,
            keys=kv_cache[cblk, :, coff, :dd].permute(0, 2, 1, 3).reshape(g * h, n, dd),
            attn_mass=per_head(mass) if mass is not None else None,
            obs_attn=per_head(obs) if any(r.obs_queries for r in grp.rows) else None,
            num_kv_heads=h,
        )
        if "obs_attn" in policy.needs and ctx.obs_attn is None:
            ctx.obs_attn = torch.zeros(g * h, n, device=kv_cache.device)
        if policy.can_stack():  # scores and selection act per (row, head) along the last dim
            keep = policy.select(ctx, cap)
        else:  # head-aware policies see one request at a time: [H, n]
            keep = torch.cat([policy.select(ctx.rows(i * h, (i + 1) * h), cap) for i in range(g)])
        keep = keep.view(g, h, cap)
        # Gather (a copy), then scatter: sources and destinations overlap.
        src = kv_cache[cblk, :, coff].permute(0, 2, 1, 3)  # [G, H, n, 2D]
        sel = src.gather(2, keep[..., None].expand(-1, -1, -1, src.shape[-1]))
        heads = torch.arange(h, device=kv_cache.device)[None, :, None]
        kv_cache[dst_blk, heads, dst_off] = sel
        # The mass moves with its token (H2O keeps accumulating it after compaction).
        m = self._stat(kv_cache, "mass")
        m[dst_blk, heads, dst_off] = m[cblk, :, coff].permute(0, 2, 1).gather(2, keep)


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


class _KVCompBackend:
    """What both backends share: our impl and builder, our KV-cache spec."""

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


class KVCompCPUBackend(_KVCompBackend, CPUAttentionBackend):
    """CPU: vLLM only ever picks CPU_ATTN there; the plugin swaps this class in when
    compression is on. Reads and writes the cache with the PyTorch reference."""


class KVCompCUDABackend(_KVCompBackend, AttentionBackend):
    """CUDA: our Triton kernels (triton_kernels/) over vLLM's paged KV cache. Chosen by the
    plugin in place of whatever vLLM selected, only when compression is on."""

    forward_includes_kv_cache_update = False
    supported_dtypes = [torch.float16, torch.bfloat16, torch.float32]

    @staticmethod
    def get_name() -> str:
        # The registry member we override (plugin.py): enums pickle by value, so a spawned
        # engine core can name it.
        return "CUSTOM"

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list:
        # The kernels index tokens by (block, offset) with power-of-two block sizes, and the
        # scheduler's block must be the kernel's block (layouts are counted in it).
        return [16, 32, 64, 128]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [32, 64, 128, 256]

    @classmethod
    def supported_kv_cache_layouts(cls):
        from vllm.v1.kv_cache_layout import KVCacheLayout

        return (KVCacheLayout.LBHNC,)  # [num_blocks, H_kv, bs, 2*D] per layer: pages contiguous

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == "decoder"
