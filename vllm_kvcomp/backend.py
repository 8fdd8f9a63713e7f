"""Attention backend: where the kernel reads compacted pages, where statistics are
produced, and where kept tokens are moved (compaction).

Per step, ``KVCompMetadataBuilder.build`` evaluates each batch row's layout (layout.py,
the same function the scheduler uses), writes the batch's per-row ``kept`` (per layer),
``live_start``, voting and mass flags into persistent device buffers (one host->device
copy), and groups the rows whose layout changes now (``RowStep``) into ``CompressGroup``s
with their slots precomputed. Then:
  1. ``KVCompImpl.forward`` (per layer) attends over each row's *old* layout (compacted +
     live tokens), the whole batch in one kernel, accumulating the statistics policies need
     (H2O mass, SnapKV votes). Nothing in it depends on the batch's content on the host, so
     vLLM captures decode steps in FULL CUDA graphs;
  2. ``compact_step`` runs once the model's forward is enqueued (plugin.py wraps
     ``execute_model``): for every layer and group it scores the candidates and compacts
     the winners -- all layers' statistics are complete by then.
The scheduler frees the gap blocks once this step is processed (allocator.py).
"""
from __future__ import annotations

import os
import threading
import time
import weakref
from dataclasses import dataclass, fields

import torch
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.v1.attention.backend import (AttentionBackend, AttentionCGSupport, AttentionImpl,
                                       AttentionMetadataBuilder, CommonAttentionMetadata)
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec

from vllm_kvcomp.allocator import KVCompSpec, page_capacity_fn
from vllm_kvcomp.layout import NO_PLAN, Layout, Plan, make_plan
from vllm_kvcomp.ops import quant, reference as ref
from vllm_kvcomp.triton_kernels import api
from vllm_kvcomp.policies import Policy, ScoreContext
from vllm_kvcomp.spec import parse_spec, resolve_request_spec

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


# The last built metadata with compaction due; ``compact_step`` consumes it after the forward.
_pending = threading.local()

# Adaptive layer budgets (CAKE), decided at a request's compaction on this worker:
# request id -> int32 [L] tokens each layer kept. Read by the builder for the request's
# later steps; dropped when the request finishes (plugin.py).
LAYER_KEPT: dict[str, torch.Tensor] = {}


def forget_requests(req_ids) -> None:
    for r in req_ids or ():
        LAYER_KEPT.pop(r, None)


@dataclass
class RowStep:
    """One request that compresses in this step (its layout changes)."""

    index: int  # batch row
    seq_len: int  # tokens after this step
    old: Layout  # layout the attention reads
    new: Layout  # layout after this step's compaction
    policy: Policy
    obs_queries: int  # queries whose attention SnapKV-style policies vote with
    split: tuple[int, int] | None = None  # new layout's (full-precision, demoted) tokens (grouping key)
    req_id: str = ""


@dataclass
class KVCompMetadata:
    """Per-step metadata: the batched kernel's arguments plus the rows that compress.
    Per-row tensors are views of the builder's persistent buffers (fixed addresses, so a
    captured CUDA graph reads the current step's values)."""

    num_actual_tokens: int
    block_table: torch.Tensor  # [B, max_blocks] int32
    query_start_loc: torch.Tensor  # [B+1] int32
    seq_lens: torch.Tensor  # [B] int32, tokens after this step
    kept_by_layer: torch.Tensor  # [L, B] int32, compacted tokens each layer reads (old layout)
    live_start: torch.Tensor  # [B] int32, first live position (old layout)
    obs_queries: torch.Tensor  # [B] int32, queries voting SnapKV-style this step (0 = none)
    mass_rows: torch.Tensor  # [B] int32, 1 = accumulate H2O attention mass for this row
    max_query_len: int
    max_seq_len: int
    want_mass: bool  # some row accumulates mass
    has_obs: bool  # some row votes
    obs_slots: tuple[torch.Tensor, torch.Tensor] | None  # keys read by compacting voters: cleared after
    groups: list["CompressGroup"]
    num_layers: int


@dataclass
class CompressGroup:
    """Rows compressing in this step with the same policy and candidate shape (decode
    recompression: every row folds `slack` blocks into the same capacity). Slots are the
    same for every layer, so they are computed once per step."""

    policy: Policy
    rows: list[RowStep]
    cap: int  # kept slots after compaction (demoting policies: full-precision ones)
    cand_blk: torch.Tensor  # [G, n] block of each candidate (old compacted, then folded live)
    cand_off: torch.Tensor  # [G, n] offset in that block
    dst_blk: torch.Tensor  # [G, 1, cap] destination blocks of the kept tokens
    dst_off: torch.Tensor  # [1, 1, cap]
    n_quant: int = 0  # demoting policies: tokens written to quantized pages after the cap
    block_rows: torch.Tensor | None = None  # [G, max_blocks] the rows' block tables
    k0: int = 0  # candidates [0, k0) are the old compacted slots
    cand_pos: torch.Tensor | None = None  # [G, n] logical positions of the candidates


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
                         dst_off=(dpos % block_size)[None, None, :], block_rows=bt, k0=k0, cand_pos=cand)


