"""Accuracy harness: suite generation, scoring, and a CI slice of the real harness (real
vLLM on CPU, tiny random model) end to end into a tmp dir, resumed once."""
from __future__ import annotations

import json
import math
import re

import pytest

from vllm_kvcomp.accuracy import scoring
from vllm_kvcomp.accuracy.forced import _Force
from vllm_kvcomp.accuracy.harness import grid, main, parse_policies
from vllm_kvcomp.accuracy.suite import SuiteConfig, Tok, generate_suite, insert_at, opticks_text


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    return Tok(AutoTokenizer.from_pretrained(tiny_model))


def test_haystack_is_the_installed_public_domain_book():
    text = opticks_text()
    assert "OPTICKS" not in text[:50] and "Light" in text and len(text) > 400_000
    assert "[Illustration" not in text and "_" not in text


def test_suite_is_deterministic_from_the_seed(tok):
    cfg = SuiteConfig(seed=3, cases_per_task=2, lengths=(400, 700))
    a, b = generate_suite(tok, cfg), generate_suite(tok, cfg)
    assert a == b and len(a) == 10
    c = generate_suite(tok, SuiteConfig(seed=4, cases_per_task=2, lengths=(400, 700)))
    assert [x["prompt"] for x in a] != [x["prompt"] for x in c]
    assert len({x["id"] for x in a}) == len(a)
    # Growing the suite leaves existing cases unchanged.
    more = generate_suite(tok, SuiteConfig(seed=3, cases_per_task=3, lengths=(400, 700)))
    assert all(x in more for x in a)


@pytest.mark.parametrize("task", ["passkey", "multikey", "vartrack", "qa", "ppl"])
def test_cases_have_the_stated_length_and_answer(tok, task):
    for case in generate_suite(tok, SuiteConfig(seed=0, cases_per_task=3, lengths=(1500, 2500), tasks=(task,))):
        target = int(case["id"].split("-")[3])
        if task == "ppl":  # the context; the last 128 tokens of the stretch are the continuation
            assert len(case["prompt_ids"]) == case["length"] == target - 128
        else:  # whole sentences of haystack: up to one sentence short (long ones in the tiny BPE)
            n = tok.count(case["prompt"])
            assert n == case["length"] and target - 300 <= n <= target, (n, target)
        if task == "ppl":
            assert len(case["answer_ids"]) == case["max_tokens"] == 128
        elif task == "vartrack":
            assert all(f"VAR {v}" in case["prompt"] for v in case["answer"])
        else:
            assert case["answer"] in case["prompt"]


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_passkey_sits_at_the_stated_depth(tok, depth):
    from random import Random

    from vllm_kvcomp.accuracy.suite import make_passkey

    case = make_passkey(tok, Random(1), 3000, depth)
    body = case["prompt"].split("I will quiz you about the pass key.")[1].split("What is the pass key?")[0]
    at = body.index(case["needle"]) / len(body)
    assert abs(at - depth) < 0.06, (at, depth)  # sentence granularity


def test_insert_at_places_items_by_fraction():
    assert insert_at(["a", "b", "c", "d"], [(0.5, "X"), (0.0, "S"), (1.0, "E")]) == "S a b X c d E"


def test_scores():
    assert scoring.contains(" 48213. Remember", "48213") == 1.0
    assert scoring.contains("4821", "48213") == 0.0
    assert scoring.contains(" Oakridge and", "oakridge") == 1.0
    assert scoring.recall("VAR AB, VAR CD", ["AB", "CD", "EF"]) == pytest.approx(2 / 3)
    assert scoring.recall("AB CD XY", ["AB", "CD"], decoys=["XY"]) == pytest.approx(0.5)
    assert scoring.recall("XY ZZ", ["AB"], decoys=["XY", "ZZ"]) == 0.0
    s, nll = scoring.ppl_score([-9.0, -1.0, -3.0])  # the first (prefill) token is left out
    assert nll == pytest.approx(2.0) and s == pytest.approx(math.exp(-2.0))
    assert scoring.score_generation({"answer": ["A", "B"], "scoring": "recall"}, "A") == 0.5


def test_force_tokens_masks_everything_but_the_next_forced_token():
    import torch

    f = _Force([3, 1])
    logits = torch.tensor([0.0, 2.0, 5.0, -1.0])
    out = f([], logits.clone())
    assert int(out.argmax()) == 3 and out[3] == -1.0 and torch.isinf(out[:3]).all()
    assert int(f([3], logits.clone()).argmax()) == 1
    assert torch.equal(f([3, 1], logits.clone()), logits)  # past the forced tokens: untouched


def test_policy_and_budget_grid():
    assert parse_policies(["streaming,snapkv", "duo,profile=smollm2,ratio=0.25"]) == [
        ("streaming", ""), ("snapkv", ""), ("duo", "profile=smollm2,ratio=0.25")]
    g = grid([("h2o", ""), ("duo", "profile=smollm2")], [1.0, 0.25])
    assert [(c["policy"], c["budget"], c["spec"]) for c in g] == [
        ("full", 1.0, None), ("h2o", 0.25, "h2o:0.25"), ("duo[profile=smollm2]", 0.25, "duo:0.25,profile=smollm2")]
    with pytest.raises(Exception, match="unknown policy"):
        grid([("nope", "")], [0.5])


