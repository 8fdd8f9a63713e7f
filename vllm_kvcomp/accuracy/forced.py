"""Teacher forcing through a vLLM v1 logits processor, to score a continuation *after*
the prompt's KV cache was compressed.

Why not ``prompt_logprobs``: compression happens when the prompt's prefill completes,
so every prompt logprob is computed over the full cache. Instead the context is the
prompt, and the continuation is *generated* with each next token forced to the text's
token: decode steps then attend over the compressed cache. With ``logprobs=0`` vLLM
returns the sampled (= forced) token's logprob, and its default ``logprobs_mode``
(``raw_logprobs``) computes it from the model's logits *before* logits processors run,
so it is the model's own probability of the true token.

Per request: ``SamplingParams(extra_args={"force_tokens": [ids...]}, max_tokens=len(ids),
logprobs=0, temperature=0, ignore_eos=True)``; requests without the key are untouched.
Pass the class to ``LLM(logits_processors=[ForceTokensLogitsProcessor])``.
"""
from __future__ import annotations

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

FORCE_KEY = "force_tokens"


class _Force:
    def __init__(self, ids: list[int]):
        self.ids = list(ids)

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        step = len(output_ids)
        if step < len(self.ids):
            tok = self.ids[step]
            keep = logits[tok].clone()
            logits.fill_(float("-inf"))
            logits[tok] = keep if torch.isfinite(keep) else 0.0
        return logits


class ForceTokensLogitsProcessor(AdapterLogitsProcessor):
    """Forces each request's ``extra_args["force_tokens"]``, one per decode step."""

    @classmethod
    def validate_params(cls, params: SamplingParams):
        ids = (params.extra_args or {}).get(FORCE_KEY)
        if ids is not None and not (isinstance(ids, list) and all(isinstance(t, int) for t in ids)):
            raise ValueError(f"extra_args[{FORCE_KEY!r}] must be a list of token ids")

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params: SamplingParams):
        ids = (params.extra_args or {}).get(FORCE_KEY)
        return _Force(ids) if ids else None
