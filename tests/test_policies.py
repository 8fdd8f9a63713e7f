"""Every registered policy, one matrix (kvpress style)."""
import pytest
import torch
import yaml

from vllm_kvcomp.policies import POLICIES, ScoreContext
from vllm_kvcomp.spec import KVCompSpecError, parse_spec


@pytest.fixture
def duo_profile(tmp_path):
    """Layer 0: KV head 0 retrieval (high score), head 1 streaming."""
    path = tmp_path / "duo-test.yaml"
    path.write_text(yaml.safe_dump({"model": "test", "head_scores": [[0.9, 0.1], [0.8, 0.2]]}))
    return str(path)


def _make(name, duo_profile, **kw):
    if name == "duo":
        kw.setdefault("profile", duo_profile)
    return POLICIES[name](**kw)


def _ctx(n=64, h=2, d=8):
    g = torch.Generator().manual_seed(0)
    return ScoreContext(layer_idx=0, num_candidates=n, keys=torch.randn(h, n, d, generator=g),
                        attn_mass=torch.rand(h, n, generator=g), obs_attn=torch.rand(h, n, generator=g))


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_select_keeps_sinks_window_and_position_order(name, duo_profile):
    policy = _make(name, duo_profile, sinks=4, window=8)
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


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_select_with_capacity_equal_to_forced_and_to_all(name, duo_profile):
    policy = _make(name, duo_profile, sinks=4, window=8)
    assert policy.select(_ctx(), 12).tolist() == [list(range(4)) + list(range(56, 64))] * 2
    assert policy.select(_ctx(), 64).tolist() == [list(range(64))] * 2


def test_keydiff_keeps_the_outlier_key():
    ctx = _ctx(n=32, h=2, d=4)
    ctx.keys = torch.zeros(2, 32, 4)
    ctx.keys[:, :, 0] = 1.0
    ctx.keys[:, :, 1] = torch.linspace(0, 0.1, 32)  # all nearly parallel...
    ctx.keys[0, 11] = torch.tensor([0.0, 0.0, 1.0, 0.0])  # ...except one per head
    ctx.keys[1, 25] = torch.tensor([-1.0, 0.0, 0.0, 0.0])
    keep = POLICIES["keydiff"](sinks=0, window=0).select(ctx, 1)
    assert keep.tolist() == [[11], [25]]


def test_keydiff_ignores_key_norm():
    ctx = _ctx()
    scaled = _ctx()
    scaled.keys = ctx.keys * torch.linspace(0.1, 10, 64)[None, :, None]
    p = POLICIES["keydiff"]()
    assert torch.allclose(p.score(ctx), p.score(scaled), atol=1e-5)


def test_kvcrush_spends_alpha_of_free_slots_on_low_score_representatives():
    n = 64
    ctx = _ctx(n=n, h=3)
    votes = torch.zeros(3, n)
    votes[:, 10:18] = 1.0  # the important span: exactly the non-representative slots
    votes[0, 40:50] = 0.01  # a low-importance region with a distinct head signature
    ctx.obs_attn = votes
    base = POLICIES["kvcrush"](sinks=0, window=0, pool=1, alpha=0.0).select(ctx, 16)
    crush = POLICIES["kvcrush"](sinks=0, window=0, pool=1, alpha=0.5).select(ctx, 16)
    assert set(range(10, 18)) <= set(base[0].tolist())
    for row in crush.tolist():
        assert set(range(10, 18)) <= set(row)
        low = [i for i in row if not 10 <= i < 18]
        assert len(low) >= 8  # half of the 16 free slots are representatives
        assert any(40 <= i < 50 for i in low) and any(i < 10 or i >= 50 for i in low)  # both buckets
    reps = [set(r) - set(range(10, 18)) for r in crush.tolist()]
    assert reps[0] == reps[1] == reps[2]  # representatives are shared by every head


def test_kvcrush_buckets_by_hamming_distance():
    from vllm_kvcomp.policies.kvcrush import representatives, signatures

    scores = torch.tensor([[1.0, 0, 1, 0, 1, 0], [1.0, 0, 1, 0, 0, 1]])
    sig = signatures(scores)
    assert sig.tolist() == [[True, True], [False, False], [True, True], [False, False], [True, False],
                            [False, True]]
    picked = representatives(sig, torch.arange(6), 3)
    # 3 buckets around the majority signature: one pick from each
    kinds = {tuple(sig[i].tolist()) for i in picked.tolist()}
    assert len(picked) == 3 and len(kinds) == 3


def test_duo_splits_retrieval_and_streaming_heads(duo_profile):
    ctx = _ctx()
    ctx.obs_attn = torch.zeros(2, 64)
    ctx.obs_attn[:, 20:24] = 1.0
    keep = POLICIES["duo"](sinks=2, window=0, pool=1, profile=duo_profile, ratio=0.5).select(ctx, 6)
    assert keep[0].tolist() == [0, 1, 20, 21, 22, 23]  # retrieval head: the voted tokens
    assert keep[1].tolist() == [0, 1, 60, 61, 62, 63]  # streaming head: sinks + most recent
    ctx.layer_idx = 7  # a layer the profile does not cover: every head retrieves
    keep = POLICIES["duo"](sinks=2, window=0, pool=1, profile=duo_profile).select(ctx, 6)
    assert keep.tolist() == [[0, 1, 20, 21, 22, 23]] * 2


