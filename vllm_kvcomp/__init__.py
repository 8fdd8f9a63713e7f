"""vllm-kvcomp: KV-cache compression for a stock vLLM server.

Where things happen (a map for newcomers):
  spec.py            --kv-compression parsing and validation
  policies/          where a token is scored (one file per method)
  layout.py          how many tokens a request keeps and which blocks are freed (pure,
                     shared by scheduler and workers so they always agree)
  allocator.py       where a block is freed back to vLLM's pool (scheduler side)
  backend.py         attention backend: reads compacted pages, emits statistics, and
                     moves kept tokens (compaction) right after each layer's attention
  ops/reference.py   the PyTorch reference kernels (CPU path and test oracle)
  plugin.py          vLLM entry point: CLI flag, config plumbing, registration
"""

__version__ = "0.1.0"