class KVCompMetadataBuilder(AttentionMetadataBuilder[KVCompMetadata]):
    # Decode attention launches the same kernels whatever the batch holds (statistics by
    # per-row flags, split count from the captured max_seq_len), and compaction runs after
    # the forward: vLLM captures uniform decode batches in FULL CUDA graphs; mixed
    # prefill/decode batches run piecewise (attention between graph pieces).
    _cudagraph_support = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str],
                 vllm_config: VllmConfig, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.block_size = kv_cache_spec.block_size  # the scheduler's unit: layouts agree
        self.server_spec = (vllm_config.additional_config or {}).get("kv_compression")
        self.num_layers = vllm_config.model_config.get_num_layers(vllm_config.parallel_config)
        self._plans: dict[tuple, tuple[Plan, Policy | None]] = {}
        self._layer_caps: dict[tuple, torch.Tensor] = {}  # (policy, kept) -> [L] kept per layer
        # Persistent per-row metadata, rows: kept per layer [0, L), live_start, obs_queries,
        # mass flag. Written in place each step: a FULL CUDA graph baked in these addresses.
        self.max_rows = vllm_config.scheduler_config.max_num_seqs
        self._meta = torch.zeros(self.num_layers + 3, self.max_rows, dtype=torch.int32, device=device)
        self._page_cap = page_capacity_fn(kv_cache_spec)

    def _plan(self, row: RowInfo) -> tuple[Plan, Policy | None]:
        key = (row.num_prompt_tokens, _override(row.extra_args))
        hit = self._plans.get(key)
        if hit is None:
            if len(self._plans) > 4096:
                self._plans.clear()
            spec = resolve_request_spec(self.server_spec, row.extra_args)
            hit = self._plans[key] = ((make_plan(spec, row.num_prompt_tokens, self.block_size, self._page_cap),
                                      spec.policy) if spec is not None else (NO_PLAN, None))
        return hit

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> KVCompMetadata:
        cm = common_attn_metadata
        b = cm.num_reqs  # padded to the graph's size in FULL CUDA graph steps
        qsl = cm.query_start_loc_cpu[: b + 1].tolist()
        seq_lens = (cm.seq_lens_cpu_upper_bound if cm.seq_lens_cpu_upper_bound is not None
                    else cm.seq_lens.cpu())[:b].tolist()
        infos = published_rows()
        n = len(infos)  # none: dummy / profiling / capture batch, nothing is compressed
        # Rows past the published ones must be a FULL graph's padding (no queries).
        if n > b or (n and any(qsl[i + 1] != qsl[i] for i in range(n, b))):
            # Never guess: the scheduler frees blocks by these rows' layouts.
            raise RuntimeError(f"kv-compression: {b} attention rows but the model runner "
                               f"published {n} requests")
        if b > self.max_rows:
            raise RuntimeError(f"kv-compression: batch of {b} rows > max_num_seqs {self.max_rows}")
        L = self.num_layers
        kept, live, obs_q, mass_rows = [0] * b, [0] * b, [0] * b, [0] * b
        compress: list[RowStep] = []
        layered: list[tuple[int, Policy]] = []  # compacted rows with layer budgets
        for i, info in enumerate(infos):
            plan, policy = self._plan(info)
            if policy is None:
                continue
            q_len, seq_len = qsl[i + 1] - qsl[i], seq_lens[i]
            old, new = plan.layout(seq_len - q_len), plan.layout(seq_len)
            kept[i], live[i] = old.kept, old.live_start
            if policy.per_layer and old.kept:
                layered.append((i, policy, info.req_id))
            mass_rows[i] = int("attn_mass" in policy.needs)
            if "obs_attn" in policy.needs and plan.capacity:
                # The prompt's last `window` queries vote, in whichever prefill chunks they
                # fall (a short last chunk leaves most of them in the one before); votes
                # accumulate per slot until the prompt's compaction.
                prompt = info.num_prompt_tokens
                first = max(prompt - max(policy.window, 1), seq_len - q_len)
                obs_q[i] = max(0, min(seq_len, prompt) - first) if seq_len - q_len < prompt else 0
            if new != old:
                compress.append(RowStep(i, seq_len, old, new, policy, obs_q[i], plan.split(new), info.req_id))
        by_shape: dict[tuple, list[RowStep]] = {}
        for row in compress:
            d = row.new.live_start - row.old.live_start
            by_shape.setdefault((row.policy, row.old.kept, d, row.split), []).append(row)
        # Host side: the persistent block [L + 3, b], then the groups' rows. One
        # host->device copy from pinned memory (a pageable copy would synchronise the host
        # with the GPU and stall the launch queue), one device copy into the buffers.
        host = torch.empty(L + 3, b, dtype=torch.int32)
        host[:L] = torch.tensor(kept, dtype=torch.int32)
        for i, policy, req_id in layered:  # each layer reads only the slots it filled
            if policy.adaptive_layers:
                caps = LAYER_KEPT.get(req_id)
                if caps is None:  # never guess: unwritten slots would be read
                    raise RuntimeError(f"kv-compression: no layer budgets recorded for request {req_id}")
                host[:L, i] = caps
            else:
                host[:L, i] = self._layer_capacities(policy, kept[i])
        host[L] = torch.tensor(live, dtype=torch.int32)
        host[L + 1] = torch.tensor(obs_q, dtype=torch.int32)
        host[L + 2] = torch.tensor(mass_rows, dtype=torch.int32)
        extra = []
        for rows in by_shape.values():
            extra += [r.index for r in rows] + [r.old.live_start for r in rows]
        flat = torch.cat([host.view(-1), torch.tensor(extra, dtype=torch.int32)])
        dev = cm.seq_lens.device
        dev_flat = flat.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else flat
        meta = self._meta[:, :b]
        meta.copy_(dev_flat[: (L + 3) * b].view(L + 3, b), non_blocking=True)
        block_table = cm.block_table_tensor[:b]
        groups, at = [], (L + 3) * b
        for (policy, k0, d, (cap, n_quant)), rows in by_shape.items():
            g = len(rows)
            idx, ls0 = dev_flat[at: at + g].long(), dev_flat[at + g: at + 2 * g].long()
            at += 2 * g
            grp = make_group(policy, rows, block_table, idx, ls0, k0, d, cap, self.block_size)
            grp.n_quant = n_quant
            groups.append(grp)
        md = KVCompMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            block_table=block_table,
            query_start_loc=cm.query_start_loc[: b + 1],
            seq_lens=cm.seq_lens[:b],
            kept_by_layer=meta[:L],
            live_start=meta[L],
            obs_queries=meta[L + 1],
            mass_rows=meta[L + 2],
            max_query_len=int(cm.max_query_len),
            max_seq_len=int(cm.max_seq_len),
            want_mass=any(mass_rows),
            has_obs=any(obs_q),
            obs_slots=(self._voter_slots(compress, block_table, dev)
                       if any(r.obs_queries for r in compress) else None),
            groups=groups,
            num_layers=L,
        )
        _pending.md = md if groups else None
        return md

    def _layer_capacities(self, policy: Policy, kept: int) -> torch.Tensor:
        key = (policy, kept)
        caps = self._layer_caps.get(key)
        if caps is None:
            if len(self._layer_caps) > 4096:
                self._layer_caps.clear()
            caps = self._layer_caps[key] = torch.tensor(
                [policy.layer_capacity(layer, self.num_layers, kept) for layer in range(self.num_layers)],
                dtype=torch.int32)
        return caps

    def _voter_slots(self, compress: list[RowStep], block_table, dev):
        """Slots of every key the compacting voters read: their votes accumulate per slot,
        so compact_step clears them once used (the same slots in every layer)."""
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
        from vllm.config import get_current_vllm_config_or_none

        cfg = get_current_vllm_config_or_none()  # set while vLLM builds the model
        self._num_layers = (cfg.model_config.get_num_layers(cfg.parallel_config)
                            if cfg is not None and cfg.model_config is not None else None)
        # Quantized pages (mikv): attention then reads each compacted page through its tag.
        server = parse_spec((cfg.additional_config or {}).get("kv_compression")) if cfg is not None else None
        self._demotes = server is not None and server.policy.action == "demote"
        self._tags: torch.Tensor | None = None
        # The one quantized format this engine's pages use (the server's bits): the kernel
        # is compiled for it alone (each format adds a loop; all three made decode ~30%
        # slower on the H100 even with no quantized page in the batch).
        self._page_bits = (server.policy.bits,) if self._demotes else ()

    def _stat(self, kv_cache: torch.Tensor, name: str, dtype=torch.float32) -> torch.Tensor:
        # Per-slot statistics beside the KV cache: [num_blocks, H_kv, bs] (1/(2*D) of the
        # cache's elements: 0.4% of a bf16 cache at D=128): "mass" (H2O), "obs" (SnapKV
        # votes), "pos" (int32 token position of each compacted slot: recompressing
        # policies only). Layer i's is row i of one [L, ...] tensor per engine, so
        # compaction can act on all layers at once.
        t = self._stats.get(name)
        if t is None or t.shape != kv_cache.shape[:3] or t.device != kv_cache.device:
            i, L = self._layer_idx, self._num_layers
            if i is not None and L and 0 <= i < L:
                t = _stat_pool(name, kv_cache, L, self, dtype=dtype)[i]
            else:
                t = torch.zeros(kv_cache.shape[:3], dtype=dtype, device=kv_cache.device)
            self._stats[name] = t
        return t

    def tags(self, kv_cache: torch.Tensor) -> torch.Tensor | None:
        """Per-block page precision (0 = full, else bits), one tensor for all layers (a
        request's layout is the same in every layer); None when nothing demotes."""
        if not self._demotes:
            return None
        t = self._tags
        if t is None or t.shape[0] != kv_cache.shape[0] or t.device != kv_cache.device:
            t = self._tags = _stat_pool("tags", kv_cache, 1, self, (kv_cache.shape[0],), torch.int8)
        return t

    def _set_layer(self, layer) -> None:
        if self._layer_idx is None:
            self._layer_idx = _layer_index(getattr(layer, "layer_name", ""))

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        self._set_layer(layer)
        # Statistics restart at every written slot; both are allocated here, before any
        # CUDA graph capture.
        api.write_kv(kv_cache, key, value, slot_mapping, self._stat(kv_cache, "mass"),
                     self._stat(kv_cache, "obs"))
        self.tags(kv_cache)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata: KVCompMetadata | None,
                output, output_scale=None, output_block_scale=None, **kw):
        md = attn_metadata
        if md is None:  # profiling / warm-up
            return output
        self._set_layer(layer)
        n = md.num_actual_tokens
        q = query[:n].view(n, self.num_heads, self.head_size)
        out = output[:n].view(n, self.num_heads, self.head_size)
        # A decode step on the kernel path may be captured in a CUDA graph and replayed for
        # any batch: launch the statistics pass always there, per-row flags decide.
        static = md.max_query_len <= 1 and api.use_triton(q)
        mass = self._stat(kv_cache, "mass") if (md.want_mass or static) else None
        obs = self._stat(kv_cache, "obs") if (md.has_obs or static) else None
        # attention over compacted + live tokens (+ statistics), the whole batch at once;
        # compaction follows once the whole forward is enqueued (compact_step)
        api.paged_attention_batched(
            q, kv_cache, md.block_table, md.query_start_loc, md.seq_lens,
            md.kept_by_layer[self._layer_idx or 0], md.live_start, self.scale, out=out,
            mass_cache=mass, obs_cache=obs, obs_queries=md.obs_queries if obs is not None else None,
            mass_rows=md.mass_rows, max_query_len=md.max_query_len, max_seq_len=md.max_seq_len,
            # only rows never compacted vote (a demoting policy compresses once), and no
            # demoting policy uses mass: statistics never meet a quantized page
            page_tag=self.tags(kv_cache), page_bits=self._page_bits, stats_tags=False)
        return output


