"""The PyTorch reference kernels against plain dense attention."""
import torch

from vllm_kvcomp.ops import reference as ref

torch.manual_seed(0)


def _cache(num_blocks=16, h=2, bs=8, d=16):
    return torch.zeros(num_blocks, h, bs, 2 * d)


def _fill(kv, block_row, n, h, d, bs):
    k, v = torch.randn(n, h, d), torch.randn(n, h, d)
    slots = ref.slots_for(block_row, torch.arange(n), bs)
    ref.write_kv(kv, k, v, slots)
    return k, v


def _dense(q, k, v, scale, q_pos, k_pos):
    # q [nq, Hq, D], k/v [n, Hkv, D]
    g = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.einsum("qhd,nhd->hqn", q, kk) * scale
    s = s.masked_fill(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
    p = s.softmax(-1)
    return torch.einsum("hqn,nhd->qhd", p, vv), p


def test_plain_paged_attention_matches_dense_with_gqa_and_scattered_blocks():
    h, hq, d, bs, n = 2, 6, 16, 8, 45
    kv = _cache(h=h, d=d, bs=bs)
    block_row = torch.tensor([7, 2, 11, 0, 5, 9, 3, 1])
    k, v = _fill(kv, block_row, n, h, d, bs)
    nq = 13
    q = torch.randn(nq, hq, d)
    out, mass, obs = ref.paged_attention(q, kv, block_row, 0, 0, n, 0.3, want_mass=True, obs_queries=4)
    want, p = _dense(q, k, v, 0.3, torch.arange(n - nq, n), torch.arange(n))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    g = hq // h
    torch.testing.assert_close(mass, p.view(h, g, nq, n).sum((1, 2)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(obs, p.view(h, g, nq, n)[:, :, -4:].sum((1, 2)), rtol=1e-5, atol=1e-5)
    assert torch.allclose(mass.sum(), torch.tensor(float(nq * hq)))


def test_compacted_layout_reads_kept_and_live_only():
    h, hq, d, bs, n = 2, 4, 16, 8, 40
    kv = _cache(h=h, d=d, bs=bs)
    block_row = torch.tensor([3, 1, 4, 6, 8, 10])
    k, v = _fill(kv, block_row, n, h, d, bs)
    cand = torch.arange(32)  # positions [0, 32) compete for 16 slots; live = [32, 40)
    keep = torch.stack([torch.arange(0, 32, 2), torch.arange(1, 32, 2)])  # per-head choice
    ref.compact(kv, None, block_row, cand, keep)
    # Poison the gap: a correct kernel never reads it.
    kv[block_row[2], :, :, :] = float("nan")
    kv[block_row[3], :, :, :] = float("nan")
    q = torch.randn(1, hq, d)
    out, _, _ = ref.paged_attention(q, kv, block_row, 16, 32, n, 0.25)
    assert torch.isfinite(out).all()
    for head in range(h):
        kept = keep[head].tolist() + list(range(32, 40))
        qh = q[:, head * 2:(head + 1) * 2]
        want, _ = _dense(qh, k[kept, head:head + 1], v[kept, head:head + 1], 0.25,
                         torch.tensor([n - 1]), torch.arange(len(kept)))
        torch.testing.assert_close(out[:, head * 2:(head + 1) * 2], want, rtol=1e-5, atol=1e-5)


def test_compaction_moves_statistics_with_tokens_and_write_resets_them():
    h, d, bs = 2, 8, 4
    kv = _cache(num_blocks=8, h=h, d=d, bs=bs)
    mass = torch.zeros(8, h, bs)
    block_row = torch.tensor([5, 6, 7, 1])
    _fill(kv, block_row, 16, h, d, bs)
    pos = torch.arange(16)
    ref.add_mass(mass, block_row, pos, torch.arange(32.0).view(h, 16))
    keys_before = ref.gather_keys(kv, block_row, pos)
    keep = torch.tensor([[1, 5, 9, 15], [0, 2, 4, 6]])
    ref.compact(kv, mass, block_row, pos, keep)
    got = ref.read_mass(mass, block_row, torch.arange(4))
    assert got.tolist() == [[1, 5, 9, 15], [16, 18, 20, 22]]
    after = ref.gather_keys(kv, block_row, torch.arange(4))
    torch.testing.assert_close(after[0], keys_before[0, [1, 5, 9, 15]])
    torch.testing.assert_close(after[1], keys_before[1, [0, 2, 4, 6]])
    ref.write_kv(kv, torch.zeros(1, h, d), torch.zeros(1, h, d), torch.tensor([5 * bs + 1]), mass)
    assert mass[5, :, 1].tolist() == [0.0, 0.0]
