"""Calibrate a DuoAttention head profile: which KV heads retrieve from far back.

Cheap stand-in for DuoAttention's gate optimisation: run the model (HF transformers,
eager attention, CPU) on a few passkey prompts of the built-in suite and measure, per
layer and KV head (its query heads averaged), the attention mass that the prompt's last
``--queries`` tokens (the question and the answer prefix) put on the needle's tokens.
Heads that find the needle are retrieval heads; the rest behave like streaming heads
(sinks + recent). The profile stores the raw scores; ``duo:...,ratio=R`` makes the
top ``R`` of them retrieval heads.

    python -m vllm_kvcomp.accuracy.calibrate_duo --out configs/duo-smollm2.yaml
    python -m vllm_kvcomp.accuracy.calibrate_duo --model DIR --prompts 4 --length 1536 --out ...
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

import yaml


def needle_token_span(tok, text: str, needle: str) -> tuple[int, int]:
    start = text.index(needle)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    idx = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > start and a < start + len(needle)]
    return idx[0], idx[-1] + 1


def calibrate(model_dir: str, prompts: int, length: int, queries: int, seed: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_kvcomp.accuracy.suite import DEPTHS, Tok, make_passkey

    tk = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    cfg = model.config
    n_layers, hq = cfg.num_hidden_layers, cfg.num_attention_heads
    hkv = getattr(cfg, "num_key_value_heads", hq)
    g = hq // hkv
    scores = torch.zeros(n_layers, hkv, dtype=torch.float64)
    span = {}

    def hook(layer):
        def fn(module, args, output):
            w = output[1]  # [1, Hq, n, n]
            a, b = span["needle"]
            m = w[0, :, -queries:, a:b].sum(dim=-1).mean(dim=-1)  # [Hq]
            scores[layer] += m.view(hkv, g).mean(dim=-1).double()
            return (output[0], None) + tuple(output[2:])
        return fn

    layers = model.model.layers
    handles = [layers[i].self_attn.register_forward_hook(hook(i)) for i in range(n_layers)]
    tok = Tok(tk)
    try:
        for i in range(prompts):
            case = make_passkey(tok, random.Random(f"duo/{seed}/{i}"), length, DEPTHS[i % len(DEPTHS)])
            span["needle"] = needle_token_span(tk, case["prompt"], case["needle"])
            ids = torch.tensor([tk.encode(case["prompt"], add_special_tokens=False)])
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    scores /= prompts
    return dict(model=os.path.basename(os.path.normpath(model_dir)), num_layers=n_layers,
                num_kv_heads=hkv, method=f"mean attention mass of the last {queries} prompt tokens "
                f"on the needle, {prompts} passkey prompts of ~{length} tokens (HF eager, fp32)",
                head_scores=[[round(float(x), 5) for x in row] for row in scores])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="HF folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--out", required=True, help="YAML to write, e.g. configs/duo-smollm2.yaml")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--length", type=int, default=1536)
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = a.model
    if model is None:
        from vllm_kvcomp.models import ensure_smollm2
        model = ensure_smollm2()
    t = time.time()
    prof = calibrate(model, a.prompts, a.length, a.queries, a.seed)
    header = ("# DuoAttention head profile (vllm_kvcomp.accuracy.calibrate_duo): one score per layer\n"
              "# and KV head; spec duo:BUDGET,profile=NAME,ratio=R makes the top R retrieval heads.\n"
              f"# Command: python -m vllm_kvcomp.accuracy.calibrate_duo {' '.join(argv or sys.argv[1:])}\n")
    with open(a.out, "w") as f:
        f.write(header + yaml.safe_dump(prof, sort_keys=False, default_flow_style=None, width=100))
    print(f"{a.out}: {prof['num_layers']} layers x {prof['num_kv_heads']} KV heads in {time.time() - t:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
