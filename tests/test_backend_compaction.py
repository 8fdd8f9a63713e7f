"""Compaction batched over the requests of a step equals compacting them one at a time,
for every policy (stacked on dim 0 where the policy allows it, per request otherwise)."""
import pytest
import torch

from vllm_kvcomp.backend import (RowStep, _layers_per_chunk, _strided_stack, compact_group, compact_group_layers,
                                 make_group)
from vllm_kvcomp.layout import Layout
from vllm_kvcomp.policies import POLICIES

BS, H, D, NB = 16, 2, 32, 40
EXTRA = {"duo": {"profile": "smollm2"}}


def _group(policy, rows, block_table, k0, d, cap):
    idx = torch.tensor([r.index for r in rows])
    ls0 = torch.tensor([r.old.live_start for r in rows])
    return make_group(policy, rows, block_table, idx, ls0, k0, d, cap, BS)


@pytest.mark.parametrize("name", sorted(POLICIES) + ["h2o+shared"])
def test_stacked_compaction_equals_one_at_a_time(name):
    base, _, shared = name.partition("+")
    policy = POLICIES[base](**EXTRA.get(base, {}), **({"shared": True} if shared else {}))
    g = torch.Generator().manual_seed(1)
    kv = torch.randn(NB, H, BS, 2 * D, generator=g)
    mass, obs = torch.rand(NB, H, BS, generator=g), torch.rand(NB, H, BS, generator=g)
    # Three requests, each with its own blocks: 64 compacted + one block folded in.
    block_table = (torch.randperm(NB - 1, generator=g)[:24] + 1).view(3, 8).int()  # disjoint, as in vLLM
    old, new = Layout(kept=64, live_start=96), Layout(kept=64, live_start=112)
    rows = [RowStep(i, 120, old, new, policy, 4 if "obs_attn" in policy.needs else 0) for i in range(3)]
    results = []
    for groups in ([rows], [[r] for r in rows]):
        c, m = kv.clone(), mass.clone()
        for rs in groups:
            compact_group(c, m, obs, _group(policy, rs, block_table, 64, 16, 64), 3, 8)
        results.append((c, m))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert not torch.equal(results[0][0], kv)  # something moved


def test_layer_views_stack_without_copy():
    backing = torch.randn(4, NB, H, BS, 2 * D)
    views = [backing[i] for i in range(4)]
    stacked = _strided_stack(views)
    assert stacked is not None and stacked.data_ptr() == backing.data_ptr() and torch.equal(stacked, backing)
    assert _strided_stack([views[0], views[2], views[1]]) is None  # not equally spaced
    assert _strided_stack([views[0], torch.randn(NB, H, BS, 2 * D)]) is None  # other storage


@pytest.mark.parametrize("name", sorted(n for n in POLICIES if POLICIES[n](**EXTRA.get(n, {})).can_stack_layers())
                         + ["snapkv+shared"])
def test_all_layers_at_once_equals_layer_by_layer(name):
    """compact_group_layers (every layer in one set of launches, only kept tokens gathered)
    moves exactly what compact_group does layer by layer, statistics included (shared:
    each request's heads averaged within its own rows of the stacked scores)."""
    base, _, shared = name.partition("+")
    policy = POLICIES[base](**EXTRA.get(base, {}), **({"shared": True} if shared else {}))
    L = 3
    g = torch.Generator().manual_seed(2)
    kv = torch.randn(L, NB, H, BS, 2 * D, generator=g)
    mass, obs = torch.rand(L, NB, H, BS, generator=g), torch.rand(L, NB, H, BS, generator=g)
    block_table = (torch.randperm(NB - 1, generator=g)[:24] + 1).view(3, 8).int()
    old, new = Layout(kept=64, live_start=96), Layout(kept=64, live_start=112)
    rows = [RowStep(i, 120, old, new, policy, 4 if "obs_attn" in policy.needs else 0) for i in range(3)]
    grp = _group(policy, rows, block_table, 64, 16, 64)
    k1, m1 = kv.clone(), mass.clone()
    for layer in range(L):
        compact_group(k1[layer], m1[layer], obs[layer], grp, layer, L)
    k2, m2 = kv.clone(), mass.clone()
    compact_group_layers(k2, m2, obs, grp)
    assert torch.equal(k1, k2) and torch.equal(m1, m2)
    assert not torch.equal(k1, kv)


