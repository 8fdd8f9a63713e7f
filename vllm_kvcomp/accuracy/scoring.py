"""Scores in [0, 1], one per (case, policy, budget).

* ``contains``: 1 if the answer string occurs in the prediction (case-insensitive,
  whitespace-normalised), else 0. The prompts end with an answer prefix ("The pass key
  is"), so the prediction is the answer itself plus whatever the model adds.
* ``recall``: the answer is a list; the share of its items found in the prediction,
  less one item for each of the case's ``decoy`` items found (clipped at 0), so listing
  every name in sight does not score.
* ``ppl``: ``score = exp(-NLL)``, NLL the mean negative log-likelihood per token of the
  continuation (= 1 / perplexity, the geometric mean probability of the true tokens).
  The report's "% of full" of this task is then score(policy) / score(full), i.e.
  exp(-(NLL_policy - NLL_full)) per case, averaged.
"""
from __future__ import annotations

import math
import re


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip().lower()


def contains(prediction: str, answer: str) -> float:
    return float(_norm(answer) in _norm(prediction))


def recall(prediction: str, answers: list[str], decoys: list[str] = ()) -> float:
    if not answers:
        return 1.0
    hits = sum(contains(prediction, a) for a in answers) - sum(contains(prediction, d) for d in decoys)
    return max(0.0, hits / len(answers))


def ppl_score(token_logprobs: list[float], skip_first: int = 1) -> tuple[float, float]:
    """(score, nll) of forced tokens' logprobs; the first ``skip_first`` are left out:
    they are predicted from the prefill's logits, before any compression happens."""
    lps = token_logprobs[skip_first:] if len(token_logprobs) > skip_first else token_logprobs
    nll = -sum(lps) / max(1, len(lps))
    return math.exp(-nll), nll


def score_generation(case: dict, prediction: str) -> float:
    kind = case.get("scoring") or ("recall" if isinstance(case["answer"], list) else "contains")
    if kind == "recall":
        return recall(prediction, list(case["answer"]), list(case.get("decoy") or []))
    if kind == "contains":
        return contains(prediction, str(case["answer"]))
    raise ValueError(f"scoring {kind!r} is not a generation score")