def test_duo_profile_in_spec(duo_profile):
    spec = parse_spec(f"duo:0.25,profile={duo_profile},ratio=0.25")
    assert spec.policy.name == "duo" and spec.policy.ratio == 0.25
    assert parse_spec(str(spec)) == spec
    with pytest.raises(KVCompSpecError, match="profile"):
        parse_spec("duo:0.25,profile=no-such-model")
    with pytest.raises(KVCompSpecError, match="profile"):
        parse_spec("duo:0.25")


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_shared_keeps_one_token_set_per_layer(name, duo_profile):
    keep = _make(name, duo_profile, sinks=2, window=4, shared=True).select(_ctx(h=3), 20)
    assert keep.shape == (3, 20) and keep[0].tolist() == keep[1].tolist() == keep[2].tolist()


def test_shared_snapkv_keeps_what_any_head_votes_for():
    ctx = _ctx(h=2)
    ctx.obs_attn = torch.full((2, 64), 0.01)
    ctx.obs_attn[0, 10], ctx.obs_attn[1, 40] = 1.0, 1.0  # each head votes for one token
    each = POLICIES["snapkv"](sinks=0, window=0, pool=1).select(ctx, 2)
    shared = POLICIES["snapkv"](sinks=0, window=0, pool=1, shared=True).select(ctx, 2)
    assert 40 not in each[0].tolist() and 10 not in each[1].tolist()
    assert shared.tolist() == [[10, 40], [10, 40]]


def test_mikv_keeps_the_best_full_demotes_the_next_drops_the_rest():
    ctx = _ctx()
    ctx.obs_attn = torch.zeros(2, 64)
    ctx.obs_attn[:, 10], ctx.obs_attn[:, 20], ctx.obs_attn[:, 30] = 3.0, 2.0, 1.0
    full, demoted = POLICIES["mikv"](sinks=1, window=1, pool=1).select_mixed(ctx, 3, 2)
    assert full.tolist() == [[0, 10, 63]] * 2  # sink, window, the best voted token
    assert demoted.tolist() == [[20, 30]] * 2  # the next two, in position order
    with pytest.raises(Exception, match="8, 4 or 2"):
        parse_spec("mikv:0.25,bits=3")


def test_cake_gives_broad_layers_more_budget_within_bounds():
    """Layer budgets follow the entropy of each layer's votes: a layer whose window
    attends everywhere keeps more than one that attends to a few tokens; budgets sum to
    the average budget x layers and stay within [sinks + window, capacity]."""
    n, cap = 512, 256
    votes = torch.zeros(3, 2, 2, n)  # [L, R, H, n]
    votes[0] = 1.0  # layer 0: uniform (max entropy)
    votes[1, :, :, ::8] = 1.0  # layer 1: every 8th token
    votes[2, :, :, 100] = 1.0  # layer 2: one token
    votes[2, :, :, 200] = 0.5
    policy = POLICIES["cake"](max_scale=2.0)
    b = policy.layer_budgets(votes, cap)
    assert b.shape == (2, 3)
    for row in b.tolist():
        assert row[0] > row[1] > row[2]
        assert all(policy.min_tokens() <= x <= cap for x in row)
        assert abs(sum(row) - 3 * cap / 2.0) <= 3
    assert policy.capacity_scale() == 2.0


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_evict_is_the_complement_of_select(name, duo_profile):
    from vllm_kvcomp.policies.base import Policy

    policy = _make(name, duo_profile, sinks=4, window=8)
    if type(policy).select is not Policy.select and type(policy).evict is Policy.evict:
        assert policy.scores_need_order  # never folded in place, so evict() is never asked
        return
    ctx = _ctx()
    keep, lose = policy.select(ctx, 24), policy.evict(ctx, 40)
    for k, l in zip(keep.tolist(), lose.tolist()):
        assert sorted(k + l) == list(range(64))


@pytest.mark.parametrize("name", sorted(n for n in POLICIES if not POLICIES[n].scores_need_order))
def test_scores_follow_positions_not_candidate_order(name, duo_profile):
    """Candidates shuffled (as after folds in place) with ``positions`` saying where each
    token is: the same tokens are chosen."""
    policy = _make(name, duo_profile, sinks=4, window=8)
    ctx = _ctx()
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(5))
    shuffled = ScoreContext(layer_idx=0, num_candidates=64, keys=ctx.keys[:, perm],
                            attn_mass=ctx.attn_mass[:, perm], obs_attn=ctx.obs_attn[:, perm],
                            positions=perm.expand(2, 64))
    for a, b in zip(policy.select(ctx, 24).tolist(), policy.select(shuffled, 24).tolist()):
        assert sorted(a) == sorted(perm[b].tolist())
    for a, b in zip(policy.evict(ctx, 40).tolist(), policy.evict(shuffled, 40).tolist()):
        assert sorted(a) == sorted(perm[b].tolist())
