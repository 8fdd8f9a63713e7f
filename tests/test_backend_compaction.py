"""Compaction batched over the requests of a step equals compacting them one at a time,
for every policy (stacked on dim 0 where the policy allows it, per request otherwise)."""
import pytest
import torch

from vllm_kvcomp.backend import KVCompImpl, RowStep, make_group
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
        impl = KVCompImpl(4, D, 0.2, H, None, None, "auto")
        impl._layer_idx = 3
        c = kv.clone()
        impl._stats["mass"] = mass.clone()
        for rs in groups:
            impl._compress(c, impl._stats["mass"], obs, _group(policy, rs, block_table, 64, 16, 64), 8)
        results.append((c, impl._stats["mass"]))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert not torch.equal(results[0][0], kv)  # something moved
