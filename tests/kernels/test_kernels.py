"""Triton kernels vs the PyTorch reference.

Without CUDA every kernel runs under the Triton interpreter on small shapes (conftest.py);
on a GPU the same tests run for real, plus the ``gpu_*`` tests with realistic shapes.
Each GPU-only test names its CPU twin.
"""
from __future__ import annotations

import functools
import os
import shutil

import pytest
import torch
from .kvbatch import Req, make_batch, rel_err

from vllm_kvcomp.ops import quant, reference
from vllm_kvcomp.triton_kernels import api
from vllm_kvcomp.triton_kernels.compaction import compact_mixed as tri_compact_mixed
from vllm_kvcomp.triton_kernels.paged_attention import paged_attention_batched

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
gpu_only = pytest.mark.skipif(not CUDA, reason="realistic shapes need a GPU; CPU twin named in the docstring")
# ||out - ref|| / ||ref||: probabilities go to the PV product in the model dtype (2^-9 for
# bf16, 2^-12 for fp16) and the output is rounded to it.
TOL = {torch.bfloat16: 8e-3, torch.float16: 2e-3, torch.float32: 1e-4}
# Statistics are fp32 sums of exp(s - lse); on the GPU the forward's scores over quantized
# pages use q*scale rounded to the model dtype, so its LSE is ~2^-9 |s| off there.
STAT_TOL = {False: 2e-3, True: 1.5e-2 if CUDA else 2e-3}


def _check_batch(b, *, splits=None, stats=True, tol=None, config=None):
    """Run the batched kernel with stats and compare request by request."""
    nb, hkv = b.kv.shape[:2]
    slots = max(quant.capacities(b.kv).values()) if b.page_tag is not None else b.kv.shape[2]
    mass0 = torch.rand(nb, hkv, slots, device=DEV)
    obs0 = torch.rand(nb, hkv, slots, device=DEV)
    mass, obs = mass0.clone(), obs0.clone()
    out = torch.full_like(b.q, float("nan"))
    scale = b.q.shape[-1] ** -0.5
    paged_attention_batched(*b.args(), scale, page_tag=b.page_tag, out=out,
                            mass_cache=mass if stats else None, obs_cache=obs if stats else None,
                            obs_queries=b.obs, num_splits=splits, config=config)
    tol = tol or TOL[b.q.dtype]
    if b.page_tag is not None and CUDA and b.q.dtype == torch.bfloat16:
        # the kernel rounds dequantized keys to bf16 (what a full page holds anyway); the
        # reference keeps them in fp32: up to 9e-3 seen on the H100, the int4 step is ~7%
        tol = max(tol, 1.2e-2)
    stol = STAT_TOL[b.page_tag is not None]
    qsl = b.qsl.tolist()
    for i, r in enumerate(b.reqs):
        row = b.block_table[i]
        o, m, ob = quant.paged_attention_mixed(b.q[qsl[i]:qsl[i + 1]], b.kv, b.page_tag, row, r.kept,
                                               r.live_start, r.seq_len, scale, True, r.obs)
        got = out[qsl[i]:qsl[i + 1]]
        assert not got.isnan().any(), f"request {i}: NaN (read outside compacted+live?)"
        assert rel_err(got, o) < tol, (i, rel_err(got, o))
        if stats:
            blk, slot = quant.key_slots(b.kv, b.page_tag, row, r.kept, r.live_start, r.seq_len)
            gm = (mass[blk, :, slot] - mass0[blk, :, slot]).t()
            assert rel_err(gm, m) < stol, (i, rel_err(gm, m))
            go = (obs[blk, :, slot] - obs0[blk, :, slot]).t()
            if r.obs:
                assert rel_err(go, ob) < stol, (i, rel_err(go, ob))
            else:
                assert go.abs().max() < 1e-6
    if stats:
        # nothing outside the requests' keys was touched
        touched = torch.zeros_like(mass, dtype=torch.bool)
        for i, r in enumerate(b.reqs):
            blk, slot = quant.key_slots(b.kv, b.page_tag, b.block_table[i], r.kept, r.live_start, r.seq_len)
            touched[blk, :, slot] = True
        assert torch.equal(mass[~touched], mass0[~touched])


# ----------------------------------------------------------------------------- quantization
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("dist", ["normal", "outliers"])
def test_quant_error_bound(bits, dist):
    """Round-trip error per group <= half a step + fp16 metadata rounding (stated in quant.py)."""
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(64, 128, generator=g)
    if dist == "outliers":
        x[:, 3] *= 30
        x[7] *= 10
    for dim in (0, 1):  # per channel (keys) and per token (values)
        c, s, z = quant.quantize_group(x, bits, dim)
        assert c.max() <= (1 << bits) - 1
        xh = c.float() * s.float().unsqueeze(dim) + z.float().unsqueeze(dim)
        rng = x.amax(dim, keepdim=True) - x.amin(dim, keepdim=True)
        bound = rng / (2 * ((1 << bits) - 1)) * (1 + 2 ** -10) + 2 ** -10 * x.abs().amax(dim, keepdim=True)
        assert ((x - xh).abs() <= bound + 1e-6).all()
    codes = torch.randint(0, 1 << bits, (5, 64), dtype=torch.uint8)
    assert torch.equal(quant.unpack(quant.pack(codes, bits), bits), codes)