def test_harness_end_to_end_and_resume(tiny_model, tmp_path):
    """The CI slice: 2 tasks (one generated, one forced-decoding perplexity), 1 case each,
    full cache + 2 policies at 0.25, through one real engine; then resumed."""
    out = tmp_path / "acc"
    args = ["run", "--model", tiny_model, "--output", str(out), "--tasks", "passkey", "ppl",
            "--cases-per-task", "1", "--lengths", "700", "--policies", "streaming", "snapkv",
            "--budgets", "1.0", "0.25"]
    assert main(args) == 0
    recs = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert len(recs) == 2 * 3
    assert {(r["task"], r["policy"], r["budget"]) for r in recs} == {
        (t, p, b) for t in ("passkey", "ppl") for p, b in (("full", 1.0), ("streaming", 0.25), ("snapkv", 0.25))}
    for r in recs:
        assert {"case_id", "task", "policy", "budget", "score", "prediction", "spec", "kv_blocks",
                "prompt_blocks", "length"} <= set(r)
        assert 0.0 <= r["score"] <= 1.0
        if r["budget"] < 1:  # the per-request override really freed blocks in vLLM's pool
            decode = 0 if r["policy"] == "streaming" or r["task"] != "ppl" else 128 // 32  # snapkv grows
            assert r["kv_blocks"] <= math.ceil(0.25 * r["prompt_blocks"]) + 2 + decode, r
        else:
            assert r["kv_blocks"] >= r["prompt_blocks"], r
        if r["task"] == "ppl":
            assert r["score"] > 0 and math.isfinite(r["nll"]) and re.match(r"nll=\d", r["prediction"])
    meta = json.loads((out / "meta.json").read_text())
    check = meta["runs"][0]["override_check"]
    assert check["override"] < check["full"]
    before = (out / "results.jsonl").read_text()
    assert main(args) == 0  # resumed: nothing left to run, nothing added
    assert (out / "results.jsonl").read_text() == before

    pytest.importorskip("matplotlib")
    from vllm_kvcomp.accuracy.report import write_report

    docs = tmp_path / "docs"
    write_report(str(out), str(docs))
    md = (docs / "accuracy.md").read_text()
    assert "### passkey" in md and "### ppl" in md and "streaming" in md and (docs / "accuracy.png").exists()
    # hand-written summary and notes land before this run's targets and at the end
    (docs / "accuracy_headline.md").write_text("## Headline\n\nACROSS RUNS\n")
    (docs / "accuracy_notes.md").write_text("## Notes\n\nMETHOD\n")
    write_report(str(out), str(docs))
    md = (docs / "accuracy.md").read_text()
    assert md.index("ACROSS RUNS") < md.index("## Against the targets") < md.index("### ppl") < md.index("METHOD")


def test_suite_command_writes_the_dataset_format(tiny_model, tok, tmp_path):
    from vllm_kvcomp.accuracy.harness import load_dataset

    out = tmp_path / "suite.jsonl"
    assert main(["suite", "--model", tiny_model, "--out", str(out), "--tasks", "passkey", "qa",
                 "--cases-per-task", "2", "--lengths", "800"]) == 0
    written = [json.loads(l) for l in out.read_text().splitlines()]
    back = load_dataset(str(out), tok.tk, chat=False)
    assert len(back) == 4 and [c["prompt"] for c in back] == [c["prompt"] for c in written]
    assert [c["id"] for c in back] == [c["id"] for c in written] and all(c["scoring"] == "contains" for c in back)
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"prompt": "Say hi", "answer": "hi", "task": "t", "extra": 1}) + "\n")
    (case,) = load_dataset(str(plain), tok.tk, chat=True)
    assert case["prompt"].endswith("\n") and "Say hi" in case["prompt"] and case["id"] == "t-00000"


def test_forced_decoding_logprobs_equal_prompt_logprobs_with_the_full_cache(tiny_model):
    """The perplexity task's measurement: with nothing evicted, the raw logprobs of forced
    decode steps are the model's logprobs of the continuation given the text."""
    from conftest import Engine, prompt_ids
    from vllm import SamplingParams

    from vllm_kvcomp.accuracy.forced import ForceTokensLogitsProcessor

    ctx, cont = prompt_ids(300, 1), prompt_ids(40, 2)
    with Engine(tiny_model, "streaming:1.0", logits_processors=[ForceTokensLogitsProcessor]) as eng:
        forced = eng.llm.generate([{"prompt_token_ids": ctx}], SamplingParams(
            max_tokens=len(cont), temperature=0, ignore_eos=True, logprobs=0,
            extra_args={"force_tokens": cont}), use_tqdm=False)[0].outputs[0]
        whole = eng.llm.generate([{"prompt_token_ids": ctx + cont}], SamplingParams(
            max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    assert list(forced.token_ids) == cont  # random weights would never pick these greedily
    got = [lp[t].logprob for lp, t in zip(forced.logprobs, cont)]
    want = [d[t].logprob for d, t in zip(whole.prompt_logprobs[len(ctx):], cont)]
    assert got == pytest.approx(want, abs=1e-3)