# Per-engine statistics, keyed by the KV cache's backing storage (vLLM puts all layers of
# a cache in one allocation): name -> {key: ([L, num_blocks, H_kv, bs] float32, owner)}.
# ``owner`` (a weak reference to the first layer impl that asked) tells a live engine's
# pool from a dead engine's whose freed cache address a new engine happens to reuse.
_STAT_POOLS: dict[str, dict[tuple, tuple[torch.Tensor, weakref.ref]]] = {}


def _stat_pool(name: str, kv_cache: torch.Tensor, num_layers: int, owner, shape: tuple | None = None,
               dtype=torch.float32) -> torch.Tensor:
    """``[num_layers, *kv_cache.shape[:3]]`` (or ``shape``) zeros, one per engine and name."""
    key = (kv_cache.untyped_storage().data_ptr(), tuple(kv_cache.shape[:3]), kv_cache.device, num_layers)
    pools = _STAT_POOLS.setdefault(name, {})
    hit = pools.get(key)
    if hit is None or hit[1]() is None:  # none, or left by an engine that is gone
        pools.pop(key, None)
        while len(pools) >= 4:  # engines gone (profiling caches, earlier engines)
            pools.pop(next(iter(pools)))
        t = torch.zeros(shape or (num_layers, *kv_cache.shape[:3]), dtype=dtype, device=kv_cache.device)
        hit = pools[key] = (t, weakref.ref(owner))
    return hit[0]


