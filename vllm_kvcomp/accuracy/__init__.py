"""Accuracy at a memory budget: a long-context suite, a harness that runs it through
vLLM + the plugin for a grid of policies x budgets, and the report (docs/accuracy.md).

    vllm-kvcomp-accuracy run --output results/acc          # the grid (resumable)
    vllm-kvcomp-accuracy report --output results/acc       # docs/accuracy.md + .png
"""
