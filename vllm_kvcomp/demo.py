"""Query a running vllm-kvcomp server: one long-context chat request with the server's
compression and the same request with the full cache (per-request override)."""
from __future__ import annotations

import argparse
import json
import time
import urllib.request

FILLER = ("The village sat at the edge of a quiet forest, and every morning the baker opened "
          "his shop before sunrise. Children walked to school along the river, counting ducks. ")


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


def _chat(url: str, content: str, xargs: dict | None) -> tuple[str, dict, float]:
    body = {"model": "smollm2", "messages": [{"role": "user", "content": content}],
            "max_tokens": 24, "temperature": 0}
    if xargs:
        body["vllm_xargs"] = xargs
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    t = time.time()
    with urllib.request.urlopen(req, timeout=300) as r:
        out = json.load(r)
    return out["choices"][0]["message"]["content"], out["usage"], time.time() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--spec", default="(server default)")
    args = ap.parse_args()
    wait_healthy(args.url)
    doc = FILLER * 12 + "Remember this: the secret password is BLUE-HERON-42. " + FILLER * 12
    question = doc + "\nWhat is the secret password? Answer with the password only."
    for label, xargs in ((f"compressed ({args.spec})", None), ("full cache (override: none)",
                                                                {"kv_compression": "none"})):
        text, usage, secs = _chat(args.url, question, xargs)
        print(f"[{label}] prompt {usage['prompt_tokens']} tokens, {secs:.1f}s -> {text!r}")


if __name__ == "__main__":
    main()
