#!/usr/bin/env python3
"""Plot (PNG) of issue 3's kernel targets from bench_kernels.py --json files, one bar group
per file (a machine or a run):

    python benchmarks/kernels_report.py docs/kernels_runs/h200_bench_kernels_all_two_loops.json \
        docs/kernels_runs/h200_bench_kernels_all_two_loops_run2.json --png docs/kernels.png

Panels: bf16 decode bandwidth as % of the run's copy bandwidth; int8/int4/int2 pages' speed
over bf16 pages at equal tokens (one format compiled in, from a CUDA graph, as the backend
runs decode); our bf16 decode and prefill over SDPA flash on the same tokens. Dashed lines:
the targets. A section a file lacks is left empty.
"""
import argparse
import json
import os


def load(path):
    d = json.load(open(path))
    env = d.get("env", {})
    label = f"{env.get('device', '?')}\n{os.path.basename(path).removesuffix('.json')}"
    return label, d


def decode_pct(d):
    return {k.split("decode bf16 ")[1].split(" splits")[0]: v["pct_copy"]
            for k, v in d.items() if k.startswith("decode bf16") and k.endswith("splits=auto")}


def quant_speedup(d):
    out = {}
    for bits in (8, 4, 2):
        v = d.get(f"quant int{bits} B64 ctx8192")
        if v:
            out[f"int{bits}"] = v.get("speedup_graph_one_format", v.get("speedup_one_format", v["speedup_vs_bf16"]))
    return out


def vs_flash(d):
    return {k.removeprefix("sdpa "): v["ours_vs_flash"] for k, v in d.items()
            if k.startswith("sdpa ") and "ours_vs_flash" in v}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--png", required=True)
    args = ap.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [load(f) for f in args.files]
    panels = [("bf16 decode, % of copy bandwidth", decode_pct, 80),
              ("quantized pages, x bf16 pages (64 x 8192)", quant_speedup, 3),
              ("ours / SDPA flash (speed)", vs_flash, 0.9)]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, (title, fn, target) in zip(axes, panels):
        series = [(label, fn(d)) for label, d in runs]
        keys = list(dict.fromkeys(k for _, s in series for k in s))  # first-seen order
        width = 0.8 / max(1, len(series))
        for i, (label, s) in enumerate(series):
            xs = [j + i * width for j, k in enumerate(keys) if k in s]
            ys = [s[k] for k in keys if k in s]
            bars = ax.bar(xs, ys, width, label=label)
            ax.bar_label(bars, fmt="%.2f" if target < 10 else "%.0f", fontsize=7)
        ax.axhline(target, ls="--", color="gray", lw=1)
        ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(keys))], keys, rotation=30,
                      ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    for label, d in runs:
        print(label.replace("\n", " "), decode_pct(d), quant_speedup(d), vs_flash(d))


if __name__ == "__main__":
    main()