@dataclass
class LayerStack:
    """All layers of one KV cache as single tensors (views, no copy) -- when vLLM's
    allocation allows it -- so compaction acts on every layer in one set of launches."""

    layers: list  # (KVCompImpl, its kv_cache) by layer index
    kv: torch.Tensor | None  # [L, num_blocks, H_kv, bs, 2D] or None (per-layer fallback)
    mass: torch.Tensor | None  # [L, num_blocks, H_kv, bs]
    obs: torch.Tensor | None
    key: tuple = ()
    tags: torch.Tensor | None = None  # per-block page precision (engines that demote)
    _pos: torch.Tensor | None = None

    def pos(self) -> torch.Tensor | None:
        """``[L, num_blocks, H_kv, bs]`` int32 token position of each compacted slot
        (allocated at the first recompressing policy's compaction; None without ``kv``)."""
        if self._pos is None and self.kv is not None:
            self._pos = _strided_stack([impl._stat(kv, "pos", torch.int32) for impl, kv in self.layers])
        return self._pos


def stack_layers(layers) -> LayerStack:
    pairs = sorted(((l.impl._layer_idx, l.impl, l.kv_cache) for l in layers
                    if isinstance(getattr(l, "impl", None), KVCompImpl) and l.impl._layer_idx is not None),
                   key=lambda x: x[0])
    impls = [p[1] for p in pairs]
    kv = _strided_stack([p[2] for p in pairs]) if [p[0] for p in pairs] == list(range(len(pairs))) else None
    mass = _strided_stack([i._stats.get("mass") for i in impls]) if kv is not None else None
    obs = _strided_stack([i._stats.get("obs") for i in impls]) if kv is not None else None
    if mass is None or obs is None:
        kv = None
    tags = impls[0].tags(pairs[0][2]) if impls else None
    return LayerStack([(p[1], p[2]) for p in pairs], kv, mass, obs, _stack_key(layers), tags)


