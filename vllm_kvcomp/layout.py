"""Which tokens of a request live where -- a pure function of token counts.

The scheduler (which frees blocks) and every worker (which moves tokens) evaluate
the same functions on the same counts, so block decisions agree on every rank
without any extra channel; scores only decide *which* tokens fill the kept slots.

A compressed request's logical positions look like this (bs = block size):

    [0, kept)            compacted region: the kept tokens, packed into the
                         request's first kept/bs blocks (in position order after
                         the prompt's compaction; a recompressing policy's decode
                         folds then swap winners into losers' slots, see backend.py)
    [kept, live_start)   gap: those blocks were returned to vLLM's pool (null)
    [live_start, T)      live region: recent tokens at their own positions;
                         new tokens are appended here as usual

With demotion (MiKV) the compacted region is ``capacity`` full-precision tokens (whole
blocks) then up to ``quant_tokens`` demoted tokens packed ``quant_cap`` to a block in
quantized pages (docs/page_format.md): ``kept`` counts tokens, ``pages`` blocks.

``kept`` is a fixed, block-aligned capacity per request. A compression event
happens when a step moves ``live_start`` forward: the step's attention still reads
the old layout, then the candidates -- old compacted tokens + live tokens now below
the new ``live_start`` -- compete for the ``kept`` slots (see backend.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from vllm_kvcomp.spec import CompressionSpec


@dataclass(frozen=True)
class Layout:
    kept: int = 0  # tokens in the compacted region
    live_start: int = 0
    pages: int | None = None  # blocks the compacted region spans (None: kept / block size)

    @property
    def compressed(self) -> bool:
        return self.live_start > 0

    def blocks_freed(self, block_size: int) -> range:
        """Logical block indices in the gap."""
        first = self.kept // block_size if self.pages is None else self.pages
        return range(first, self.live_start // block_size)


PLAIN = Layout()


@dataclass(frozen=True)
class Plan:
    """Per-request compression plan, fixed at admission."""

    capacity: int  # tokens in the compacted region (multiple of block_size); 0 = never compress
    block_size: int
    num_prompt_tokens: int
    recompress: bool
    slack: int = 1  # decode events every `slack` blocks (recompressing policies)
    quant_tokens: int = 0  # demoted tokens kept beyond `capacity` (MiKV), at most
    quant_cap: int = 0  # tokens per quantized page

    def layout(self, num_computed_tokens: int) -> Layout:
        """Layout once ``num_computed_tokens`` tokens have been computed (and compressed)."""
        bs, n = self.block_size, self.num_prompt_tokens
        if self.capacity == 0 or num_computed_tokens < n:
            return PLAIN  # prefill still running: nothing compressed yet
        # Prompt-only policies fold the prompt once; recompressing ones follow decode,
        # folding `slack` whole blocks at a time after the prompt's event.
        live_start = n // bs * bs
        if self.recompress:
            step = self.slack * bs
            live_start += (num_computed_tokens - live_start) // step * step
        if self.quant_tokens:  # prompt-only: candidates are [0, live_start)
            quant = min(self.quant_tokens, max(0, live_start - self.capacity))
            pages = self.capacity // bs + -(-quant // self.quant_cap)
            if live_start - pages * bs < bs:
                return PLAIN
            return Layout(kept=self.capacity + quant, live_start=live_start, pages=pages)
        if live_start - self.capacity < bs:
            return PLAIN  # would not free a single block
        return Layout(kept=self.capacity, live_start=live_start)

    def split(self, layout: Layout) -> tuple[int, int]:
        """(full-precision, demoted) tokens of a layout's compacted region."""
        full = min(self.capacity, layout.kept)
        return full, layout.kept - full


NO_PLAN = Plan(capacity=0, block_size=1, num_prompt_tokens=0, recompress=False)


def make_plan(spec: CompressionSpec | None, num_prompt_tokens: int, block_size: int,
              page_capacity: Callable[[int], int] | None = None) -> Plan:
    """``page_capacity(bits)``: tokens a quantized page holds in this cache (quant.py);
    needed by demoting policies, whose budget is counted in blocks (memory), not tokens."""
    if spec is None or spec.keeps_all:
        return NO_PLAN
    budget = int(spec.budget.tokens(num_prompt_tokens) * spec.policy.capacity_scale())
    if spec.policy.action == "demote":
        if page_capacity is None:
            raise ValueError(f"{spec.policy.name} needs the cache geometry (quantized page capacity)")
        blocks = max(budget // block_size - 1, 1)  # less the live tail's block, as below
        floor = -(-spec.policy.min_tokens() // block_size)
        full = min(blocks, max(floor, 1, round(spec.policy.full * blocks)))
        cap = page_capacity(spec.policy.bits)
        return Plan(capacity=full * block_size, block_size=block_size, num_prompt_tokens=num_prompt_tokens,
                    recompress=False, quant_tokens=(blocks - full) * cap, quant_cap=cap)
    slack = spec.policy.slack if spec.policy.recompress else 1
    # Whole blocks of the budget, less the live tail's (< `slack` blocks after each
    # event), so compacted + tail never exceeds the budget...
    capacity = (budget // block_size - slack) * block_size
    # ...but never fewer slots than the tokens the policy always keeps.
    floor = -(-spec.policy.min_tokens() // block_size) * block_size
    capacity = max(capacity, floor, block_size)
    return Plan(capacity=capacity, block_size=block_size, num_prompt_tokens=num_prompt_tokens,
                recompress=spec.policy.recompress, slack=slack)
