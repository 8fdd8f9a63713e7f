"""benchmarks/kernels_report.py reads bench_kernels.py --json files (docs/kernels.png)."""
import json
import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "kernels_report.py")


def test_report_plots_the_targets_of_each_run(tmp_path):
    run = {"env": {"device": "GPU X"},
           "decode bf16 B64 ctx8192 splits=auto": {"ms": 0.5, "pct_copy": 97.5},
           "decode bf16 B64 ctx8192 splits=1": {"ms": 0.6, "pct_copy": 70.0},  # not the auto row
           "quant int4 B64 ctx8192": {"speedup_vs_bf16": 2.0, "speedup_one_format": 2.5,
                                      "speedup_graph_one_format": 2.75},
           "quant int2 B64 ctx8192": {"speedup_vs_bf16": 3.25},  # older files: eager only
           "sdpa prefill B4 L4096": {"ours_vs_flash": 1.0625}}
    older = {"env": {"device": "GPU Y"}, "quant int4 B64 ctx8192": {"speedup_vs_bf16": 1.5}}
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(run))
    b.write_text(json.dumps(older))
    png = tmp_path / "k.png"
    out = subprocess.run([sys.executable, SCRIPT, str(a), str(b), "--png", str(png)], check=True,
                         capture_output=True, text=True).stdout.splitlines()
    assert png.stat().st_size > 10_000
    assert out[0] == ("GPU X a {'B64 ctx8192': 97.5} {'int4': 2.75, 'int2': 3.25} "
                      "{'prefill B4 L4096': 1.0625}")
    assert out[1] == "GPU Y b {} {'int4': 1.5} {}"
