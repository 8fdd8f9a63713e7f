"""Kernel tests: on a machine without CUDA the Triton kernels run under TRITON_INTERPRET=1.

The interpreter is chosen when a kernel is *decorated*, so the kernel modules are
(re)imported here with the variable set, and the variable is then restored: the rest of
the suite (vLLM engines on CPU) never sees it; each kernel test sets it again while it runs. ``api.FORCE_TRITON`` routes CPU tensors
through the Triton path, for these tests only.
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch

CUDA = torch.cuda.is_available()


def _load_kernels():
    old = os.environ.get("TRITON_INTERPRET")
    if not CUDA:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        from vllm_kvcomp.triton_kernels import api, cache_write, compaction, paged_attention

        for m in (paged_attention, compaction, cache_write, api):
            importlib.reload(m)
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


_load_kernels()


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    from vllm_kvcomp.triton_kernels import api

    monkeypatch.setattr(api, "FORCE_TRITON", True)
    if not CUDA:  # the interpreter also checks it at launch
        monkeypatch.setenv("TRITON_INTERPRET", "1")
