"""Where a decode fold's time goes: one recompressing policy's in-place fold (backend.
compact_group_layers over all layers) at the Llama-3-8B shape, host vs GPU time, and the
top GPU kernels (torch.profiler). Run on the GPU machine:

    source scripts/gpu_env.sh && python3 benchmarks/profile_fold.py --policy streaming

``--prompt N`` times a prompt's compaction instead (N candidates packed into ``--cap``
slots, once per request at the end of its prefill): the policy's ``select`` and the
move of the kept tokens (``api.place``: one Triton launch; ``--reference-move`` times the
PyTorch gather + scatter instead). On the GPU it first checks that both moves agree.
8,192 -> 2,048 on an H200: 2.55 ms per request with the PyTorch move, 0.68 ms with the
kernel (docs/gpu.md, "A prompt's compaction in one launch"). ``--device cpu`` runs it on
the CPU path (a smoke test of the script; no timings worth reporting).
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch

from vllm_kvcomp.backend import RowStep, compact_group_layers, make_group
from vllm_kvcomp.layout import Layout
from vllm_kvcomp.policies import POLICIES


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--policy", default="streaming")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--cap", type=int, default=1984)
    p.add_argument("--fold", type=int, default=64)
    p.add_argument("--rows", type=int, default=1, help="requests folding in the same step")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--prompt", type=int, default=0, help="time a prompt's compaction of this many tokens")
    p.add_argument("--device", default="cuda")
    p.add_argument("--reference-move", action="store_true",
                   help="--prompt: move with the PyTorch reference (gather + scatter), not the Triton kernel")
    a = p.parse_args()
    dev, bs = torch.device(a.device), 16
    if a.prompt:
        return prompt(a, dev, bs)
    L, H, D, G = a.layers, a.kv_heads, a.head_dim, a.rows
    per_req = (a.cap + 4 * a.fold) // bs + 8
    nb = G * per_req + 1
    kv = torch.randn(L, nb, H, bs, 2 * D, device=dev, dtype=torch.bfloat16)
    mass = torch.rand(L, nb, H, bs, device=dev)
    pos = torch.zeros(L, nb, H, bs, device=dev, dtype=torch.int32)
    bt = (torch.arange(G * per_req, device=dev) + 1).view(G, per_req).int()
    policy = POLICIES[a.policy]()
    # the prompt's compaction (packs, writes pos), then folds in place
    ls = a.cap + a.fold
    rows = [RowStep(i, ls, Layout(0, 0), Layout(a.cap, ls), policy, 0) for i in range(G)]
    idx = torch.arange(G, device=dev)
    compact_group_layers(kv, mass, None, make_group(policy, rows, bt, idx, torch.zeros(G, device=dev, dtype=torch.long),
                                                     0, ls, a.cap, bs), pos=pos)
    rows = [RowStep(i, ls + a.fold, Layout(a.cap, ls), Layout(a.cap, ls + a.fold), policy, 0) for i in range(G)]
    grp = make_group(policy, rows, bt, idx, torch.full((G,), ls, device=dev, dtype=torch.long), a.cap, a.fold, a.cap, bs)

    def fold():
        compact_group_layers(kv, mass, None, grp, pos=pos)

    for _ in range(5):
        fold()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    s.record()
    for _ in range(a.iters):
        fold()
    e.record()
    host = (time.perf_counter() - t0) / a.iters * 1e3
    torch.cuda.synchronize()
    gpu = s.elapsed_time(e) / a.iters
    # GPU-only time: the host launches ahead while the GPU is held by a long kernel
    blocker = torch.empty(1 << 28, device=dev)
    torch.cuda.synchronize()
    for _ in range(400):
        blocker.mul_(1.0)  # ~0.3 s of queued work
    s.record()
    for _ in range(a.iters):
        fold()
    e.record()
    torch.cuda.synchronize()
    busy = s.elapsed_time(e) / a.iters
    print(f"FOLD {a.policy} L={L} H={H} D={D} cap={a.cap} fold={a.fold} rows={G}: host {host:.3f} ms/fold, "
          f"stream {gpu:.3f} ms/fold, GPU-only {busy:.3f} ms/fold", flush=True)
    top_ops(fold, dev, 10)


def top_ops(fn, dev: torch.device, n: int) -> None:
    """torch.profiler's 15 costliest ops over ``n`` calls (GPU time on CUDA, else CPU)."""
    from torch.profiler import ProfilerActivity, profile
    cuda = dev.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(n):
            fn()
        if cuda:
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=15),
          flush=True)


def prompt(a, dev: torch.device, bs: int) -> None:
    """A prompt's compaction: candidates = positions [0, N) of each row, packed into [0, cap)."""
    L, H, D, G, n = a.layers, a.kv_heads, a.head_dim, a.rows, a.prompt
    assert a.cap < n, "--cap must be below --prompt"
    per_req = -(-n // bs) + 1
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    kv = torch.randn(L, G * per_req + 1, H, bs, 2 * D, device=dev, dtype=dt)
    mass = torch.rand(L, G * per_req + 1, H, bs, device=dev)
    policy = POLICIES[a.policy]()
    pos = torch.zeros_like(mass, dtype=torch.int32) if policy.recompress else None
    bt = (torch.arange(G * per_req, device=dev) + 1).view(G, per_req).int()
    rows = [RowStep(i, n, Layout(0, 0), Layout(a.cap, n), policy, 0) for i in range(G)]
    grp = make_group(policy, rows, bt, torch.arange(G, device=dev), torch.zeros(G, device=dev, dtype=torch.long),
                     0, n, a.cap, bs)

    def run():  # the same work every time: the packed region is the next call's candidates' prefix
        compact_group_layers(kv, mass, None, grp, pos=pos)

    if dev.type == "cuda":  # the kernel's result at this shape, against the reference's
        state = [t.clone() if t is not None else None for t in (kv, mass, pos)]
        run()
        got = [kv.clone(), mass.clone(), pos.clone() if pos is not None else None]
        for t, s0 in zip((kv, mass, pos), state):
            if t is not None:
                t.copy_(s0)
        with _reference_move():
            run()
        same = all(a is None or torch.equal(a, b) for a, b in zip(got, (kv, mass, pos)))
        print(f"PROMPT CHECK Triton place == reference place: {same}", flush=True)
    torch_move = a.reference_move or dev.type != "cuda"
    with _reference_move() if a.reference_move else contextlib.nullcontext():
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        for _ in range(3):
            run()
        sync()
        t0 = time.perf_counter()
        for _ in range(a.iters):
            run()
        sync()
        ms = (time.perf_counter() - t0) / a.iters * 1e3
        print(f"PROMPT {a.policy} {'PyTorch' if torch_move else 'Triton'} move L={L} H={H} D={D} {n} -> {a.cap} "
              f"rows={G}: {ms:.3f} ms per compaction ({ms / G:.3f} ms per request)", flush=True)
        top_ops(run, dev, 5)


@contextlib.contextmanager
def _reference_move():
    """Route ``api.place`` to the PyTorch reference while the context is open."""
    from vllm_kvcomp.ops import reference
    from vllm_kvcomp.triton_kernels import api

    old = api.place
    api.place = reference.place
    try:
        yield
    finally:
        api.place = old


if __name__ == "__main__":
    main()
