"""Every registered policy, one matrix (kvpress style)."""
import pytest
import torch

from vllm_kvcomp.policies import POLICIES, ScoreContext


def _ctx(n=64, h=2, d=8):
    g = torch.Generator().manual_seed(0)
    return ScoreContext(layer_idx=0, num_candidates=n, keys=torch.randn(h, n, d, generator=g),
                        attn_mass=torch.rand(h, n, generator=g), obs_attn=torch.rand(h, n, generator=g))


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_select_keeps_sinks_window_and_position_order(name):
    policy = POLICIES[name](sinks=4, window=8)
    keep = policy.select(_ctx(), 24)
    assert keep.shape == (2, 24)
    for row in keep.tolist():
        assert row == sorted(row) and len(set(row)) == 24
        assert set(range(4)) <= set(row) and set(range(56, 64)) <= set(row)


def test_h2o_keeps_heavy_hitters():
    ctx = _ctx()
    ctx.attn_mass = torch.zeros(2, 64)
    ctx.attn_mass[0, 20], ctx.attn_mass[1, 33] = 5.0, 7.0
    keep = POLICIES["h2o"](sinks=0, window=0).select(ctx, 1)
    assert keep.tolist() == [[20], [33]]


def test_streaming_keeps_the_most_recent():
    keep = POLICIES["streaming"](sinks=2, window=0).select(_ctx(), 6)
    assert keep.tolist() == [[0, 1, 60, 61, 62, 63]] * 2


def test_snapkv_pools_votes_onto_neighbours():
    ctx = _ctx()
    ctx.obs_attn = torch.zeros(2, 64)
    ctx.obs_attn[:, 30] = 1.0
    keep = POLICIES["snapkv"](sinks=0, window=0, pool=5).select(ctx, 5)
    assert keep.tolist() == [[28, 29, 30, 31, 32]] * 2
