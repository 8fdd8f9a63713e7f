"""Layer budgets (PyramidKV): each layer fills its share of the request's slots; the
request holds the largest layer's blocks in vLLM's pool."""
import math

import pytest

from conftest import BLOCK, Engine, prompt_ids
from vllm_kvcomp.layout import make_plan
from vllm_kvcomp.policies import POLICIES
from vllm_kvcomp.spec import parse_spec


@pytest.mark.parametrize("beta", [1.0, 4.0, 20.0])
def test_pyramid_shape(beta):
    p = POLICIES["pyramidkv"](beta=beta)
    cap, layers = 1000, 30
    keep = [p.layer_capacity(i, layers, cap) for i in range(layers)]
    assert keep[0] == cap and all(a >= b for a, b in zip(keep, keep[1:]))
    assert keep[-1] == max(p.min_tokens(), int(cap / (2 * beta - 1)))
    # the average over layers is the spec's budget: capacity / capacity_scale
    assert sum(keep) / layers == pytest.approx(cap / p.capacity_scale(), rel=0.02)
    assert POLICIES["pyramidkv"](beta=beta).layer_capacity(0, 1, cap) == cap


def test_pyramid_plan_holds_largest_layer():
    n = 2000
    snap = make_plan(parse_spec("snapkv:0.25"), n, BLOCK).capacity
    pyr = make_plan(parse_spec("pyramidkv:0.25"), n, BLOCK).capacity
    assert pyr == (int(500 * (2 - 1 / 20)) // BLOCK - 1) * BLOCK and pyr > snap


def test_pyramidkv_in_engine(tiny_model):
    """2000-token prompt, 2 layers: blocks held = the plan's capacity + the live tail,
    decode runs over layer 1's smaller region, nothing leaks."""
    plan = make_plan(parse_spec("pyramidkv:0.25"), 2000, BLOCK)
    with Engine(tiny_model, "pyramidkv:0.25") as eng:
        start = eng.free_blocks()
        eng.add("r", prompt_ids(2000), max_tokens=40)
        held, tokens = [], []
        while eng.busy():
            for out in eng.step():
                tokens = out.outputs[0].token_ids
            held.append(start - eng.free_blocks())
        assert len(tokens) == 40
        assert held[0] >= 2000 // BLOCK
        live = plan.layout(2000)
        assert held[1] == plan.capacity // BLOCK + math.ceil((2001 - live.live_start) / BLOCK)
        assert eng.free_blocks() == start