def _stack_key(layers) -> tuple:
    """Cheap validity check of a cached stack: layer count, first cache and statistics."""
    first = next((l for l in layers if isinstance(getattr(l, "impl", None), KVCompImpl)), None)
    if first is None:
        return ()
    st = first.impl._stats
    return (len(layers), first.kv_cache.data_ptr(), first.impl._layer_idx,
            *(st[k].data_ptr() if k in st else 0 for k in ("mass", "obs")))


def _strided_stack(ts) -> torch.Tensor | None:
    """``torch.stack(ts)`` as a view, if the tensors are equally spaced in one storage."""
    if not ts or any(t is None for t in ts):
        return None
    t0 = ts[0]
    if any(t.shape != t0.shape or t.stride() != t0.stride() or t.dtype != t0.dtype
           or t.untyped_storage().data_ptr() != t0.untyped_storage().data_ptr() for t in ts):
        return None
    if len(ts) == 1:
        return t0[None]
    step = ts[1].storage_offset() - t0.storage_offset()
    if step <= 0 or any(t.storage_offset() - t0.storage_offset() != i * step for i, t in enumerate(ts)):
        return None
    return t0.as_strided((len(ts), *t0.shape), (step, *t0.stride()), t0.storage_offset())


# Where a caller without a holder of its own keeps its stack: one entry, so at most one
# engine's caches are referenced from here (a stack holds views of the KV caches).
_stacks: dict[str, LayerStack] = {}


def compact_step(layers: list, holder: dict | None = None) -> None:
    """Compaction of the step whose metadata was built last: called after the model's
    forward (plugin.py). ``layers``: the model's attention layers (their ``impl`` and
    ``kv_cache``; the same list object every step). ``holder``: where the layers' stack is
    cached -- the model runner's ``__dict__``, so it dies with the runner and its caches.
    Stream order puts it after this step's attention and before the next step's, which
    reads the new layouts."""
    md = getattr(_pending, "md", None)
    _pending.md = None
    if md is None:
        return
    holder = _stacks if holder is None else holder
    stack = holder.get("_kvcomp_stack")
    if stack is None or stack.key != _stack_key(layers):
        stack = holder["_kvcomp_stack"] = stack_layers(layers)
    t0 = _mark(md.seq_lens.device) if _TIMING else None
    for group in md.groups:
        if group.policy.action == "demote":
            compact_group_mixed(stack, group)
            continue
        if group.policy.adaptive_layers:
            compact_group_adaptive(stack, group)
        elif stack.kv is not None and group.policy.can_stack_layers():
            compact_group_layers(stack.kv, stack.mass, stack.obs if md.has_obs else None, group,
                                 pos=stack.pos() if group.policy.recompress else None)
        else:
            for impl, kv in stack.layers:
                compact_group(kv, impl._stat(kv, "mass"), impl._stat(kv, "obs") if md.has_obs else None,
                              group, impl._layer_idx, md.num_layers,
                              pos=impl._stat(kv, "pos", torch.int32) if group.policy.recompress else None)
        if stack.tags is not None:  # these blocks may have held another request's quantized pages
            bs = stack.layers[0][1].shape[2]
            stack.tags[group.dst_blk[..., ::bs].reshape(-1).long()] = quant.FULL
    if md.obs_slots is not None:  # votes accumulate per slot: leave them all zero
        blk, off = md.obs_slots
        if stack.obs is not None:
            stack.obs[:, blk, :, off] = 0.0
        else:
            for impl, kv in stack.layers:
                impl._stat(kv, "obs")[blk, :, off] = 0.0
    if _TIMING:
        _marks.append((t0, _mark(md.seq_lens.device)))


