"""Accuracy at a memory budget (thin wrapper; the code is vllm_kvcomp/accuracy/).

    python benchmarks/accuracy.py run --output results/acc          # grid, resumable
    python benchmarks/accuracy.py report --output results/acc       # docs/accuracy.md + .png
    python benchmarks/accuracy.py --help

Same as the console script ``vllm-kvcomp-accuracy``.
"""
import sys

from vllm_kvcomp.accuracy.harness import main

if __name__ == "__main__":
    sys.exit(main())
