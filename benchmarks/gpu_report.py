#!/usr/bin/env python3
"""Table (markdown, stdout) and plot (PNG) from gpu_e2e.py results.jsonl files.

    python benchmarks/gpu_report.py docs/gpu_runs/h100_llama3-8b_graphsA.jsonl \
        docs/gpu_runs/h100_llama3-8b_graphsB.jsonl --png docs/gpu.png

``--workloads-png``: one group per file (a workload), each plugin row's speed-up over its
run's vanilla, beside the *prefill bound* of that workload: vanilla's wall time over
``N x`` the plugin's prefill of one prompt alone (TTFT alone). Prompts are not compressed,
so no budget can beat that bound, and the decode a run still needs after its last prefill
pulls it further down.

Several files (runs) may be given: each plugin row is compared with the vanilla row of its
own run (same process, same GPU state).
"""
import argparse
import json


def load(path):
    return [json.loads(line) for line in open(path) if line.strip()]


def _series(spec: str) -> tuple[str, float]:
    """'h2o:0.25,slack=4' -> ('h2o,slack=4', 0.25)."""
    pol, _, rest = spec.partition(":")
    bud, _, params = rest.partition(",")
    return (pol + ("," + params if params else "")), float(bud)


def _with_vanilla(runs):
    """[(record, that run's vanilla record)] for every record, vanilla rows once per run."""
    out = []
    for recs in runs:
        van = next(r for r in recs if r["engine"] == "vanilla")
        out += [(r, van) for r in recs if r["engine"] in ("vanilla", "plugin")]
    return out


def table(runs) -> str:
    rows = ["| config | KV tok/req held | max running | output tok/s | x vanilla | req/s | TTFT med / p99 (s) "
            "| TPOT med / p99 (ms) | TTFT alone (s) | scoring+compaction share |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    seen_keep_all = False
    for r, van in _with_vanilla(runs):
        if r["engine"] == "vanilla" and van is not _with_vanilla(runs[:1])[0][1]:
            continue  # one vanilla row (the others are within 1%: see each run's file)
        if "keep all" in r.get("spec", ""):
            if seen_keep_all:
                continue
            seen_keep_all = True
        if "error" in r:
            rows.append(f"| {r['spec']} | error: {r['error'][:80]} |||||||||")
            continue
        name = "vanilla TRITON_ATTN" if r["engine"] == "vanilla" else f"plugin {r['spec']}"
        rows.append(
            f"| {name} | {r['kv_tokens_per_req_med']} | {r['max_running']} | {r['output_tok_s']} | "
            f"{r['output_tok_s'] / van['output_tok_s']:.2f} | {r['requests_s']} | {r['ttft_med_s']} / {r['ttft_p99_s']} | "
            f"{r['tpot_med_ms']} / {r['tpot_p99_ms']} | {r['ttft_light_s']} | {100 * r['compress_share']:.2f}% |")
    return "\n".join(rows)


def plot(runs, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    van = runs[0][0] if runs[0][0]["engine"] == "vanilla" else next(r for r in runs[0] if r["engine"] == "vanilla")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    series: dict[str, list] = {}
    for r, v in _with_vanilla(runs):
        if r["engine"] == "plugin" and "keep all" not in r["spec"] and "error" not in r:
            name, bud = _series(r["spec"])
            series.setdefault(name, []).append((bud, r["output_tok_s"] / v["output_tok_s"], r["max_running"]))
    for name, pts in sorted(series.items()):
        pts.sort()
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=name)
    for ax, y, lab in ((axes[0], 1.0, "output tok/s vs vanilla (same run)"),
                       (axes[1], van["max_running"], "max running requests")):
        ax.axhline(y, color="k", ls="--", label="vanilla vLLM")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("budget (fraction of KV kept)")
        ax.set_ylabel(lab)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"{van['gpu']}, {van['shape']} (random weights), {van['num_requests']} x {van['prompt_len']} "
                 f"prompt + {van['output_len']} output tokens, {van['kv_gib']} GiB KV, {van['mode']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def prefill_bound(recs) -> float | None:
    """Vanilla's wall time over the plugin's prefill time alone (N prompts, one at a time;
    TTFT alone of the run's first plugin row). None without a plugin row."""
    van = next(r for r in recs if r["engine"] == "vanilla")
    plug = next((r for r in recs if r["engine"] == "plugin" and "ttft_light_s" in r), None)
    return van["elapsed_s"] / (van["num_requests"] * plug["ttft_light_s"]) if plug else None


def plot_workloads(runs, png, only=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def plugin_rows(recs):  # {spec: record}
        return {r["spec"]: r for r in recs if r["engine"] == "plugin" and "keep all" not in r["spec"]
                and "error" not in r and (not only or r["spec"] in only)}

    specs = sorted({spec for recs in runs for spec in plugin_rows(recs)})
    width = 0.8 / (len(specs) + 1)
    fig, ax = plt.subplots(figsize=(9, 4))
    labels, seen = [], set()

    def bar(x, y, name, **kw):
        ax.bar(x, y, width, label=None if name in seen else name, **kw)
        seen.add(name)

    for i, recs in enumerate(runs):
        van = next(r for r in recs if r["engine"] == "vanilla")
        labels.append(f"{van['num_requests']} x ({van['prompt_len']} + {van['output_len']})\n"
                      f"{van['gpu'].replace('NVIDIA ', '')}")
        rows = plugin_rows(recs)
        for j, spec in enumerate(specs):
            if spec in rows:
                bar(i + j * width, rows[spec]["output_tok_s"] / van["output_tok_s"], spec, color=f"C{j}")
        if rows:
            bar(i + len(specs) * width, prefill_bound(recs), "prefill bound", color="lightgray", hatch="//")
    for y in (3.0, 5.5):
        ax.axhline(y, color="k", ls=":", lw=1)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(runs))], labels, fontsize=8)
    ax.set_ylabel("output tok/s vs vanilla (same run)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    van = next(r for r in runs[0] if r["engine"] == "vanilla")
    fig.suptitle(f"{van['shape']} (random weights), {van['kv_gib']} GiB KV, {van['mode']}; dotted: the 3x and 5.5x "
                 "targets", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("results", nargs="+")
    p.add_argument("--png")
    p.add_argument("--workloads-png", help="speed-up per workload (one file each) beside its prefill bound")
    p.add_argument("--specs", help="with --workloads-png: only these configurations (separated by ;)")
    a = p.parse_args()
    runs = [load(f) for f in a.results]
    print(table(runs))
    if a.png:
        plot(runs, a.png)
    if a.workloads_png:
        plot_workloads(runs, a.workloads_png, a.specs.split(";") if a.specs else None)
        for f, recs in zip(a.results, runs):
            if (bound := prefill_bound(recs)) is not None:
                print(f"prefill bound {f}: {bound:.2f}x")