@pytest.mark.parametrize("name", ["streaming", "h2o", "keydiff", "h2o+shared", "streaming+slack"])
def test_decode_folds_in_place_keep_what_repacking_keeps(name):
    """Decode folds of recompressing policies move only the folded tokens that win, into
    the slots of the old ones that lose (``pos`` records each slot's token). Fold after
    fold, every (layer, request, head) keeps the same tokens -- data and mass -- as
    re-packing the whole region in position order, and no more slots change than tokens
    were folded in."""
    base, _, opt = name.partition("+")
    kw = {"shared": True} if opt == "shared" else {}
    policy = POLICIES[base](sinks=4, window=8, **kw)
    d = 32 if opt == "slack" else 16  # tokens folded per event
    L, G, P, CAP = 2, 2, 96, 64
    g = torch.Generator().manual_seed(3)
    block_table = (torch.randperm(NB - 1, generator=g)[:2 * 16] + 1).view(G, 16).int()  # 256 tokens each
    kv = torch.randn(L, NB, H, BS, 2 * D, generator=g)
    mass = torch.rand(L, NB, H, BS, generator=g)

    def write(kv, mass, start, end):  # tokens [start, end) of both requests; dim 0 = position
        for r in range(G):
            for t in range(start, end):
                b, o = block_table[r, t // BS], t % BS
                kv[:, b, :, o, 0] = float(t)
                mass[:, b, :, o] = float((t * 7919 + r) % 1000) / 1000 + 0.5 * (t % 3)

    write(kv, mass, 0, P)
    packed = (kv.clone(), mass.clone())
    in_place = (kv.clone(), mass.clone(), torch.zeros(L, NB, H, BS, dtype=torch.int32))
    rows = lambda k0, ls0, d_: [RowStep(i, ls0 + d_, Layout(k0, ls0), Layout(CAP, ls0 + d_), policy, 0)
                                for i in range(G)]
    grp = _group(policy, rows(0, 0, P), block_table, 0, P, CAP)
    by_layer = tuple(t.clone() for t in in_place)  # the per-layer path (compact_group)

    def fold(grp):
        compact_group_layers(*packed, None, grp)
        compact_group_layers(in_place[0], in_place[1], None, grp, pos=in_place[2])
        for layer in range(L):
            compact_group(by_layer[0][layer], by_layer[1][layer], None, grp, layer, L, pos=by_layer[2][layer])
        assert all(torch.equal(a, b) for a, b in zip(in_place, by_layer))

    fold(grp)
    ls = P
    for _ in range(4):
        for k, m in (packed, in_place[:2], by_layer[:2]):
            write(k, m, ls, ls + d)
        before = in_place[0].clone()
        fold(_group(policy, rows(CAP, ls, d), block_table, CAP, d, CAP))
        ls += d
        blk, off = block_table[:, torch.arange(CAP) // BS].long(), torch.arange(CAP) % BS  # [G, CAP], [CAP]
        for layer in range(L):
            for r in range(G):
                a = packed[0][layer, blk[r], :, off]  # [CAP, H, 2D]
                b = in_place[0][layer, blk[r], :, off]
                p = in_place[2][layer, blk[r], :, off]  # [CAP, H]
                changed = (b != before[layer, blk[r], :, off]).any(-1).sum(0)
                assert (changed <= d).all(), changed
                for head in range(H):
                    assert torch.equal(p[:, head].float(), b[:, head, 0])  # pos says which token is where
                    order = p[:, head].argsort()
                    assert torch.equal(a[:, head, 0], a[:, head, 0].sort().values)  # packed: in order
                    assert torch.equal(a[:, head], b[order, head])
                    ma = packed[1][layer, blk[r], head, off]
                    mb = in_place[1][layer, blk[r], head, off]
                    assert torch.equal(ma, mb[order])
                    if base == "streaming":  # sinks + the most recent
                        assert p[:, head].sort().values.tolist() == [0, 1, 2, 3] + list(range(ls - CAP + 4, ls))


def test_layer_chunks_count_the_moving_path(monkeypatch):
    """An 8k -> 2k prompt compaction of a 32-layer, 8-KV-head model: the Triton moves keep
    only indices, so all layers go in one chunk; the reference's copies need more."""
    from types import SimpleNamespace

    from vllm_kvcomp.triton_kernels import api

    kv = torch.empty(32, 600, 8, 16, 256, dtype=torch.bfloat16, device="meta")
    grp = SimpleNamespace(cand_blk=torch.empty(1, 8192), cap=2048, k0=0,
                          policy=POLICIES["streaming"]())
    monkeypatch.setattr(api, "use_triton", lambda t: True)
    assert _layers_per_chunk(kv, grp, None) == 32
    monkeypatch.setattr(api, "use_triton", lambda t: False)
    assert _layers_per_chunk(kv, grp, None) < 32