def discard_pending() -> None:
    _pending.md = None


def _votes(stack: LayerStack, grp: CompressGroup) -> torch.Tensor:
    """``[L, G, H_kv, n]`` SnapKV votes of the group's candidates in every layer."""
    return torch.stack([impl._stat(kv, "obs")[grp.cand_blk, :, grp.cand_off].permute(0, 2, 1)
                        for impl, kv in stack.layers])


def compact_group_adaptive(stack: LayerStack, grp: CompressGroup) -> None:
    """Layer budgets from the request's own votes (CAKE), then each layer compacts its
    ``budget[row, layer]`` best tokens into its first slots. The budgets go to the host
    once per request (one sync at the end of its prompt) so later steps' metadata tells
    each layer how many slots it reads."""
    caps = grp.policy.layer_budgets(_votes(stack, grp), grp.cap).tolist()  # [G][L], the one sync
    for i, row in enumerate(grp.rows):
        LAYER_KEPT[row.req_id] = torch.tensor(caps[i], dtype=torch.int32)
        one = CompressGroup(grp.policy, [row], grp.cap, grp.cand_blk[i:i + 1], grp.cand_off[i:i + 1],
                            grp.dst_blk[i:i + 1], grp.dst_off)
        for (impl, kv), cap in zip(stack.layers, caps[i]):
            compact_group(kv, impl._stat(kv, "mass"), impl._stat(kv, "obs"), one, impl._layer_idx,
                          len(stack.layers), cap=cap)


def compact_group(kv_cache, mass, obs, grp: CompressGroup, layer: int, num_layers: int,
                  cap: int | None = None, pos: torch.Tensor | None = None) -> None:
    """Fold each row's old compacted tokens and newly-old live tokens (the candidates)
    into its first ``cap`` slots (fewer for a layer with a smaller layer budget), keeping
    the policy's choice per KV head. ``mass`` moves with its token; ``pos`` (recompressing
    policies): each compacted slot's token position, kept up to date (see ``_swap_in``)."""
    g, n = grp.cand_blk.shape
    h, dd, policy = kv_cache.shape[1], kv_cache.shape[3] // 2, grp.policy
    if cap is None:
        cap = policy.layer_capacity(layer, num_layers, grp.cap) if policy.per_layer else grp.cap
    cblk, coff = grp.cand_blk, grp.cand_off

    def per_head(stat):  # [G, n, H] -> [G*H, n]
        return stat[cblk, :, coff].permute(0, 2, 1).reshape(g * h, n)

    cpos = _cand_positions(pos[None] if pos is not None else None, grp, h)  # [1, G, H, n]
    ctx = ScoreContext(
        layer_idx=layer,
        num_candidates=n,
        keys=kv_cache[cblk, :, coff, :dd].permute(0, 2, 1, 3).reshape(g * h, n, dd),
        attn_mass=per_head(mass) if "attn_mass" in policy.needs else None,
        obs_attn=per_head(obs) if obs is not None and any(r.obs_queries for r in grp.rows) else None,
        num_kv_heads=h,
        positions=cpos.reshape(g * h, n) if cpos is not None and grp.k0 else None,
    )
    if "obs_attn" in policy.needs and ctx.obs_attn is None:
        ctx.obs_attn = torch.zeros(g * h, n, device=kv_cache.device)
    _pick_and_move(kv_cache[None], mass[None], pos[None] if pos is not None else None, grp, ctx, cap, cpos,
                   per_request=not policy.can_stack())