def test_page_capacity_fits():
    for bs in (16, 32, 64, 128):
        for d in (32, 64, 128, 256):
            for es in (2, 4):
                for bits in quant.BITS:
                    o = quant.page_offsets(bits, bs, d, es)
                    assert o["end"] <= quant.page_bytes(bs, d, es)
                    assert o["cap"] >= bs * (16 // bits) * (0.7 if d == 32 else 0.8) * es / 2  # the point of the format


@pytest.mark.parametrize("bits,bs,d", [(4, 16, 128), (2, 16, 64), (4, 32, 128), (8, 16, 128)])
def test_pair_order_is_what_the_twin_reads(bits, bs, d):
    """int4/int2 pages of blocks of 16 hold their codes in the CUDA twin's operand pair order
    (docs/page_format.md): a key word's halves start with bytes 0 and 1 of the row, and 8
    bits up with bytes 2 and 3; a value word's halves with byte e of tokens 2i and 2i + 1,
    and 8 bits up with byte e + 1. Other pages keep the plain order. Either way the codes
    fill exactly the page's code regions (nothing reaches the scales)."""
    pair = quant.paired(bits, bs)
    assert pair == (bits in (4, 2) and bs == 16)
    o = quant.page_offsets(bits, bs, d, 2)
    cap, row = o["cap"], o["row"]
    assert cap % 2 == 0 or not pair
    kv = torch.zeros(2, 1, bs, 2 * d, dtype=torch.float16)
    # codes that name their place: key code of (token t, channel c) and value code of (t, c)
    qmax = (1 << bits) - 1
    k = (torch.arange(cap)[:, None] * 3 + torch.arange(d)[None, :] * 5) % (qmax + 1)
    v = (torch.arange(cap)[:, None] * 7 + torch.arange(d)[None, :] * 11) % (qmax + 1)
    k[0], v[:, 0] = qmax, qmax  # every channel's and token's range is [0, qmax]: scale 1, zero 0
    k[1], v[:, 1] = 0, 0
    quant.write_page(kv, 1, 0, k.float(), v.float(), bits)
    page = kv[1, 0].view(torch.uint8).flatten()
    kp, vp = quant.pack(k.to(torch.uint8), bits), quant.pack(v.to(torch.uint8), bits)  # [cap, row], plain
    kq = page[o["kq"]:o["kq"] + cap * row].view(cap, row)
    vq = page[o["vq"]:o["vq"] + cap * row]
    if pair:
        # keys: stored bytes 0, 2, 1, 3 of every 4
        assert torch.equal(kq.view(cap, row // 4, 4)[..., [0, 2, 1, 3]], kp.view(cap, row // 4, 4))
        # values: per token pair, 2 bytes of the first token, then 2 of the second
        got = vq.view(cap // 2, row // 2, 2, 2).permute(0, 2, 1, 3).reshape(cap, row)
        assert torch.equal(got, vp)
    else:
        assert torch.equal(kq, kp) and torch.equal(vq.view(cap, row), vp)
    rk, rv = quant.read_pages(kv, torch.tensor([1]), bits)
    assert torch.equal(rk[0, 0], k.float()) and torch.equal(rv[0, 0], v.float())


# ----------------------------------------------------------------------------- attention
DECODE = [
    # d, bs, hkv, g, dtype, splits
    (32, 16, 2, 4, torch.bfloat16, None),
    (64, 32, 1, 1, torch.float16, 3),
    (128, 16, 2, 3, torch.bfloat16, 2),
    (256, 64, 1, 2, torch.bfloat16, None),
    (32, 128, 1, 8, torch.float32, 2),
]


@pytest.mark.parametrize("d,bs,hkv,g,dtype,splits", DECODE)
def test_decode(d, bs, hkv, g, dtype, splits):
    reqs = [Req(1, 3 * bs + 5), Req(1, 9 * bs + 1, live_start=6 * bs, kept=2 * bs),
            Req(1, 5 * bs, live_start=3 * bs + 3, kept=bs + 7), Req(1, 1), Req(1, 2 * bs, live_start=bs, kept=bs)]
    b = make_batch(reqs, hkv=hkv, g=g, d=d, bs=bs, dtype=dtype, device=DEV, seed=d + bs)
    _check_batch(b, splits=splits)


def test_few_rows_decode_takes_long_tiles(monkeypatch):
    """Decode over few (request, KV head) rows -- long contexts at small batch -- takes
    128-token key tiles and 16 splits (flash-decoding; docs/kernels.md) and still matches
    the reference, over live and compacted tokens, with statistics (which keep their own
    tiling). The CPU interpreter counts 4 SMs: 2 requests x 2 KV heads are few."""
    from vllm_kvcomp.triton_kernels import paged_attention as pa
    from vllm_kvcomp.triton_kernels.paged_attention import FEW_ROWS_SPLITS, _few_rows_decode

    cfg, splits = _few_rows_decode(DEV, 4, 128, 16, 2, 4096)
    assert cfg["TILE_N"] == 128 and cfg["num_stages"] >= 2 and splits == FEW_ROWS_SPLITS
    assert _few_rows_decode(DEV, 4, 128, 16, 2, 200)[1] == 1  # one tile's worth: one split
    assert _few_rows_decode(DEV, 1 << 20, 128, 16, 2, 4096) == (None, None)  # batch fills the GPU
    assert _few_rows_decode(DEV, 4, 256, 16, 2, 4096) == (None, None)
    reqs = [Req(1, 40 * 16 + 3), Req(1, 30 * 16 + 1, live_start=12 * 16, kept=5 * 16 + 7)]
    b = make_batch(reqs, hkv=2, g=4, d=128, bs=16, dtype=torch.bfloat16, device=DEV, seed=11)
    tilings, consts = [], pa._launch_consts
    monkeypatch.setattr(pa, "_launch_consts", lambda *a: tilings.append(a[-1]) or consts(*a))
    _check_batch(b)
    assert [dict(t or {}).get("TILE_N") for t in tilings] == [128, None]  # forward, then statistics


def test_benchmark_decode_call_reads_nothing_back(monkeypatch):
    """Regression (docs/kernels.md, "Measured on an H200"): ``bench_kernels.Decode.run``
    read ``max_seq_len`` from the device inside every timed call -- a host sync that added
    0.07-0.14 ms to every decode timing for weeks and made ours look slower than flash. A
    timed call must read no device tensor on the host (it can then also be captured in a
    CUDA graph, as vLLM runs decode)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "bench_kernels.py")
    spec = importlib.util.spec_from_file_location("bench_kernels_under_test", path)
    bk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bk)
    monkeypatch.setattr(bk, "DEV", str(DEV))
    c = bk.Decode(2, 100, hkv=2, g=2, d=32)

    def host_read(*a, **k):
        raise AssertionError("a timed call read a device tensor on the host")

    for name in ("item", "tolist", "__int__", "__bool__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    out = c.run()
    monkeypatch.undo()
    assert out.shape == c.q.shape and not out.isnan().any()


PREFILL = [
    (32, 16, 2, 2, torch.bfloat16),
    (64, 32, 1, 4, torch.float16),
]


@pytest.mark.parametrize("d,bs,hkv,g,dtype", PREFILL)
def test_prefill_varlen_chunked(d, bs, hkv, g, dtype):
    """Varlen batch: fresh prompts, a chunk of a longer prompt, decode tokens, compacted requests."""
    reqs = [Req(7, 40, obs=3), Req(1, 90, live_start=64, kept=32, obs=1), Req(70, 70, obs=5),
            Req(5, 70, live_start=48, kept=16, obs=5), Req(33, 33 + 2 * bs)]
    b = make_batch(reqs, hkv=hkv, g=g, d=d, bs=bs, dtype=dtype, device=DEV, seed=d)
    _check_batch(b)


MIXED = [
    # d, bs, g, dtype, q_lens
    (32, 16, 2, torch.bfloat16, (1, 1, 1, 1, 1)),
    (64, 16, 4, torch.float16, (1, 6, 1, 3, 2)),
    (128, 32, 2, torch.bfloat16, (1, 1, 2, 1, 1)),
]


@pytest.mark.parametrize("d,bs,g,dtype,q_lens", MIXED)
def test_mixed_precision_pages(d, bs, g, dtype, q_lens):
    """Compacted regions of int8/int4/int2/full pages in any order (and in compaction's
    order: full then one precision), partial last page, stale tags on live blocks and in the gap."""
    plans = [[0, 4, 2, 8], [2, 2], [8], [4, 0, 0], [0, 0, 4, 4]]
    reqs = []
    for ql, plan in zip(q_lens, plans):
        caps = sum(quant.page_capacity(t, bs, d, 2) for t in plan)
        live = -(-caps // bs) * bs + bs
        reqs.append(Req(ql, live + 2 * bs + 3, live_start=live, plan=plan, obs=min(ql, 2)))
    b = make_batch(reqs, hkv=2, g=g, d=d, bs=bs, dtype=dtype, device=DEV, seed=d, tags=True)
    _check_batch(b, splits=None if q_lens[1] > 1 else 3)


@pytest.mark.parametrize("splits", [3, None])
def test_mixed_multi_page_runs(splits):
    """Long runs of quantized pages of each format, split boundaries inside a run."""
    bs, d = 16, 64
    plans = [[0, 4, 4, 4, 4, 4], [2, 2, 2], [8] * 5, [4, 2]]
    reqs = []
    for i, plan in enumerate(plans):
        caps = sum(quant.page_capacity(t, bs, d, 2) for t in plan)
        live = -(-caps // bs) * bs + bs
        reqs.append(Req(1 + i % 2, live + 20, live_start=live, plan=plan, obs=1))
    b = make_batch(reqs, hkv=2, g=2, d=d, bs=bs, dtype=torch.bfloat16, device=DEV, seed=splits or 0, tags=True)
    _check_batch(b, splits=splits)


class _Spy:
    """Counts the run's own launches (quant_decode.launch: the CUDA twin or the Triton
    kernel, by kind) and runs them."""

    def __init__(self, monkeypatch, quant_decode):
        self.launch, self.kinds = quant_decode.launch, []
        monkeypatch.setattr(quant_decode, "launch", self)

    @property
    def launches(self):
        return len(self.kinds)

    def __call__(self, kind, *a, **kw):
        self.kinds.append(kind)
        return self.launch(kind, *a, **kw)


def _decode_runs_batch(d, hkv, g, bs, seed, scale_runs=1):
    """Decode rows: a sorted run of each format (several pages, partial last page), an
    unsorted region, full pages only, nothing compacted."""
    plans = [[0] + [4] * 5 * scale_runs, [2] * 3 * scale_runs, [8] * 5 * scale_runs, [0, 0] + [4] * scale_runs,
             [4, 2], [0, 0], None]
    reqs = []
    for i, plan in enumerate(plans):
        if plan is None:
            reqs.append(Req(1, 40 + i))
            continue
        caps = sum(quant.page_capacity(t, bs, d, 2) for t in plan)
        live = -(-caps // bs) * bs + bs
        reqs.append(Req(1, live + 5 + 7 * i, live_start=live, plan=plan, obs=i % 2))
    return make_batch(reqs, hkv=hkv, g=g, d=d, bs=bs, dtype=torch.bfloat16, device=DEV, seed=seed, tags=True)


@pytest.mark.parametrize("splits,pages_per_step", [(None, 1), (3, 2)])
def test_decode_quantized_runs_own_launch(splits, pages_per_step, monkeypatch):
    """Decode reads a sorted region's quantized run in quant_decode's launch (packed code
    conversion; on the CPU the same kernel unpacks with shifts), merged with the forward's
    partials: every row matches the reference, with and without that launch."""
    from vllm_kvcomp.triton_kernels import quant_decode

    spy = _Spy(monkeypatch, quant_decode)
    monkeypatch.setattr(quant_decode, "ENABLED", True)
    monkeypatch.setattr(quant_decode, "PB", pages_per_step)  # > 1: the pages' softmax states merged
    b = _decode_runs_batch(64, 2, 4, 16, seed=7)
    _check_batch(b, splits=splits, stats=False)
    # on a GPU the CUDA twin (csrc/quant_decode.cu) reads them; here the Triton kernel
    assert spy.kinds == ["cuda" if CUDA else "triton"]
    if CUDA:
        # on a Hopper the twin went first and the forward ran beside it, the last program of
        # each row merging (whichever kernel it belongs to); the other order too
        assert quant_decode.pdl(b.q) == (torch.cuda.get_device_capability() >= (9, 0))
        monkeypatch.setattr(quant_decode, "PDL", not quant_decode.PDL)
        _check_batch(b, splits=splits, stats=False)
        monkeypatch.setattr(quant_decode, "PDL", not quant_decode.PDL)
        spy.kinds.pop()
    _check_batch(b, splits=splits, stats=False, config={"QRUN": False})
    assert spy.launches == 1  # the fused kernel alone read the runs
    # statistics over quantized pages recompute the forward's scores: the runs stay there
    _check_batch(b, splits=splits)
    assert spy.launches == 1


_NVCC = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)


@pytest.mark.skipif(_NVCC is None, reason="no nvcc here: on GPU machines NVRTC builds the CUDA twin at first use, "
                                          "and the decode tests above run it")
@pytest.mark.parametrize("D,page_bits,chains,pipe,steal,zquad", [
    (128, (4,), 0, 0, 0, 0), (128, (2,), 0, 0, 0, 0), (128, (8,), 0, 0, 0, 0), (128, (2, 4, 8), 0, 0, 0, 0),
    (64, (2, 4, 8), 0, 0, 0, 0),
    (128, (4,), 1, 0, 0, 0), (128, (2,), 1, 0, 0, 0), (128, (4,), 0, 1, 0, 0), (128, (2,), 0, 1, 0, 0),
    (128, (4,), 0, 0, 4, 0), (128, (2,), 0, 1, 4, 0),
    (128, (4,), 0, 0, 0, 1), (128, (2,), 0, 0, 0, 1), (128, (2, 4, 8), 0, 0, 0, 1)])
def test_cuda_twin_compiles_for_hopper_without_spills(D, page_bits, chains, pipe, steal, zquad):
    """csrc/quant_decode.cu, with the #defines the launcher gives it, compiles for an
    H100/H200 (sm_90) for each format and head dim it is sent, within the register cap of
    __launch_bounds__ and without spilling in the page loop (a spill there would cost every
    page): a shipped build of one format spills nothing; every format compiled in, and an
    A/B variant, at most a few values kept across the loop (stored before it, loaded
    after). Checks the source where there is no GPU; its results are checked against the
    reference by the decode tests above on a GPU (chains, pipe, steal, zquad: the A/B variants,
    test_cuda_twin_variants; the PIPE variant holds 3 pages, so 8 programs an SM, and is
    built with that register cap). The page loop is every loop around a tensor-core dot,
    from its top: a reload before the loop's first dot counts (the check before 2026-12-03
    began at the first dot and missed CHAINS's six)."""
    import re
    import subprocess
    import tempfile

    import triton

    from vllm_kvcomp.triton_kernels import quant_decode as qd

    minb = 8 if pipe else qd.CUDA_MINB
    src = qd.cuda_source(D, 16, 2, page_bits, True, 3 if pipe else qd.CUDA_STAGES, minb, chains=chains, pipe=pipe,
                         steal=steal, zquad=zquad)
    with tempfile.TemporaryDirectory() as tmp:
        cu = os.path.join(tmp, "k.cu")
        with open(cu, "w") as f:
            f.write(src)
        r = subprocess.run([_NVCC, "-arch=sm_90", "-cubin", "-std=c++17", "-Xptxas", "-v", cu, "-o",
                            os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
        sass = subprocess.run([nvdisasm, "-c", os.path.join(tmp, "k.cubin")], capture_output=True, text=True).stdout
    regs = int(re.search(r"Used (\d+) registers", r.stderr).group(1))
    assert regs <= 65536 // (32 * minb), regs
    if not (chains or pipe or steal) and len(page_bits) == 1:
        assert "0 bytes spill stores" in r.stderr, r.stderr[-1500:]
    # the page loop: every loop (a branch back to a label) that holds a tensor-core dot, from
    # its label to its branch. Loads at the loop's top, before its first dot, count too. (A
    # run's last page is read after its loop, once a program: every format compiled in keeps
    # 16 bytes on the stack across the loops, and CHAINS for int2 one value, since then.)
    ins, labels = [], {}
    for line in sass.splitlines():
        lab = re.match(r"^(\.L_x_\d+):", line)
        if lab:
            labels[lab.group(1)] = len(ins)
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*)", line)
        if m:
            ins.append((m.group(1), m.group(2)))
    ops = [o for o, _ in ins]
    mma = [i for i, o in enumerate(ops) if o.startswith("HMMA")]
    assert mma, "no HMMA in the SASS"
    spans = []
    for i, (o, rest) in enumerate(ins):
        back = re.search(r"`\((\.L_x_\d+)\)", rest) if o == "BRA" else None
        if back and labels.get(back.group(1), i + 1) <= i and any(labels[back.group(1)] <= k <= i for k in mma):
            spans.append((labels[back.group(1)], i))
    assert spans, "no loop around the tensor-core dots found"
    for a, b in spans:
        assert not [o for o in ops[a:b + 1] if o.startswith(("LDL", "STL"))], (a, b, r.stderr[-1500:])
    assert int(re.search(r"(\d+) bytes spill stores", r.stderr).group(1)) <= 64, r.stderr[-1500:]


@functools.lru_cache(maxsize=None)
def _nvrtc():
    """libnvrtc where one is installed (the test extra's nvidia-cuda-nvrtc wheel, or a CUDA
    toolkit's), else None. Loaded once (the skip condition and the tests ask)."""
    import ctypes
    import ctypes.util
    import glob

    try:
        import nvidia

        found = [p for d in nvidia.__path__ for p in sorted(glob.glob(os.path.join(d, "*", "lib", "libnvrtc.so*")))]
    except ImportError:
        found = []
    for path in found + [ctypes.util.find_library("nvrtc")]:
        if path:
            try:
                # the builtins it dlopens at compile time, loaded first: the wheel's folder is
                # on no library path
                for b in glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so*")):
                    ctypes.CDLL(b, mode=ctypes.RTLD_GLOBAL)
                return ctypes.CDLL(path)
            except OSError:
                pass
    return None


@pytest.mark.skipif(_nvrtc() is None, reason="no libnvrtc here (pip install nvidia-cuda-nvrtc)")
@pytest.mark.parametrize("D,page_bits,pdl,probe", [(128, (2, 4, 8), False, False), (64, (4,), False, False),
                                                  (128, (4,), True, False), (128, (4,), True, True)])
def test_cuda_twin_compiles_under_nvrtc_as_at_run_time(monkeypatch, D, page_bits, pdl, probe):
    """The twin through torch's own NVRTC path with the options _cuda_kernel passes: NVRTC
    is stricter than nvcc (its JIT mode rejects an unannotated lambda as host code, which
    once made every GPU fall back to the Triton kernel while the nvcc test passed). pdl:
    as built for a Hopper, letting the forward launch as its dependent. probe: the PIPE and
    STEAL variants with the timeline probe_timeline.py builds."""
    import torch.cuda._utils as cu_utils
    import torch.utils.cpp_extension as cpp_ext

    from vllm_kvcomp.triton_kernels import quant_decode as qd

    lib = _nvrtc()
    monkeypatch.setattr(cu_utils, "_get_gpu_rtc_library", lambda: lib)
    monkeypatch.setattr(cpp_ext, "include_paths", lambda *a, **k: [])  # the .cu includes no headers
    src = qd.cuda_source(D, 16, 2, page_bits, True, 3 if probe else qd.CUDA_STAGES, qd.CUDA_MINB, pdl, pipe=int(probe),
                         timeline=4096 * probe, steal=4 * probe)
    assert ("#define PDL 1" in src) == pdl
    cubin, name = cu_utils._nvrtc_compile(src, "qrun", "90", nvcc_options=list(qd.NVRTC_OPTIONS))
    assert name == "qrun" and cubin[:4] == b"\x7fELF"


@pytest.mark.skipif(not CUDA, reason="the CUDA twin runs on a GPU only; on the CPU the run's semantics are "
                                      "test_decode_quantized_runs_own_launch's, through the Triton kernel")
@pytest.mark.parametrize("chains,pipe,d,steal,early,g,zquad", [
    (1, 0, 64, 0, 0, 4, 0), (0, 1, 64, 0, 0, 4, 0), (0, 1, 128, 0, 0, 4, 0), (1, 1, 64, 0, 0, 4, 0),
    (0, 0, 128, 1, 0, 4, 0), (0, 0, 64, 2, 0, 4, 0), (0, 1, 128, 2, 0, 4, 0), (0, 1, 64, 1, 0, 4, 0),
    (0, 0, 128, 0, 1, 4, 0), (1, 1, 128, 2, 1, 4, 0), (0, 0, 64, 0, 1, 6, 0), (0, 0, 128, 0, 0, 8, 0),
    (0, 0, 128, 0, 0, 4, 1), (0, 0, 64, 0, 0, 8, 1), (1, 1, 128, 2, 0, 4, 1)])
def test_cuda_twin_variants(monkeypatch, chains, pipe, d, steal, early, g, zquad):
    """The twin's A/B variants read every row as the reference does: CUDA_CHAINS = 1 (a
    page's score dots start from zero, its common part from two chains of dots),
    CUDA_PIPE = 1 (the next page's key dots beside this page's softmax and value dots;
    the rows' last pages are partial, so both page bodies run) and CUDA_STEAL (pages in
    chunks to whichever program asks: the partial page anywhere in a program's pages) and
    CUDA_EARLY (launched as the dependent of the kernel before it, on a Hopper); and the
    shipped twin at groups of 6 and 8 query heads (its merge sums a half of the heads at a
    time: a partial second half, a full one); CUDA_ZQUAD (the page's common score part
    from the key zero-points' words as loaded). Twice: the counters are left zero for the
    next call."""
    from vllm_kvcomp.triton_kernels import quant_decode

    spy = _Spy(monkeypatch, quant_decode)
    monkeypatch.setattr(quant_decode, "ENABLED", True)
    monkeypatch.setattr(quant_decode, "CUDA_CHAINS", chains)
    monkeypatch.setattr(quant_decode, "CUDA_PIPE", pipe)
    monkeypatch.setattr(quant_decode, "CUDA_STEAL", steal)
    monkeypatch.setattr(quant_decode, "CUDA_EARLY", early)
    monkeypatch.setattr(quant_decode, "CUDA_ZQUAD", zquad)
    if pipe:
        monkeypatch.setattr(quant_decode, "CUDA_MINB", 8)
    b = _decode_runs_batch(d, 2, g, 16, seed=5, scale_runs=3)
    for _ in range(2):
        _check_batch(b, stats=False)
        assert not quant_decode.counter(b.q.device, 1).any()
    assert spy.kinds == ["cuda", "cuda"]


def test_decode_quantized_runs_with_the_backends_statistics(monkeypatch):
    """The backend's decode call: statistics always on, per-row flags, ``stats_tags=False``
    (only rows without quantized pages vote or gather mass). The run's launch still takes
    the quantized rows, and the voting rows' mass and votes come from the merged LSE."""
    from vllm_kvcomp.triton_kernels import quant_decode

    spy = _Spy(monkeypatch, quant_decode)
    monkeypatch.setattr(quant_decode, "ENABLED", True)
    b = _decode_runs_batch(64, 2, 4, 16, seed=11)
    voting = [i for i, r in enumerate(b.reqs) if r.plan is None or not any(r.plan)]
    assert voting and len(voting) < len(b.reqs)
    flags = torch.tensor([1 if i in voting else 0 for i in range(len(b.reqs))], dtype=torch.int32, device=DEV)
    nb, hkv, bs = b.kv.shape[:3]
    mass = torch.zeros(nb, hkv, bs, device=DEV)
    obs = torch.zeros(nb, hkv, bs, device=DEV)
    out = torch.full_like(b.q, float("nan"))
    scale = b.q.shape[-1] ** -0.5
    paged_attention_batched(*b.args(), scale, page_tag=b.page_tag, out=out, mass_cache=mass, obs_cache=obs,
                            obs_queries=flags, mass_rows=flags, stats_tags=False)
    assert spy.launches == 1
    qsl = b.qsl.tolist()
    for i, r in enumerate(b.reqs):
        row = b.block_table[i]
        o, m, ob = quant.paged_attention_mixed(b.q[qsl[i]:qsl[i + 1]], b.kv, b.page_tag, row, r.kept,
                                               r.live_start, r.seq_len, scale, True, int(flags[i]))
        assert rel_err(out[qsl[i]:qsl[i + 1]], o) < TOL[torch.bfloat16], i
        if i in voting:
            blk, slot = quant.key_slots(b.kv, b.page_tag, row, r.kept, r.live_start, r.seq_len)
            assert rel_err(mass[blk, :, slot].t(), m) < STAT_TOL[False], i
            assert rel_err(obs[blk, :, slot].t(), ob) < STAT_TOL[False], i


def test_quantized_run_launch_takes_what_it_can_read(monkeypatch):
    """quant_decode takes bf16/fp16 caches whose planes are >= 16 channels and whose pages
    fit one tile read in-page; everything else stays in the fused forward."""
    from vllm_kvcomp.triton_kernels import quant_decode

    monkeypatch.setattr(quant_decode, "ENABLED", True)
    assert quant_decode.supported(128, 16, torch.bfloat16, (8, 4, 2))
    assert quant_decode.supported(64, 16, torch.float16, (2,))
    assert not quant_decode.supported(128, 16, torch.float32, (4,))       # fp32 cache
    assert not quant_decode.supported(32, 16, torch.bfloat16, (2,))       # int2 plane of 8 channels
    assert not quant_decode.supported(128, 32, torch.bfloat16, (4, 2))    # int2 page of 233 tokens
    monkeypatch.setattr(quant_decode, "ENABLED", False)                   # VLLM_KVCOMP_QRUN=0
    assert not quant_decode.supported(128, 16, torch.bfloat16, (4,))


def test_cuda_twin_splits_follow_the_memorys_bandwidth(monkeypatch):
    """The twin's splits aim at programs that together could read 80% of the memory's peak
    at their own pace, within one wave; the choices measured best on the H100 (3.35 TB/s)
    and the H200 (4.9 TB/s) at 64 x 8192 and 16 x 32768 (docs/kernels.md). The launcher
    is a stand-in here (CPU); its GPU twin is every quantized decode test on the GPU."""
    from types import SimpleNamespace

    from vllm_kvcomp.triton_kernels import quant_decode as qd

    caps = {b: quant.page_capacity(b, 16, 128, 2) for b in (8, 4, 2)}
    launcher = SimpleNamespace(per_sm=12)  # programs an SM holds (occupancy API)
    monkeypatch.setattr(qd, "_cuda_if", lambda *a: launcher)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    q = torch.empty(1, 32, 128, dtype=torch.bfloat16)

    def splits(bw, bits, B, ctx):
        monkeypatch.setattr(qd, "peak_bandwidth", lambda device: bw)
        kind, n = qd.plan(q, D=128, BS=16, G=4, rows=B * 8, longest=ctx, caps=caps, page_bits=(bits,),
                          num_sms=132)
        assert kind == "cuda"
        return n

    assert splits(3.35e12, 4, 64, 8192) == 1          # H100: 1 split (2 and 3 measured slower)
    assert splits(3.35e12, 4, 16, 32768) == 4         # H100: 4 (8 and 12 slower)
    assert [splits(4.9e12, b, 64, 8192) for b in (8, 4, 2)] == [2, 2, 2]  # H200: 2 for every format
    assert splits(0.0, 4, 64, 8192) == 1              # no bandwidth from the driver: 4 programs per SM
    launcher.per_sm = 3
    assert splits(4.9e12, 2, 64, 8192) == 1           # never past one wave (132 x 3 < 2 x 512)
    monkeypatch.setattr(qd, "CUDA_PER_SM", 0)         # a sweep's fixed aim: all that fit
    launcher.per_sm = 12
    assert splits(4.9e12, 4, 16, 8192) == 12


def test_api_per_request_matches_reference():
    """The reference-signature entry points return reference-shaped outputs."""
    bs, d = 16, 32
    b = make_batch([Req(3, 100, live_start=64, kept=40)], hkv=2, g=2, d=d, bs=bs, dtype=torch.bfloat16,
                   device=DEV, seed=5)
    row = b.block_table[0]
    args = (b.q, b.kv, row, 40, 64, 100, 0.3, True, 2)
    got = api.paged_attention(*args)
    ref = reference.paged_attention(*args)
    for x, y in zip(got, ref):
        assert x.shape == y.shape and rel_err(x, y) < TOL[torch.bfloat16]
    bt = make_batch([Req(2, 150, live_start=128, plan=[4, 2])], hkv=2, g=2, d=d, bs=bs, dtype=torch.bfloat16,
                    device=DEV, seed=6, tags=True)
    r = bt.reqs[0]
    args = (bt.q, bt.kv, bt.page_tag, bt.block_table[0], r.kept, r.live_start, r.seq_len, 0.3, True, 1)
    for x, y in zip(api.paged_attention_mixed(*args), quant.paged_attention_mixed(*args)):
        assert x.shape == y.shape and rel_err(x, y) < TOL[torch.bfloat16]


def test_batched_cpu_twin_matches_kernel():
    """api's CPU fallback of the batched call (a loop over the reference) agrees with the kernel."""
    b = make_batch([Req(1, 150, live_start=128, plan=[4]), Req(4, 20, obs=2)], hkv=1, g=2, d=32, bs=16,
                   dtype=torch.float32, device=DEV, seed=9, tags=True)
    slots = max(quant.capacities(b.kv).values())
    outs = []
    for fn in (paged_attention_batched, api._batched_reference):
        mass = torch.zeros(b.kv.shape[0], 1, slots, device=DEV)
        obs = torch.zeros_like(mass)
        outs.append((fn(*b.args(), 0.25, page_tag=b.page_tag, mass_cache=mass, obs_cache=obs, obs_queries=b.obs),
                     mass, obs))
    for x, y in zip(*outs):
        assert rel_err(x, y) < 1e-4


def test_mass_rows_select_which_rows_accumulate():
    """One launch with per-row flags (what a captured CUDA graph runs): flagged rows get the
    reference mass, the others none at all; a row with votes but no flag gets only votes.
    The reference twin (api's CPU path) obeys the same flags."""
    # the last row votes with 3 of 150 queries (more than one query tile): only those are read
    b = make_batch([Req(1, 90, live_start=64, kept=32), Req(1, 70), Req(3, 50, obs=2), Req(150, 170, obs=3)],
                   hkv=2, g=2, d=32, bs=16, dtype=torch.float32, device=DEV, seed=11)
    flags = torch.tensor([0, 1, 0, 0], dtype=torch.int32, device=DEV)
    results = []
    for fn in (paged_attention_batched, api._batched_reference):
        mass = torch.zeros(b.kv.shape[0], 2, 16, device=DEV)
        obs = torch.zeros_like(mass)
        fn(*b.args(), 0.25, mass_cache=mass, obs_cache=obs, obs_queries=b.obs, mass_rows=flags)
        results.append((mass, obs))
        qsl = b.qsl.tolist()
        for i, r in enumerate(b.reqs):
            row = b.block_table[i]
            _, m, ob = reference.paged_attention(b.q[qsl[i]:qsl[i + 1]], b.kv, row, r.kept, r.live_start,
                                                 r.seq_len, 0.25, True, r.obs)
            blk, slot = quant.key_slots(b.kv, None, row, r.kept, r.live_start, r.seq_len)
            got = mass[blk, :, slot].t()
            if flags[i]:
                assert rel_err(got, m) < 1e-4
            else:
                assert got.abs().max() == 0, f"row {i} is not flagged but got mass"
            if r.obs:
                assert rel_err(obs[blk, :, slot].t(), ob) < 1e-4
    assert all(rel_err(x, y) < 1e-4 for x, y in zip(*results))


# ----------------------------------------------------------------------------- compaction
def _cands(kept, live_start, seq_len, device):
    return reference.request_key_positions(kept, live_start, seq_len, device)


def test_compact_full_matches_reference():
    bs, d, hkv = 16, 32, 2
    b = make_batch([Req(1, 120, live_start=80, kept=32)], hkv=hkv, g=1, d=d, bs=bs, dtype=torch.bfloat16,
                   device=DEV, seed=3, spare_blocks=4)
    row = b.block_table[0]
    row[2] = b.spare.pop()
    cand = _cands(32, 80, 120, DEV)
    g = torch.Generator().manual_seed(0)
    keep = torch.stack([torch.randperm(cand.numel(), generator=g)[:48].sort().values for _ in range(hkv)]).to(DEV)
    mass = torch.rand(b.kv.shape[0], hkv, bs, device=DEV)
    kv_ref, mass_ref = b.kv.clone(), mass.clone()
    reference.compact(kv_ref, mass_ref, row, cand, keep)
    tag = torch.full((b.kv.shape[0],), 4, dtype=torch.int8, device=DEV)
    api.compact(b.kv, mass, row, cand, keep, page_tag=tag)
    dst = row[:3].long()
    assert torch.equal(b.kv[dst], kv_ref[dst]) and torch.equal(mass[dst], mass_ref[dst])
    assert (tag[dst] == 0).all()


@pytest.mark.parametrize("bits,old_plan", [(4, [0, 2]), (2, [4, 8]), (8, [])])
def test_compact_mixed_matches_reference(bits, old_plan):
    """Old compacted region (mixed) + live tokens -> full pages + pages at ``bits``: same bytes,
    tags and mass as quant.compact_mixed, and the round trip within the stated bound."""
    bs, d, hkv = 16, 32, 2
    caps = quant.capacities(torch.empty(0, 1, bs, 2 * d, dtype=torch.bfloat16))
    old = sum(caps[t] for t in old_plan)
    live = -(-old // bs) * bs + bs if old_plan else 48
    seq = live + 150
    b = make_batch([Req(1, seq, live_start=live, plan=old_plan or None)], hkv=hkv, g=1, d=d, bs=bs,
                   dtype=torch.bfloat16, device=DEV, seed=bits, tags=True)
    r = b.reqs[0]
    row = b.block_table[0]
    for j in range(len(old_plan), live // bs):  # the allocator keeps real blocks for the new region
        row[j] = b.spare.pop()
    cand = _cands(r.kept, live, seq, DEV)
    n = cand.numel()
    g = torch.Generator().manual_seed(bits)
    n_full, n_quant = bs, min(n - bs, caps[bits] + 5)
    perm = [torch.randperm(n, generator=g) for _ in range(hkv)]
    keep_full = torch.stack([p[:n_full].sort().values for p in perm]).to(DEV)
    keep_quant = torch.stack([p[n_full:n_full + n_quant].sort().values for p in perm]).to(DEV)
    mass = torch.rand(b.kv.shape[0], hkv, max(caps.values()), device=DEV)
    want = quant.gather_kv(b.kv, b.page_tag, row, r.kept, cand)
    kv_ref, tag_ref, mass_ref = b.kv.clone(), b.page_tag.clone(), mass.clone()
    k_ref = quant.compact_mixed(kv_ref, mass_ref, tag_ref, row, r.kept, cand, keep_full, keep_quant, bits)
    k_got = tri_compact_mixed(b.kv, mass, b.page_tag, row, r.kept, cand, keep_full, keep_quant, bits)
    assert k_got == k_ref == n_full + n_quant
    n_pages = 1 + -(-n_quant // caps[bits])
    dst = row[:n_pages].long()
    assert torch.equal(b.page_tag[dst], tag_ref[dst])
    assert torch.equal(b.kv[dst].view(torch.uint8), kv_ref[dst].view(torch.uint8))
    assert torch.equal(mass[dst], mass_ref[dst])
    # round trip of the demoted tokens against the original values
    got = quant.gather_kv(b.kv, b.page_tag, row, k_got, torch.arange(n_full, k_got, device=DEV))
    src = want.gather(1, keep_quant[..., None].expand(-1, -1, 2 * d))
    qmax = (1 << bits) - 1
    for p0 in range(0, n_quant, caps[bits]):
        sl = slice(p0, p0 + caps[bits])
        ks, kg = src[:, sl, :d], got[:, sl, :d]
        kr = ks.amax(1, keepdim=True) - ks.amin(1, keepdim=True)
        assert ((ks - kg).abs() <= kr / (2 * qmax) * 1.001 + 2 ** -10 * ks.abs().amax(1, keepdim=True) + 1e-6).all()
        vs, vg = src[:, sl, d:], got[:, sl, d:]
        vr = vs.amax(2, keepdim=True) - vs.amin(2, keepdim=True)
        assert ((vs - vg).abs() <= vr / (2 * qmax) * 1.001 + 2 ** -10 * vs.abs().amax(2, keepdim=True) + 1e-6).all()


def test_compact_then_attend_mixed():
    """End to end: demote with the kernel, then attend over the result with the kernel."""
    bs, d, hkv = 16, 32, 2
    b = make_batch([Req(1, 200, live_start=160, kept=64)], hkv=hkv, g=2, d=d, bs=bs, dtype=torch.float16,
                   device=DEV, seed=11, tags=True)
    row = b.block_table[0]
    cand = _cands(64, 160, 200, DEV)[:-8]  # fold all but the last 8 tokens... of the old layout
    keep_full = torch.arange(0, 32, device=DEV).expand(hkv, -1)
    keep_quant = torch.arange(32, 96, device=DEV).expand(hkv, -1)
    kept = tri_compact_mixed(b.kv, None, b.page_tag, row, 64, cand, keep_full, keep_quant, 4)
    b.kept[0] = kept
    b.reqs[0].kept = kept
    _check_batch(b, stats=False)


# ----------------------------------------------------------------------------- GPU, realistic
@gpu_only
@pytest.mark.parametrize("d,g,bs", [(128, 4, 16), (128, 8, 32), (64, 1, 16), (256, 2, 64)])
def test_gpu_decode_realistic(d, g, bs):
    """CPU twin: test_decode."""
    gen = torch.Generator().manual_seed(d)
    reqs = []
    for i in range(24):
        seq = int(torch.randint(100, 4000, (1,), generator=gen))
        if i % 3 == 0:
            live = seq // bs // 2 * bs
            reqs.append(Req(1, seq, live_start=live, kept=min(live, 512 + i)))
        else:
            reqs.append(Req(1, seq))
    b = make_batch(reqs, hkv=8 if g < 8 else 4, g=g, d=d, bs=bs, dtype=torch.bfloat16, device=DEV, seed=d)
    _check_batch(b)


@gpu_only
def test_gpu_prefill_realistic():
    """CPU twin: test_prefill_varlen_chunked."""
    reqs = [Req(1024, 1024, obs=32), Req(512, 2048, obs=64), Req(1, 3000, live_start=2048, kept=512),
            Req(300, 1900, live_start=1024, kept=256, obs=16)]
    b = make_batch(reqs, hkv=8, g=4, d=128, bs=16, dtype=torch.bfloat16, device=DEV, seed=1)
    _check_batch(b)


@gpu_only
def test_gpu_mixed_realistic():
    """CPU twin: test_mixed_precision_pages."""
    reqs = []
    for i, plan in enumerate([[0] * 8 + [4] * 20, [2] * 30, [8] * 10 + [4] * 10, [0] * 4 + [2] * 10 + [4] * 3]):
        caps = sum(quant.page_capacity(t, 16, 128, 2) for t in plan)
        live = -(-caps // 16) * 16 + 64
        reqs.append(Req(1 if i % 2 else 17, live + 500, live_start=live, plan=plan, obs=1))
    b = make_batch(reqs, hkv=8, g=4, d=128, bs=16, dtype=torch.bfloat16, device=DEV, seed=2, tags=True)
    _check_batch(b)


@gpu_only
def test_gpu_decode_quantized_runs_realistic():
    """CPU twin: test_decode_quantized_runs_own_launch."""
    _check_batch(_decode_runs_batch(128, 8, 4, 16, seed=3, scale_runs=12), stats=False)


@gpu_only
def test_gpu_compaction_realistic():
    """CPU twin: test_compact_mixed_matches_reference."""
    bs, d, hkv = 16, 128, 8
    b = make_batch([Req(1, 4096, live_start=2048, plan=[0] * 16 + [4] * 10)], hkv=hkv, g=1, d=d, bs=bs,
                   dtype=torch.bfloat16, device=DEV, seed=4, tags=True)
    r = b.reqs[0]
    row = b.block_table[0]
    n_pages = 32 + -(-988 // quant.page_capacity(2, bs, d, 2))
    for j in range(len(r.plan), n_pages):  # the allocator keeps real blocks for the new region
        row[j] = b.spare.pop()
    cand = _cands(r.kept, r.live_start, 4000, DEV)
    g = torch.Generator().manual_seed(0)
    perm = [torch.randperm(cand.numel(), generator=g) for _ in range(hkv)]
    keep_full = torch.stack([p[:512].sort().values for p in perm]).to(DEV)
    keep_quant = torch.stack([p[512:1500].sort().values for p in perm]).to(DEV)
    kv_ref, tag_ref = b.kv.clone(), b.page_tag.clone()
    quant.compact_mixed(kv_ref, None, tag_ref, row, r.kept, cand, keep_full, keep_quant, 2)
    tri_compact_mixed(b.kv, None, b.page_tag, row, r.kept, cand, keep_full, keep_quant, 2)
    dst = row[:n_pages].long()
    assert torch.equal(b.page_tag[dst], tag_ref[dst])
    assert torch.equal(b.kv[dst].view(torch.uint8), kv_ref[dst].view(torch.uint8))


def test_tile_choice_guards_the_h100_workarounds():
    """GPU-only bugs guarded on the CPU (docs/kernels.md): the plane-wise quantized loop
    miscompiled at 64-128 query rows on the H100, so prefill tiles over tagged caches must
    read unpacked tiles; decode tiles keep the planes; the 128-register cap is for tagged
    decode with 16-token pages only (larger pages spill under it)."""
    from vllm_kvcomp.triton_kernels.paged_attention import _launch_consts

    def tiling(bs, has_tags, decode):
        return _launch_consts(128, bs, 4, torch.bfloat16, has_tags, (4,), decode, None)[2]

    bm, _, _, _, _, planes, cap, two = tiling(16, True, False)
    assert bm == 128 and planes is False and cap is None and two is True
    bm, _, _, _, _, planes, cap, two = tiling(16, True, True)
    assert bm == 16 and planes is True and cap == 128 and two is False
    assert tiling(32, True, True)[6] is None and tiling(16, False, True)[6] is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_write_kv_matches_reference(dtype):
    """The step's K/V store (one launch per layer): each token lands in its slot, its
    statistics slot is zeroed, padding tokens (slot -1) are written nowhere."""
    g = torch.Generator().manual_seed(3)
    nb, h, bs, d, t = 6, 2, 16, 32, 9
    kv = torch.randn(nb, h, bs, 2 * d, generator=g).to(dtype).to(DEV)
    mass = torch.rand(nb, h, bs, generator=g).to(DEV)
    obs = torch.rand(nb, h, bs, generator=g).to(DEV)
    key = torch.randn(t, h, d, generator=g).to(dtype).to(DEV)
    value = torch.randn(t, h, d, generator=g).to(dtype).to(DEV)
    slots = [17, 18, 40, 95, 3, -1, 64, 65, -1]
    want_kv, want_mass, want_obs = kv.clone(), mass.clone(), obs.clone()
    for i, s_ in enumerate(slots):
        if s_ >= 0:
            want_kv[s_ // bs, :, s_ % bs, :d], want_kv[s_ // bs, :, s_ % bs, d:] = key[i], value[i]
            want_mass[s_ // bs, :, s_ % bs] = 0
            want_obs[s_ // bs, :, s_ % bs] = 0
    api.write_kv(kv, key, value, torch.tensor(slots, device=DEV), mass, obs)
    assert torch.equal(kv, want_kv)
    assert torch.equal(mass, want_mass) and torch.equal(obs, want_obs)


@pytest.mark.parametrize("bits", [4, 2])
def test_compact_mixed_all_layers_and_rows_at_once(bits):
    """compact_mixed_layers (the backend's one call for a step's mikv rows in every layer)
    writes exactly the bytes and tags of quant.compact_mixed run layer by layer, row by row."""
    from vllm_kvcomp.triton_kernels.compaction import compact_mixed_layers

    L, nb, hkv, bs, d, G, n = 3, 40, 2, 16, 32, 2, 150
    g = torch.Generator().manual_seed(3)
    backing = torch.randn(L, nb, hkv, bs, 2 * d, generator=g).to(DEV)
    rows = (torch.randperm(nb - 1, generator=g)[:2 * 12] + 1).view(G, 12).int().to(DEV)
    full, quant_n = 32, 60
    order = torch.rand(L, G, hkv, n, generator=g).argsort(-1).to(DEV)
    keep_full = order[..., :full].sort(-1).values
    keep_quant = order[..., full:full + quant_n].sort(-1).values
    ref, tag_ref = backing.clone(), torch.zeros(nb, dtype=torch.int8, device=DEV)
    cand = torch.arange(n, device=DEV)
    for layer in range(L):
        for r in range(G):
            quant.compact_mixed(ref[layer], None, tag_ref, rows[r], 0, cand, keep_full[layer, r],
                                keep_quant[layer, r], bits)
    got, tag_got = backing.clone(), torch.zeros(nb, dtype=torch.int8, device=DEV)
    compact_mixed_layers(got, tag_got, rows, n, keep_full, keep_quant, bits)
    assert torch.equal(tag_got, tag_ref) and int((tag_got == bits).sum()) == G * -(-quant_n // quant.page_capacity(bits, bs, d, 4))
    used = torch.cat([rows[r, :4] for r in range(G)]).long()  # entries the compaction wrote
    assert torch.equal(got[:, used].view(torch.uint8), ref[:, used].view(torch.uint8))


def _layer_stack(L, nb, hkv, bs, d, g, strided):
    """Random ``[L, nb, H, bs, 2D]`` bf16 caches; ``strided``: layers interleaved with other
    data, as a view over vLLM's per-layer caches (the backend's stack) is."""
    if strided:
        base = torch.randn(nb, L + 1, hkv, bs, 2 * d, generator=g).to(torch.bfloat16).to(DEV)
        return base[:, :L].permute(1, 0, 2, 3, 4)
    return torch.randn(L, nb, hkv, bs, 2 * d, generator=g).to(torch.bfloat16).to(DEV)


@pytest.mark.parametrize("e,strided", [(32, False), (24, True)])
def test_fold_swap_matches_reference(e, strided):
    """The one-launch decode fold (api.fold_swap -> Triton) writes exactly what the PyTorch
    reference writes: KV, mass and position of every slot, for losers in any order, any
    mix of old and folded losers per head, layers as a strided view (the backend's stack)."""
    L, nb, hkv, bs, d, G, k0 = 2, 40, 3, 16, 32, 2, 40
    g = torch.Generator().manual_seed(e)
    n = k0 + e
    rows = (torch.randperm(nb - 1, generator=g)[:G * 8] + 1).view(G, 8)
    ls0 = torch.tensor([k0 + 7, k0 + 30])  # where each row's folded tokens start
    ar = torch.arange(n)
    cand = torch.where(ar < k0, ar, ls0[:, None] + ar - k0)
    cblk, coff = rows.gather(1, cand // bs).to(DEV), (cand % bs).to(DEV)
    lose = torch.empty(L, G, hkv, e, dtype=torch.long)
    for i in range(L * G * hkv):
        m = int(torch.randint(0, e + 1, (1,), generator=g))  # old losers = folded winners
        old = torch.randperm(k0, generator=g)[:m]
        folded = k0 + torch.randperm(e, generator=g)[:e - m]
        both = torch.cat([old, folded])
        lose.view(-1, e)[i] = both[torch.randperm(e, generator=g)]
    lose = lose.to(DEV)
    kv = _layer_stack(L, nb, hkv, bs, d, g, strided)
    mass = torch.rand(L, nb, hkv, bs, generator=g).to(DEV)
    pos = torch.randint(0, 1 << 20, (L, nb, hkv, bs), generator=g, dtype=torch.int32).to(DEV)
    kv_r, mass_r, pos_r = kv.clone(), mass.clone(), pos.clone()
    reference.fold_swap(kv_r, mass_r, pos_r, lose, cblk, coff, cand.to(DEV), k0)
    assert not torch.equal(kv_r, kv)  # the reference moved something
    api.fold_swap(kv, mass, pos, lose, cblk, coff, cand.to(DEV), k0)
    assert torch.equal(kv, kv_r) and torch.equal(mass, mass_r) and torch.equal(pos, pos_r)


@pytest.mark.parametrize("k0,d,with_pos,strided", [(0, 32, True, True), (0, 24, False, False), (40, 32, True, False)])
def test_place_matches_reference(k0, d, with_pos, strided):
    """The one-launch packing compaction (api.place -> Triton, no scratch copy) writes
    exactly what the PyTorch reference (gather to a copy, then scatter) writes: KV, mass
    and positions, for a prompt's candidates (``k0 = 0``) and a re-packing fold's (old
    compacted slots, then live tokens), winners that overlap their destinations in the
    same tile and across tiles, an odd head size (2D not a power of two), layers as a
    strided view."""
    L, nb, hkv, bs, G, n, cap = 2, 40, 3, 16, 2, 150, 70
    g = torch.Generator().manual_seed(k0 + d)
    rows = (torch.randperm(nb - 1, generator=g)[:G * 12] + 1).view(G, 12)
    ls0 = torch.tensor([k0 + 3, k0 + 21]) if k0 else torch.zeros(G, dtype=torch.long)
    ar = torch.arange(n)
    cand = torch.where(ar < k0, ar, ls0[:, None] + ar - k0)
    cblk, coff = rows.gather(1, cand // bs).to(DEV), (cand % bs).to(DEV)
    dpos = torch.arange(cap)
    dblk, doff = rows[:, dpos // bs][:, None, :].to(DEV), (dpos % bs)[None, None, :].to(DEV)
    keep = torch.stack([torch.cat([torch.arange(5), 5 + torch.randperm(n - 5, generator=g)[:cap - 5].sort().values])
                        for _ in range(L * G * hkv)]).view(L, G, hkv, cap).to(DEV)  # sinks in place
    kv = _layer_stack(L, nb, hkv, bs, d, g, strided)
    mass = torch.rand(L, nb, hkv, bs, generator=g).to(DEV)
    pos = torch.randint(0, 1 << 20, (L, nb, hkv, bs), generator=g, dtype=torch.int32).to(DEV) if with_pos else None
    kpos = (cand[None, :, None, :].expand(L, G, hkv, n).to(DEV).gather(3, keep) * 7) if with_pos else None
    kv_r, mass_r = kv.clone(), mass.clone()
    pos_r = pos.clone() if with_pos else None
    reference.place(kv_r, mass_r, pos_r, keep, cblk, coff, dblk, doff, kpos)
    assert not torch.equal(kv_r, kv)  # the reference moved something
    api.place(kv, mass, pos, keep, cblk, coff, dblk, doff, kpos)
    assert torch.equal(kv, kv_r) and torch.equal(mass, mass_r)
    assert not with_pos or torch.equal(pos, pos_r)


@pytest.mark.parametrize("policy_name", ["streaming", "h2o"])
def test_fold_evict_matches_the_policy_path(policy_name, monkeypatch):
    """The one-launch fold (api.fold_evict: scores, protection, losers, move, all in the
    kernel) leaves KV, mass and positions exactly as the policy's own path (ScoreContext ->
    policy.evict -> reference.fold_swap) does, fold after fold, for StreamingLLM (position)
    and H2O (mass), several rows, layers as a strided view."""
    from vllm_kvcomp import backend as kb
    from vllm_kvcomp.layout import Layout
    from vllm_kvcomp.policies import POLICIES

    L, hkv, bs, d, G, cap, fold = 2, 3, 16, 32, 2, 48, 32
    policy = POLICIES[policy_name](sinks=4, window=8)
    assert policy.fold_score
    per_req = (cap + 4 * fold) // bs + 2
    nb = G * per_req + 1
    g = torch.Generator().manual_seed(1)
    base = torch.randn(nb, L + 1, hkv, bs, 2 * d, generator=g).to(torch.bfloat16).to(DEV)
    kv0 = base[:, :L].permute(1, 0, 2, 3, 4)
    mass0 = torch.rand(L, nb, hkv, bs, generator=g).to(DEV)  # distinct values: no ties
    pos0 = torch.zeros(L, nb, hkv, bs, dtype=torch.int32, device=DEV)
    bt = (torch.randperm(nb - 1, generator=g)[:G * per_req] + 1).view(G, per_req).int().to(DEV)
    idx = torch.arange(G, device=DEV)
    incs = [torch.rand(L, nb, hkv, bs, generator=g).to(DEV) for _ in range(3)]  # decode keeps accumulating
    kernel_on, can = [False], api.can_fold_evict
    monkeypatch.setattr(api, "can_fold_evict", lambda *a: kernel_on[0] and can(*a))
    runs = {}
    for fused in (False, True):
        kv, mass, pos = kv0.clone(), mass0.clone(), pos0.clone()
        ls = cap + fold
        rows = [kb.RowStep(i, ls, Layout(0, 0), Layout(cap, ls), policy, 0) for i in range(G)]
        monkeypatch.setattr(api, "FORCE_TRITON", False)  # the prompt's packing: same for both
        kb.compact_group_layers(kv, mass, None, kb.make_group(policy, rows, bt, idx, torch.zeros(G, dtype=torch.long,
                                                              device=DEV), 0, ls, cap, bs), pos=pos)
        monkeypatch.setattr(api, "FORCE_TRITON", fused)
        kernel_on[0] = fused  # (on a GPU the backend takes the kernel whenever it can)
        for inc in incs:
            rows = [kb.RowStep(i, ls + fold, Layout(cap, ls), Layout(cap, ls + fold), policy, 0) for i in range(G)]
            grp = kb.make_group(policy, rows, bt, idx, torch.full((G,), ls, dtype=torch.long, device=DEV), cap,
                                fold, cap, bs)
            assert kb._fused_fold(grp, pos, kv) == fused
            kb.compact_group_layers(kv, mass, None, grp, pos=pos)
            mass += inc
            ls += fold
        runs[fused] = (kv, mass, pos)
    (kr, mr, pr), (kf, mf, pf) = runs[False], runs[True]
    assert torch.equal(kf, kr) and torch.equal(mf, mr) and torch.equal(pf, pr)
    assert not torch.equal(kr, kv0)


def test_fold_kernels_do_not_compile_per_row_count():
    """Regression from the H100 (docs/gpu.md "One launch per fold"): the number of rows
    folding in a step was a compile-time constant of the fold kernels, so serving compiled
    a variant per count (scoring + compaction 3.4% of the run instead of 0.47%).
    Compile-time parameters may only come from the model (heads, head dim), the fold's
    padded sizes and the policy."""
    import inspect

    from vllm_kvcomp.triton_kernels import compaction

    def constexprs(kernel):
        params = inspect.signature(kernel.fn).parameters
        return {name for name, p in params.items() if "constexpr" in str(p.annotation)}

    assert constexprs(compaction._fold_swap_kernel) == {"H", "E", "DD", "CH"}
    assert constexprs(compaction._fold_evict_kernel) == {"H", "E", "NP", "DD", "CH", "BY_MASS"}
    assert constexprs(compaction._place_kernel) == {"H", "B", "DD", "DP", "HAS_POS"}


@pytest.mark.parametrize("splits", [None, 3])
def test_forward_arriving_last_merges_the_runs_partials(splits, monkeypatch):
    """On a Hopper the CUDA twin runs first and the forward beside it (quant_decode.PDL):
    every program of a row counts itself, and the last -- of either kernel -- merges all
    partials. On the GPU the twin, which reads the long run, is nearly always last; here
    the forward is made last: the run's partials come from the Triton kernel, with each
    row's count already at the run's splits, so the forward's own merge (_merge_rows)
    writes every output, which must match the reference, and leaves the counts at zero."""
    from vllm_kvcomp.triton_kernels import quant_decode

    monkeypatch.setattr(quant_decode, "ENABLED", True)
    monkeypatch.setattr(quant_decode, "pdl", lambda q: True)
    plan, launch = quant_decode.plan, quant_decode.launch
    monkeypatch.setattr(quant_decode, "plan", lambda q, **kw: ("cuda", plan(q, **kw)[1]))
    seen = []

    def twin(kind, qsplits, q, kv_cache, *a, nfwd, **kw):
        assert kind == "cuda" and nfwd >= 1
        launch("triton", qsplits, q, kv_cache, *a, **kw)  # partials only: no merge there
        n = (a[3].shape[0] - 1) * kv_cache.shape[1]      # rows x KV heads (a[3]: query_start_loc)
        cnt = quant_decode.counter(q.device, n)
        cnt[:n] = qsplits  # as if every program of the twin had counted itself
        seen.append((cnt, n))
        return True

    monkeypatch.setattr(quant_decode, "launch", twin)
    b = _decode_runs_batch(64, 2, 4, 16, seed=3)
    _check_batch(b, splits=splits, stats=False)
    (cnt, n), = seen
    assert int(cnt[:n].abs().sum()) == 0
