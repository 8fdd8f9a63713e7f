"""Query a running vllm-kvcomp server: one long-context request with the server's
compression and the same request with the full cache (per-request override).

The request is a pass-key retrieval from the accuracy suite (a 5-digit key hidden in
the middle of ~2k tokens of Newton's *Opticks*, docs/accuracy.md): a task the embedded
SmolLM2-135M answers with the full cache, so the two answers can be compared.
"""
from __future__ import annotations

import argparse
import json
import random
import time
import urllib.request

from vllm_kvcomp.accuracy.scoring import score_generation


def wait_healthy(url: str, timeout: float = 300, alive=lambda: True) -> None:
    """Block until ``url``/health answers 200; ``alive()`` false aborts (server died)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not alive():
            raise RuntimeError(f"server at {url} exited before becoming healthy")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"server at {url} did not become healthy in {timeout:.0f}s")


def passkey_case(model_dir: str, length: int = 2048) -> dict:
    """The suite's pass-key case: chat-templated prompt (ending in "The pass key is:")
    and its answer, built with the served model's own tokenizer."""
    from transformers import AutoTokenizer

    from vllm_kvcomp.accuracy.suite import Tok, make_passkey

    tok = Tok(AutoTokenizer.from_pretrained(model_dir))
    return make_passkey(tok, random.Random("demo/0"), length, 0.5)


def _complete(url: str, model: str, prompt: str, max_tokens: int, xargs: dict | None) -> tuple[str, dict, float]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    if xargs:
        body["vllm_xargs"] = xargs
    req = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    t = time.time()
    with urllib.request.urlopen(req, timeout=300) as r:
        out = json.load(r)
    return out["choices"][0]["text"], out["usage"], time.time() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", required=True, help="the served model's folder (for its tokenizer)")
    ap.add_argument("--served-model-name", default="smollm2")
    ap.add_argument("--spec", default="(server default)")
    ap.add_argument("--length", type=int, default=2048, help="prompt tokens")
    args = ap.parse_args(argv)
    case = passkey_case(args.model, args.length)
    wait_healthy(args.url)
    print(f"[demo] pass key {case['answer']} hidden halfway through a {case['length']}-token prompt")
    for label, xargs in ((f"compressed ({args.spec})", None), ("full cache (override: none)",
                                                                {"kv_compression": "none"})):
        text, usage, secs = _complete(args.url, args.served_model_name, case["prompt"],
                                      case["max_tokens"], xargs)
        found = "found" if score_generation(case, text) else "NOT found"  # the suite's scorer
        print(f"[{label}] prompt {usage['prompt_tokens']} tokens, {secs:.1f}s -> {text!r} ({found})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
