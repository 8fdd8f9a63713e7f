#!/usr/bin/env python3
"""Table (markdown, stdout) and plot (PNG) from a gpu_e2e.py results.jsonl.

    python benchmarks/gpu_report.py docs/gpu_runs/h100_llama3-8b_final.jsonl --png docs/gpu.png
"""
import argparse
import json


def load(path):
    return [json.loads(line) for line in open(path) if line.strip()]


def table(recs) -> str:
    van = next(r for r in recs if r["engine"] == "vanilla")
    rows = ["| config | KV tok/req held | max running | output tok/s | x vanilla | req/s | TTFT med / p99 (s) "
            "| TPOT med / p99 (ms) | TTFT alone (s) | scoring+compaction share |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        if "error" in r:
            rows.append(f"| {r['spec']} | error: {r['error'][:80]} |||||||||")
            continue
        name = "vanilla TRITON_ATTN" if r["engine"] == "vanilla" else f"plugin {r['spec']}"
        rows.append(
            f"| {name} | {r['kv_tokens_per_req_med']} | {r['max_running']} | {r['output_tok_s']} | "
            f"{r['output_tok_s'] / van['output_tok_s']:.2f} | {r['requests_s']} | {r['ttft_med_s']} / {r['ttft_p99_s']} | "
            f"{r['tpot_med_ms']} / {r['tpot_p99_ms']} | {r['ttft_light_s']} | {100 * r['compress_share']:.1f}% |")
    return "\n".join(rows)


def plot(recs, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    van = next(r for r in recs if r["engine"] == "vanilla")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for pol in ("streaming", "snapkv", "h2o"):
        pts = sorted(((float(r["spec"].split(":")[1]), r) for r in recs
                      if r["engine"] == "plugin" and r["spec"].startswith(pol + ":")
                      and "keep all" not in r["spec"] and "error" not in r), key=lambda t: t[0])
        if not pts:
            continue
        xs = [b for b, _ in pts]
        axes[0].plot(xs, [r["output_tok_s"] for _, r in pts], "o-", label=pol)
        axes[1].plot(xs, [r["max_running"] for _, r in pts], "o-", label=pol)
    for ax, key, lab in ((axes[0], "output_tok_s", "output tok/s"), (axes[1], "max_running", "max running requests")):
        ax.axhline(van[key], color="k", ls="--", label="vanilla vLLM")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("budget (fraction of KV kept)")
        ax.set_ylabel(lab)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"{van['gpu']}, {van['shape']} (random weights), {van['num_requests']} x {van['prompt_len']} "
                 f"prompt + {van['output_len']} output tokens, {van['kv_gib']} GiB KV, {van['mode']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("results")
    p.add_argument("--png")
    a = p.parse_args()
    recs = load(a.results)
    print(table(recs))
    if a.png:
        plot(recs, a.png)
