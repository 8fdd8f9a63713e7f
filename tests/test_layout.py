import pytest

from vllm_kvcomp.layout import PLAIN, make_plan
from vllm_kvcomp.spec import parse_spec

BS = 32


@pytest.mark.parametrize("text", ["h2o:0.25", "streaming:0.25", "snapkv:0.25", "h2o:512"])
def test_budget_is_respected_after_each_event(text):
    spec = parse_spec(text)
    plan = make_plan(spec, 2000, BS)
    budget = spec.budget.tokens(2000)
    assert plan.capacity % BS == 0 and plan.capacity >= spec.policy.min_tokens()
    assert plan.layout(1999) == PLAIN  # prefill not finished: nothing compressed
    lay = plan.layout(2000)
    assert lay.compressed and lay.kept == plan.capacity and lay.live_start == 2000 // BS * BS
    held_tokens = lay.kept + (2000 - lay.live_start)
    assert held_tokens <= budget


def test_recompressing_policy_stays_flat_and_prompt_only_grows():
    h2o = make_plan(parse_spec("h2o:0.25"), 2000, BS)
    snap = make_plan(parse_spec("snapkv:0.25"), 2000, BS)
    for t in range(2000, 2400):
        lay = h2o.layout(t)
        assert lay.kept + (t - lay.live_start) < lay.kept + BS  # live tail < one block
        assert snap.layout(t).live_start == 2000 // BS * BS  # prompt folded once


def test_layout_is_monotone_and_frees_a_growing_gap():
    plan = make_plan(parse_spec("streaming:0.1"), 3000, BS)
    prev = PLAIN
    for t in range(0, 3500, 7):
        lay = plan.layout(t)
        assert lay.live_start >= prev.live_start
        if lay.compressed:
            assert set(prev.blocks_freed(BS)) <= set(lay.blocks_freed(BS))
        prev = lay


def test_short_prompts_and_keep_all_never_compress():
    assert make_plan(parse_spec("h2o:0.25"), 60, BS).layout(60) == PLAIN
    assert make_plan(parse_spec("h2o:1.0"), 5000, BS).layout(5000) == PLAIN
    assert make_plan(None, 5000, BS).layout(5000) == PLAIN


@pytest.mark.parametrize("slack", [1, 4])
def test_slack_folds_every_slack_blocks_within_the_budget(slack):
    spec = parse_spec(f"h2o:0.25,slack={slack}")
    plan = make_plan(spec, 2000, BS)
    assert plan.capacity == (spec.budget.tokens(2000) // BS - slack) * BS
    events, prev = [], plan.layout(2000)
    for t in range(2001, 2600):
        lay = plan.layout(t)
        assert lay.kept + (t - lay.live_start) <= spec.budget.tokens(2000)  # budget holds
        assert t - lay.live_start < slack * BS + BS
        if lay != prev:
            events.append(t)
            assert lay.live_start - prev.live_start == slack * BS  # whole `slack` blocks folded
        prev = lay
    assert events and all(b - a == slack * BS for a, b in zip(events, events[1:]))


def test_slack_does_not_change_prompt_only_policies():
    assert make_plan(parse_spec("snapkv:0.25,slack=4"), 2000, BS) == make_plan(parse_spec("snapkv:0.25"), 2000, BS)


def _page_cap(bits):  # tokens per quantized page: bf16, head dim 128, 32-token blocks
    from vllm_kvcomp.ops.quant import page_capacity
    return page_capacity(bits, BS, 128, 2)


@pytest.mark.parametrize("text", ["mikv:0.25", "mikv:0.25,bits=2", "mikv:0.1,full=0.3", "mikv:512,bits=8"])
def test_demoting_plan_holds_its_memory_budget_and_keeps_more_tokens(text):
    """mikv's budget is blocks: full-precision pages + quantized pages (+ the live tail)
    never exceed it, and the quantized pages carry more tokens than evicting would keep."""
    spec = parse_spec(text)
    plan = make_plan(spec, 2000, BS, _page_cap)
    budget_blocks = spec.budget.tokens(2000) // BS
    lay = plan.layout(2000)
    assert lay.compressed and lay.live_start == 2000 // BS * BS
    full, demoted = plan.split(lay)
    assert full == plan.capacity and full % BS == 0 and full >= spec.policy.min_tokens()
    assert demoted > 0 and lay.kept == full + demoted <= lay.live_start
    assert lay.pages == full // BS + -(-demoted // _page_cap(spec.policy.bits))
    assert lay.pages + 1 <= budget_blocks  # compacted pages + the live tail's block
    assert lay.kept > budget_blocks * BS  # more tokens than an evicting policy's capacity
    assert list(lay.blocks_freed(BS)) == list(range(lay.pages, 2000 // BS))
    assert plan.layout(2500) == lay  # prompt only: decode grows the live region as usual


def test_demoting_plan_keeps_every_token_when_pages_suffice():
    plan = make_plan(parse_spec("mikv:0.25,bits=2,full=0.2"), 1000, BS, _page_cap)  # 2-bit pages: 7.3x
    lay = plan.layout(1000)
    assert lay.kept == lay.live_start == 992 and lay.pages < 992 // BS / 3


def test_demoting_plan_needs_the_cache_geometry():
    with pytest.raises(ValueError, match="geometry"):
        make_plan(parse_spec("mikv:0.25"), 2000, BS)
