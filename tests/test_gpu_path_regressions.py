"""Bugs first seen on the GPU path (docs/gpu.md), reproduced where the CPU can."""
import importlib.util
import os
import sys

from conftest import Engine, prompt_ids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_row_info_does_not_outlive_its_batch(tiny_model):
    """CUDA graph capture builds attention metadata outside the model runner's step; rows
    published for an earlier batch were then matched to the capture's dummy rows (seen on
    the H100: '256 attention rows but the model runner published 1 requests'). Rows must
    be cleared once the batch's metadata is built."""
    from vllm_kvcomp import backend

    with Engine(tiny_model, "h2o:0.25", max_model_len=1024) as eng:
        outs = eng.generate([prompt_ids(300, s) for s in range(2)], 8)
        assert all(len(o.outputs[0].token_ids) == 8 for o in outs)
        assert backend.published_rows() == []


def test_benchmark_scripts_shadow_no_installed_package():
    """`python benchmarks/X.py` puts benchmarks/ first on sys.path, so a script named like an
    installed module hides it: benchmarks/kernels.py hid the `kernels` package that
    transformers probes on the GPU machine, and `from transformers import LlamaConfig`
    failed there. (`kernels` is not installed here; this guards every name that is.)"""
    bench = os.path.join(ROOT, "benchmarks")
    for name in sorted(os.listdir(bench)):
        stem = name[:-3]
        if not name.endswith(".py") or stem in sys.modules and sys.modules[stem].__spec__ is None:
            continue
        spec = importlib.util.find_spec(stem)
        origin = getattr(spec, "origin", None) or ""
        assert spec is None or os.path.dirname(os.path.abspath(origin)) == bench, \
            f"benchmarks/{name} would shadow the installed module {stem!r} ({origin})"


def _runner(eng):
    return eng.llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner


def test_compaction_after_the_forward_covers_all_layers_at_once(tiny_model):
    """Decode attention must not depend on the batch on the host (vLLM replays it from a FULL
    CUDA graph), so compaction runs after each step's forward: one pass over all layers --
    the layers' caches and statistics seen as single [L, ...] views of vLLM's one KV
    allocation -- and SnapKV's votes are cleared once used (the cache is all-zero between
    steps, so the graph needs no clearing of its own)."""
    from vllm_kvcomp import backend

    with Engine(tiny_model, "snapkv:0.25", max_model_len=1024) as eng:
        outs = eng.generate([prompt_ids(600, s) for s in range(3)], 8)
        assert all(len(o.outputs[0].token_ids) == 8 for o in outs)
        layers = _runner(eng).__dict__["_kvcomp_layers"]
        stack = _runner(eng).__dict__["_kvcomp_stack"]  # cached on the runner: dies with it
        assert stack.kv is not None, "layers' KV caches should stack as one view"
        assert stack.kv.shape[0] == len(layers) == len(stack.layers)
        for i, (impl, kv) in enumerate(stack.layers):
            assert impl._layer_idx == i and stack.kv[i].data_ptr() == kv.data_ptr()
            assert stack.mass[i].data_ptr() == impl._stats["mass"].data_ptr()
        assert stack.obs.abs().max().item() == 0.0, "votes must be cleared after compaction"
        assert getattr(backend._pending, "md", None) is None


def test_step_metadata_lives_at_fixed_addresses(tiny_model, monkeypatch):
    """A FULL CUDA graph bakes in the addresses of the per-row metadata it read at capture:
    every step must write its rows into the same buffers (prefill, compaction and decode
    steps alike)."""
    from vllm_kvcomp import backend

    seen = []
    build = backend.KVCompMetadataBuilder.build

    def recording_build(self, *args, **kwargs):
        md = build(self, *args, **kwargs)
        seen.append(tuple(t.data_ptr() for t in (md.kept_by_layer, md.live_start, md.obs_queries,
                                                 md.mass_rows)))
        return md

    monkeypatch.setattr(backend.KVCompMetadataBuilder, "build", recording_build)
    with Engine(tiny_model, "h2o:0.25", max_model_len=1024) as eng:
        outs = eng.generate([prompt_ids(500, s) for s in range(3)], 40)
        assert all(len(o.outputs[0].token_ids) == 40 for o in outs)
    assert len(seen) >= 40 and len(set(seen)) == 1


def test_closed_engines_release_their_kv_cache(tiny_model):
    """The all-layer view of the KV caches is cached on the model runner, not in a module
    global: closed engines must give their 1 GiB KV cache back (the suite once ran out of
    memory, one cache kept alive per engine)."""
    import gc

    def rss_gib():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**30

    sizes = []
    for spec in ("snapkv:0.25", "mikv:0.25", "cake:0.25"):
        with Engine(tiny_model, spec) as eng:
            eng.generate([prompt_ids(1200, 1)], 4)
        gc.collect()
        sizes.append(rss_gib())
    assert sizes[-1] - sizes[0] < 0.5, sizes  # each engine's KV cache is 1 GiB