def _pick_and_move(kv, mass, pos, grp: CompressGroup, ctx: ScoreContext, cap: int, cpos, per_request: bool) -> None:
    """The policy's choice over ``ctx`` (rows ``[Lc*G*H, n]``), then the move: a fold in
    place needs only the ``n - cap`` losers (``_swap_in``), a packing compaction the ``cap``
    winners (``_place``). ``per_request``: head-aware policies see one request's ``[H, n]``."""
    lc, h = kv.shape[0], kv.shape[2]
    g, n = grp.cand_blk.shape
    swap = _folds_in_place(grp, pos, cap)
    k = n - cap if swap else cap
    pick = grp.policy.evict if swap else grp.policy.select
    idx = torch.cat([pick(ctx.rows(i * h, (i + 1) * h), k) for i in range(g)]) if per_request else pick(ctx, k)
    if swap:
        _swap_in(kv, mass, pos, grp, idx.view(lc, g, h, k))
    else:
        _place(kv, mass, pos, grp, idx.view(lc, g, h, k), cpos)


def _cand_positions(pos: torch.Tensor | None, grp: CompressGroup, h: int) -> torch.Tensor | None:
    """``[Lc, G, H, n]`` token position of each candidate: the old compacted slots' from
    ``pos`` (``[Lc, nb, H, bs]``), the folded live tokens' from the layout. None without ``pos``."""
    if pos is None:
        return None
    lc, (g, n) = pos.shape[0], grp.cand_blk.shape
    live = grp.cand_pos[None, :, None, grp.k0:].expand(lc, g, h, n - grp.k0)
    if not grp.k0:
        return live
    ls = torch.arange(lc, device=pos.device)[:, None, None, None]
    heads = torch.arange(h, device=pos.device)[None, None, :, None]
    old = pos[ls, grp.cand_blk[None, :, None, :grp.k0], heads, grp.cand_off[None, :, None, :grp.k0]]
    return torch.cat([old.long(), live], dim=-1)


def _folds_in_place(grp: CompressGroup, pos: torch.Tensor | None, cap: int) -> bool:
    """A decode fold of a recompressing policy (``pos`` given, old region full) whose
    scores do not need candidates in position order: ``_swap_in``, else ``_place``."""
    return (pos is not None and grp.k0 == cap == grp.cap and grp.cand_blk.shape[1] > cap
            and not grp.policy.scores_need_order)


def _fused_fold(grp: CompressGroup, pos: torch.Tensor | None, kv: torch.Tensor) -> bool:
    """A fold in place whose scores the fold kernel computes itself (``Policy.fold_score``)."""
    p, (g, n) = grp.policy, grp.cand_blk.shape
    return bool(p.fold_score) and not p.shared and _folds_in_place(grp, pos, grp.cap) \
        and api.can_fold_evict(kv, n, n - grp.k0)


def _place(kv, mass, pos, grp: CompressGroup, keep: torch.Tensor, cpos: torch.Tensor | None) -> None:
    """Pack the winners ``keep`` (``[Lc, G, H, cap]`` ascending candidate indices) into
    slots ``[0, cap)`` of layers ``kv`` (``[Lc, nb, H, bs, 2D]``; ``mass``/``pos``
    ``[Lc, nb, H, bs]``), in candidate order: a prompt's compaction (position order).
    One Triton launch on the GPU (``api.place``)."""
    api.place(kv, mass, pos, keep, grp.cand_blk, grp.cand_off, grp.dst_blk, grp.dst_off,
              cpos.gather(3, keep) if pos is not None else None)


def _swap_in(kv, mass, pos, grp: CompressGroup, lose: torch.Tensor) -> None:
    """A decode fold that moves only what changes: ``lose`` (``[Lc, G, H, n - k0]``
    candidate indices) are the losers; kept old tokens stay in their slots and the folded
    tokens that won take the slots of the old ones that lost -- ``slack`` blocks of tokens
    per fold instead of the whole region (StreamingLLM at 0.25 of 8k: 64 tokens, not
    ~2,000). Slots are then no longer in position order (attention does not care: every
    compacted token precedes every query), so ``pos`` records each slot's token position
    for the next fold's scores. One Triton launch on the GPU (``api.fold_swap``)."""
    api.fold_swap(kv, mass, pos, lose, grp.cand_blk, grp.cand_off, grp.cand_pos, grp.k0)


