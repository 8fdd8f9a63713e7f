"""Store the step's new K/V into the paged cache, one launch per layer.

Semantics: ``vllm_kvcomp.ops.reference.write_kv`` -- token t's key and value for KV head h
go to ``kv_cache[slot // bs, h, slot % bs, :D]`` and ``[..., D:]``, its statistics slots
(mass, votes) are zeroed, padding tokens (slot < 0) are skipped. Replaces three advanced-indexing writes
whose host-side cost dominated a decode step under CUDA graphs (docs/gpu.md).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(key_ptr, value_ptr, slot_ptr, kv_ptr, mass_ptr, obs_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_ch,
                     stride_mb, stride_mh, BS: tl.constexpr, D: tl.constexpr, HAS_MASS: tl.constexpr,
                     HAS_OBS: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        blk = slot // BS
        off = slot % BS
        d = tl.arange(0, D)
        k = tl.load(key_ptr + t * stride_kt + h * stride_kh + d)
        v = tl.load(value_ptr + t * stride_vt + h * stride_vh + d)
        base = kv_ptr + blk * stride_cb + h * stride_ch + off * (2 * D)
        tl.store(base + d, k.to(kv_ptr.dtype.element_ty))
        tl.store(base + D + d, v.to(kv_ptr.dtype.element_ty))
        if HAS_MASS:
            tl.store(mass_ptr + blk * stride_mb + h * stride_mh + off, 0.0)
        if HAS_OBS:  # same shape and strides as mass
            tl.store(obs_ptr + blk * stride_mb + h * stride_mh + off, 0.0)


def write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             slot_mapping: torch.Tensor, mass: torch.Tensor | None = None,
             obs: torch.Tensor | None = None) -> None:
    n = slot_mapping.shape[0]
    if n == 0:
        return
    _, h, bs, d2 = kv_cache.shape
    d = d2 // 2
    assert key.shape[1] == h and key.shape[2] == d and key.stride(2) == 1 and value.stride(2) == 1
    assert kv_cache.stride(3) == 1 and kv_cache.stride(2) == d2
    m = mass if mass is not None else kv_cache
    if obs is not None:
        assert mass is not None and obs.stride() == mass.stride() and obs.shape == mass.shape
    _write_kv_kernel[(n, h)](
        key, value, slot_mapping, kv_cache, m, obs if obs is not None else m, key.stride(0), key.stride(1),
        value.stride(0), value.stride(1), kv_cache.stride(0), kv_cache.stride(1), m.stride(0), m.stride(1),
        BS=bs, D=d, HAS_MASS=mass is not None, HAS_OBS=obs is not None, num_warps=1)
