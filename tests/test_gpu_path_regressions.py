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