def compact_group_mixed(stack: LayerStack, grp: CompressGroup) -> None:
    """Demoting policies (mikv), once per request at the end of its prompt: in each layer the
    best ``grp.cap`` candidates stay full precision, the next ``grp.n_quant`` are quantized
    into the pages after them (``compact_mixed``: the Triton kernel on the GPU, the PyTorch
    reference on CPU), the rest are dropped. Page tags are shared by all layers (every
    layer writes the same ones)."""
    g, n = grp.cand_blk.shape
    policy = grp.policy
    assert stack.tags is not None, "a demoting policy on an engine without page tags"
    assert (policy.bits,) == stack.layers[0][0]._page_bits, "the engine's pages use the server's bits"
    assert not any(r.old.kept for r in grp.rows), "demoting policies compress once (prompt only)"
    assert policy.can_stack_layers(), "rows of every layer are scored together"
    votes = _votes(stack, grp)  # candidates = positions [0, live_start)
    L, h = votes.shape[0], votes.shape[2]
    ctx = ScoreContext(layer_idx=-1, num_candidates=n, keys=None, attn_mass=None,
                       obs_attn=votes.reshape(L * g * h, n), num_kv_heads=h)
    full, demoted = policy.select_mixed(ctx, grp.cap, grp.n_quant)  # one top-k for all layers
    full, demoted = full.view(L, g, h, grp.cap), demoted.view(L, g, h, grp.n_quant)
    if stack.kv is not None:  # every layer and request in three launches
        api.compact_mixed_layers(stack.kv, stack.tags, grp.block_rows, n, full, demoted, policy.bits)
        return
    cand = torch.arange(n, device=grp.cand_blk.device)
    for layer, (impl, kv) in enumerate(stack.layers):
        for i in range(g):
            api.compact_mixed(kv, None, stack.tags, grp.block_rows[i], 0, cand, full[layer, i],
                              demoted[layer, i], policy.bits)


def _layers_per_chunk(kv, grp: CompressGroup, pos: torch.Tensor | None, budget: int = 256 << 20) -> int:
    """Layers scored and moved together: their temporaries (scores, gathered keys, indices,
    the reference's copies of moved K/V) stay under ``budget`` bytes."""
    L, h, dd = kv.shape[0], kv.shape[2], kv.shape[4] // 2
    g, n = grp.cand_blk.shape
    es = kv.element_size()
    moved = n - grp.cap if _folds_in_place(grp, pos, grp.cap) else grp.cap
    # the Triton moves (place, fold_swap) go straight from slot to slot: indices only
    move_bytes = 40 + (0 if api.use_triton(kv) else 2 * dd * es)
    per_layer = g * h * (n * (28 + (2 * dd * es if "keys" in grp.policy.needs else 0)) + moved * move_bytes)
    return max(1, min(L, budget // max(per_layer, 1)))


def compact_group_layers(kv, mass, obs, grp: CompressGroup, pos: torch.Tensor | None = None) -> None:
    """``compact_group`` for every layer at once: ``kv`` [L, nb, H, bs, 2D], ``mass``/``obs``/
    ``pos`` [L, nb, H, bs]. Rows of all layers are stacked for scoring ([L*G*H, n]), then
    ``_place`` / ``_swap_in`` move the winners. Layers go in chunks that bound the temporaries."""
    L, h, dd = kv.shape[0], kv.shape[2], kv.shape[4] // 2
    g, n = grp.cand_blk.shape
    policy, cap = grp.policy, grp.cap
    if _fused_fold(grp, pos, kv):  # StreamingLLM / H2O on the GPU: the whole fold, one launch
        api.fold_evict(kv, mass, pos, grp.cand_blk, grp.cand_off, grp.cand_pos, grp.k0, policy.sinks,
                       policy.window, policy.fold_score == "mass")
        return
    dev = kv.device
    chunk = _layers_per_chunk(kv, grp, pos)
    heads = torch.arange(h, device=dev)[None, None, :, None]  # [1, 1, H, 1]
    cb, co = grp.cand_blk[None, :, None, :], grp.cand_off[None, :, None, :]  # [1, G, 1, n]
    votes = obs is not None and any(r.obs_queries for r in grp.rows)
    for l0 in range(0, L, chunk):
        lc = min(chunk, L - l0)
        ls = torch.arange(l0, l0 + lc, device=dev)[:, None, None, None]  # [Lc, 1, 1, 1]
        lpos = pos[l0:l0 + lc] if pos is not None else None
        cpos = _cand_positions(lpos, grp, h)

        def stat(t):  # [Lc*G*H, n]
            return t[ls, cb, heads, co].reshape(lc * g * h, n)

        ctx = ScoreContext(
            layer_idx=-1, num_candidates=n,
            keys=kv[ls, cb, heads, co, :dd].reshape(lc * g * h, n, dd) if "keys" in policy.needs else None,
            attn_mass=stat(mass) if "attn_mass" in policy.needs else None,
            obs_attn=stat(obs) if votes else None,
            num_kv_heads=h, num_rows=lc * g * h, device=dev,
            positions=cpos.reshape(lc * g * h, n) if cpos is not None and grp.k0 else None)
        if "obs_attn" in policy.needs and ctx.obs_attn is None:
            ctx.obs_attn = torch.zeros(lc * g * h, n, device=dev)
        _pick_and_move(kv[l0:l0 + lc], mass[l0:l0 + lc], lpos, grp, ctx, cap, cpos, per_request=False)


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
