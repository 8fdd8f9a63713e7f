"""Compile quant_decode's decode kernel for an H100/H200 (sm_90) on a machine without a
GPU and count what its page loop executes: registers, stack (spills), SASS instructions
in the loop body by opcode. Uses the ptxas/nvdisasm/cuobjdump that ship with Triton.

Why: decode over quantized pages is bound by instructions per page, not bytes
(docs/kernels.md, "Quantized pages"); this shows the count of a variant before any GPU
time is spent on it. The local Triton may differ from the GPU machine's (3.6): counts
are a guide, timings decide.

    python benchmarks/sass_census.py                # int4, int2, int8 at the shipped tiling
    python benchmarks/sass_census.py --bits 4 --block-m 16 --dump /tmp/sass
    python benchmarks/sass_census.py --cuda         # the CUDA twin (csrc/quant_decode.cu; needs nvcc)

For the CUDA twin the count is the path a full page takes (the loop's branch to the
partial-page body, taken once per run, is left out).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from vllm_kvcomp.ops import quant  # noqa: E402
from vllm_kvcomp.triton_kernels import quant_decode as qd  # noqa: E402

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_qrun(bits: int, pb: int, warps: int, stages: int, block_m: int, D: int = 128, BS: int = 16, G: int = 4):
    """The kernel as paged_attention_batched launches it for a bf16 cache (strides divisible
    by 16, as Triton specialises them at run time)."""
    fn = qd._qrun_kernel
    sig = {n: t for n, t in zip(fn.arg_names[:9], ("*bf16", "*u8", "*fp16", "*i8", "*i32", "*i32", "*i32", "*fp32",
                                                   "*fp32"))}
    sig["scale2"] = "fp32"
    for n in ("max_blocks", "stride_qt", "stride_qh", "stride_kb", "stride_kh", "stride_bt"):
        sig[n] = "i32"
    caps = {b: quant.page_capacity(b, BS, D, 2) for b in (8, 4, 2)}
    p2 = triton.next_power_of_2
    const = dict(H_Q=8 * G, D=D, BS=BS, G=G, BLOCK_M=max(block_m, p2(G)), PSPLITS=3, SPLIT0=1, QSPLITS=2,
                 HAS8=bits == 8, HAS4=bits == 4, HAS2=bits == 2, CAP8=caps[8], CAP4=caps[4], CAP2=caps[2],
                 QT8=p2(caps[8]), QT4=p2(caps[4]), QT2=p2(caps[2]), PB=pb, STAGES=stages, SCAN=64, F32=False)
    sig.update({k: "constexpr" for k in const})
    aligned = [fn.arg_names.index(n) for n in list(sig)[:9] + ["stride_qt", "stride_qh", "stride_kb", "stride_kh",
                                                               "stride_bt"]]
    src = ASTSource(fn, sig, constexprs=const, attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))


def compile_cuda(bits: int, D: int = 128, BS: int = 16, G: int = 4, chains: int = 0, pipe: int = 0,
                 minb: int | None = None, steal: int = 0, zquad: int = 0) -> bytes:
    """csrc/quant_decode.cu for one format with the launcher's #defines, as an sm_90 cubin (nvcc)."""
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    stages = max(qd.CUDA_STAGES, 3) if pipe else qd.CUDA_STAGES
    source = qd.cuda_source(D, BS, 2, (bits,), True, stages, minb or qd.CUDA_MINB, chains=chains, pipe=pipe,
                            steal=steal, zquad=zquad)
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "k.cu"), os.path.join(tmp, "k.cubin")
        with open(src, "w") as f:
            f.write(source)
        subprocess.run([nvcc, "-arch=sm_90", "-cubin", "-O3", "-std=c++17", src, "-o", out], check=True,
                       capture_output=True, text=True)
        with open(out, "rb") as f:
            return f.read()


def census(kernel):
    """(registers, stack bytes, SASS text, opcode counts of the largest loop's body, leaving
    out what an unconditional forward branch inside it jumps over)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel if isinstance(kernel, bytes) else kernel.asm["cubin"])
    usage = subprocess.run([os.path.join(_BIN, "cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                           text=True).stdout
    sass = subprocess.run([os.path.join(_BIN, "nvdisasm"), "-c", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    labels, ins = {}, []
    for line in sass.splitlines():
        m = re.match(r"^\s*\.(L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(ins)
        m = re.match(r"^\s+/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if m:
            ins.append(m.group(1))
    loop = (0, 0)  # the longest backward branch around a tensor-core dot: the page loop (the merge's
    #                loop over many splits has none, and is longer than int8's page loop)
    for i, x in enumerate(ins):
        m = re.search(r"BRA\s.*`\(\.(L_x_\d+)\)", x)
        if (m and labels.get(m.group(1), i) < i and i - labels[m.group(1)] > loop[1] - loop[0]
                and any(y.startswith("HMMA") for y in ins[labels[m.group(1)]:i])):
            loop = (labels[m.group(1)], i + 1)
    skip = set()
    for i in range(*loop):
        m = re.match(r"BRA\s+`\(\.(L_x_\d+)\)", ins[i])
        if m and labels[m.group(1)] > i:
            skip |= set(range(i + 1, labels[m.group(1)]))
    ops = Counter(re.sub(r"^@!?U?P\w+\s+", "", ins[i]).split()[0] for i in range(*loop) if i not in skip)
    return (int(re.search(r"REG:(\d+)", usage).group(1)), int(re.search(r"STACK:(\d+)", usage).group(1)), sass,
            ops)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", default="4,2,8")
    ap.add_argument("--pb", type=int, default=qd.PB)
    ap.add_argument("--warps", type=int, default=qd.NUM_WARPS)
    ap.add_argument("--stages", type=int, default=qd.STAGES)
    ap.add_argument("--block-m", type=int, default=qd.MIN_M)
    ap.add_argument("--dump", default=None, help="folder for the SASS of each kernel")
    ap.add_argument("--cuda", action="store_true", help="the CUDA twin instead of the Triton kernel")
    ap.add_argument("--chains", type=int, default=qd.CUDA_CHAINS, help="the twin's CHAINS variant (A/B)")
    ap.add_argument("--pipe", type=int, default=qd.CUDA_PIPE, help="the twin's PIPE variant (A/B)")
    ap.add_argument("--steal", type=int, default=qd.CUDA_STEAL, help="the twin's STEAL variant (A/B)")
    ap.add_argument("--zquad", type=int, default=qd.CUDA_ZQUAD, help="the twin's ZQUAD variant (A/B)")
    ap.add_argument("--minb", type=int, default=qd.CUDA_MINB, help="the twin's launch-bounds minimum blocks per SM")
    args = ap.parse_args()
    for bits in map(int, args.bits.split(",")):
        if args.cuda:
            kernel = compile_cuda(bits, chains=args.chains, pipe=args.pipe, minb=args.minb, steal=args.steal,
                                  zquad=args.zquad)
        else:
            kernel = compile_qrun(bits, args.pb, args.warps, args.stages, args.block_m)
        regs, stack, sass, ops = census(kernel)
        cap = quant.page_capacity(bits, 16, 128, 2)
        print(f"int{bits}: {regs} registers, {stack} B stack; page loop {sum(ops.values())} instructions per warp "
              f"per page of {cap} tokens; {dict(ops.most_common(12))}")
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            with open(os.path.join(args.dump, f"qrun_int{bits}.sass"), "w") as f:
                f.write(sass)


if __name__ == "__main__":
    main()
