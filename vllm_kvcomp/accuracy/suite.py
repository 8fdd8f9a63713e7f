"""The built-in long-context suite, generated offline and deterministically from a seed.

Every case is a JSON-able dict, the same shape ``--dataset`` files use::

    {"id", "task", "prompt", "answer", "max_tokens", "scoring", "length", ...}

``prompt`` is the full text sent to the model (chat template already applied for the
question tasks), ``length`` its token count. Scoring kinds (scoring.py): ``contains``
(answer string in the prediction), ``recall`` (share of a list of answers found),
``ppl`` (``answer`` is a continuation scored by forced decoding).

Haystack text: Isaac Newton, *Opticks* (4th ed., 1730; public domain, Project
Gutenberg transcription), which ships inside the PyPI package ``apache-tvm-ffi`` (a
dependency of xgrammar, hence of vLLM) as
``tvm_ffi/3rdparty/libbacktrace/Isaac.Newton-Opticks.txt``. It is read from the
installed package at run time, never copied into this repository.

Tasks (RULER-style, sized for a 135M model):
  passkey   one 5-digit pass key at a stated depth of the haystack
  multikey  4 "special magic number" needles, the question asks for one of them
  vartrack  a chain of variable assignments (VAR A = 12345, VAR B = VAR A, ...) with a
            decoy chain; the question asks for all variables holding the value (recall)
  qa        a document mentioning 8 fictional people (town, trade); a question about one
  ppl       a stretch of *Opticks*; the last 128 tokens are scored as a continuation
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import random
import re
from dataclasses import dataclass

TASKS = ("passkey", "multikey", "vartrack", "qa", "ppl")
DEFAULT_LENGTHS = (1024, 2048, 4096, 6144)
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
PPL_CONTINUATION = 128

OPTICKS = "tvm_ffi/3rdparty/libbacktrace/Isaac.Newton-Opticks.txt"


def opticks_path() -> str:
    spec = importlib.util.find_spec("tvm_ffi")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the haystack text ships in the PyPI package apache-tvm-ffi "
                                "(a vLLM dependency): pip install apache-tvm-ffi")
    root = os.path.dirname(list(spec.submodule_search_locations)[0])
    path = os.path.join(root, OPTICKS)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found in the installed apache-tvm-ffi")
    return path


@functools.lru_cache(maxsize=1)
def opticks_text() -> str:
    """The book as clean prose: figure markers and italics underscores dropped, one space."""
    with open(opticks_path(), encoding="utf-8") as f:
        raw = f.read()
    start = raw.find("SIR ISAAC NEWTON'S ADVERTISEMENTS")
    raw = raw[start if start >= 0 else 0:]
    raw = re.sub(r"\[Illustration[^\]]*\]", " ", raw)
    raw = raw.replace("_", "")
    return re.sub(r"\s+", " ", raw).strip()


@functools.lru_cache(maxsize=1)
def opticks_sentences() -> tuple[str, ...]:
    parts = re.split(r"(?<=[.!?;])\s+(?=[A-Z])", opticks_text())
    return tuple(p for p in parts if 20 <= len(p) <= 1200)


class Tok:
    """Token counting with the model's tokenizer (cached per tokenizer)."""

    def __init__(self, tokenizer):
        self.tk = tokenizer
        self._sent_lens: list[int] | None = None

    def count(self, text: str) -> int:
        return len(self.tk.encode(text, add_special_tokens=False))

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode(ids)

    def sentence_lengths(self) -> list[int]:
        if self._sent_lens is None:
            sents = [" " + s for s in opticks_sentences()]
            self._sent_lens = [len(x) for x in self.tk(sents, add_special_tokens=False)["input_ids"]]
        return self._sent_lens

    def chat(self, user: str, answer_prefix: str = "") -> str:
        if getattr(self.tk, "chat_template", None):
            text = self.tk.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                               add_generation_prompt=True)
        else:
            text = f"{user}\n"
        return text + answer_prefix


def haystack(tok: Tok, rng: random.Random, n_tokens: int) -> list[str]:
    """Consecutive *Opticks* sentences from a random start, about ``n_tokens`` long."""
    sents, lens = opticks_sentences(), tok.sentence_lengths()
    start = rng.randrange(len(sents))
    out, total, i = [], 0, start
    while total < n_tokens:
        out.append(sents[i % len(sents)])
        total += lens[i % len(sents)]
        i += 1
    return out


def insert_at(sentences: list[str], items: list[tuple[float, str]]) -> str:
    """Join ``sentences`` with each ``(depth, text)`` inserted at that fraction of them."""
    slots: dict[int, list[str]] = {}
    for depth, text in items:
        slots.setdefault(round(depth * len(sentences)), []).append(text)
    out = []
    for i in range(len(sentences) + 1):
        out.extend(slots.get(i, []))
        if i < len(sentences):
            out.append(sentences[i])
    return " ".join(out)


@dataclass(frozen=True)
class SuiteConfig:
    seed: int = 0
    cases_per_task: int = 10
    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    tasks: tuple[str, ...] = TASKS


def _case_id(task: str, seed: int, i: int, length: int, prompt: str, answer) -> str:
    h = hashlib.sha1(f"{prompt}\0{answer}".encode()).hexdigest()[:8]
    return f"{task}-s{seed}-{i:03d}-{length}-{h}"


def _fit(tok: Tok, rng: random.Random, length: int, build) -> tuple[str, int]:
    """Build a prompt of about ``length`` tokens: ``build(sentences)`` -> text; the
    haystack is sized from the overhead of an empty one, then trimmed if needed."""
    overhead = tok.count(build([]))
    sents = haystack(tok, rng, max(0, length - overhead))
    text = build(sents)
    n = tok.count(text)
    while n > length and len(sents) > 1:
        sents = sents[:-1]
        text = build(sents)
        n = tok.count(text)
    return text, n


# --- tasks -------------------------------------------------------------------------

def make_passkey(tok: Tok, rng: random.Random, length: int, depth: float) -> dict:
    key = str(rng.randint(10000, 99999))
    needle = f"The pass key is: {key}. Remember it. {key} is the pass key."
    intro = ("There is a pass key hidden inside a lot of irrelevant text. Find it and "
             "memorize it. I will quiz you about the pass key.\n\n")

    def build(s):
        return tok.chat(intro + insert_at(s, [(depth, needle)]) + "\n\nWhat is the pass key?",
                        "The pass key is:")
    text, n = _fit(tok, rng, length, build)
    return dict(prompt=text, answer=key, depth=depth, scoring="contains", max_tokens=8, length=n,
                needle=needle)


_WORDS = ("amber apple arrow autumn badge basket beacon berry blossom bridge candle canyon castle "
          "cedar clover comet copper coral cotton crystal dagger daisy desert dragon eagle ember "
          "falcon feather forest fossil garden garnet ginger glacier harbor hazel helmet island "
          "ivory jasmine jungle kettle lagoon lantern lemon lotus marble meadow meteor mirror "
          "nectar needle oasis ocean orchid otter pebble pepper pigeon planet prism quartz "
          "raven ribbon river saddle salmon sapphire shadow silver spider spruce thunder tiger "
          "tulip valley velvet violet walnut willow winter wizard zebra").split()


def make_multikey(tok: Tok, rng: random.Random, length: int, depth: float, n_keys: int = 4) -> dict:
    keys = rng.sample(_WORDS, n_keys)
    values = [str(rng.randint(1000000, 9999999)) for _ in keys]
    target = rng.randrange(n_keys)
    # The asked-for needle sits at the stated depth; distractors anywhere else.
    depths = [rng.uniform(0.05, 0.95) for _ in keys]
    depths[target] = depth
    needles = [(d, f"One of the special magic numbers for {k} is: {v}.") for d, k, v in zip(depths, keys, values)]
    intro = ("Some special magic numbers are hidden inside the following text. Make sure to "
             "memorize them. I will quiz you about the numbers afterwards.\n\n")
    q = keys[target]

    def build(s):
        return tok.chat(intro + insert_at(s, needles) + f"\n\nWhat is the special magic number for {q} "
                        "mentioned in the provided text?", f"The special magic number for {q} is:")
    text, n = _fit(tok, rng, length, build)
    return dict(prompt=text, answer=values[target], depth=depth, scoring="contains", max_tokens=12,
                length=n, distractors=[v for i, v in enumerate(values) if i != target])


def _var_name(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


def make_vartrack(tok: Tok, rng: random.Random, length: int, depth: float, hops: int = 2) -> dict:
    """RULER's variable tracking: ``VAR A = 12345`` then ``VAR B = VAR A`` ... (``hops``
    links), a decoy chain with another value; the question asks for every variable
    holding the value. Score: the share of the chain's names in the answer (recall), so
    the first name (next to the value) is one hop and each further name one more."""
    names: list[str] = []
    while len(names) < 2 * (hops + 1):
        v = _var_name(rng)
        if v not in names:
            names.append(v)
    chain, other = names[: hops + 1], names[hops + 1:]
    value, decoy = str(rng.randint(10000, 99999)), str(rng.randint(10000, 99999))
    # The chain starts at the stated depth, each link further in; the decoy chain elsewhere.
    step = (0.97 - depth) / (hops + 1)
    items = [(depth, f"VAR {chain[0]} = {value}.")]
    items += [(depth + step * (j + 1), f"VAR {chain[j + 1]} = VAR {chain[j]}.") for j in range(hops)]
    d0 = rng.uniform(0.03, 0.9)
    dstep = (0.97 - d0) / (hops + 1)
    items += [(d0, f"VAR {other[0]} = {decoy}.")]
    items += [(d0 + dstep * (j + 1), f"VAR {other[j + 1]} = VAR {other[j]}.") for j in range(hops)]
    intro = ("Memorize and track the chain(s) of variable assignment hidden in the following "
             "text.\n\n")

    def build(s):
        return tok.chat(intro + insert_at(s, items) + f"\n\nFind all variables that are assigned the "
                        f"value {value} in the text above.",
                        f"The variables assigned the value {value} are: VAR")
    text, n = _fit(tok, rng, length, build)
    return dict(prompt=text, answer=chain, depth=depth, scoring="recall", max_tokens=24, length=n,
                value=value, decoy=other)


_FIRST = ("Ada Basil Clara Dorian Edith Felix Greta Hugo Iris Jasper Kira Lionel Mabel Nestor "
          "Olive Percy Quinn Rosa Silas Thea Ulric Vera Wendell Xenia Yorick Zelda Agnes Bruno "
          "Cecil Delia Ernest Flora Gideon Hazel Ivan Judith").split()
_LAST = ("Abbott Barlow Carver Dalton Ellery Fenwick Garland Holt Irving Jarvis Kendall Lowell "
         "Marsh Norwood Osgood Prescott Quimby Radley Sutton Thorne Upton Vance Whitley Yates").split()
_TOWNS = ("Ashford Brackley Carlow Dunmore Eastwick Fairholm Glenrock Harwich Ilfield Kingsbury "
          "Larkhall Milbrook Northam Oakridge Pemberton Queensferry Redmere Stanwick Thornbury "
          "Upwell Westbury Yarmouth").split()
_TRADES = ("baker weaver carpenter potter tailor miller cooper mason glazier saddler "
           "blacksmith brewer chandler cobbler fletcher tanner thatcher vintner").split()


def make_qa(tok: Tok, rng: random.Random, length: int, depth: float, n_people: int = 8) -> dict:
    """A document (the haystack) mentioning ``n_people`` fictional people, each with a
    town and a trade; the question asks one fact of the person at the stated depth, the
    others are distractors of the same shape."""
    people = rng.sample([f"{f} {l}" for f in _FIRST for l in _LAST], n_people)
    towns = rng.sample(_TOWNS, n_people)
    trades = [rng.choice(_TRADES) for _ in people]
    target = rng.randrange(n_people)
    depths = [rng.uniform(0.05, 0.95) for _ in people]
    depths[target] = depth
    items = [(d, f"{p} lives in {t} and works as a {j}.") for d, p, t, j in zip(depths, people, towns, trades)]
    name = people[target]
    ask_town = rng.random() < 0.5
    question, prefix, answer = ((f"In which town does {name} live?", f"{name} lives in", towns[target])
                                if ask_town else
                                (f"What does {name} work as?", f"{name} works as a", trades[target]))
    intro = ("Read the following document carefully. I will ask you about one of the people it "
             "mentions.\n\n")

    def build(s):
        return tok.chat(intro + insert_at(s, items) + "\n\n" + question, prefix)
    text, n = _fit(tok, rng, length, build)
    return dict(prompt=text, answer=answer, depth=depth, scoring="contains", max_tokens=8, length=n,
                name=name, question=question)


def make_ppl(tok: Tok, rng: random.Random, length: int, depth: float) -> dict:
    """A stretch of the book: ``length - 128`` tokens of context, 128 scored."""
    ids = tok.encode(" ".join(haystack(tok, rng, length + 64)))
    ids = ids[:length]
    ctx, cont = ids[: length - PPL_CONTINUATION], ids[length - PPL_CONTINUATION:]
    return dict(prompt=tok.decode(ctx), prompt_ids=ctx, answer=tok.decode(cont), answer_ids=cont,
                depth=None, scoring="ppl", max_tokens=len(cont), length=len(ctx))


MAKERS = {"passkey": make_passkey, "multikey": make_multikey, "vartrack": make_vartrack,
          "qa": make_qa, "ppl": make_ppl}


def generate_suite(tokenizer, cfg: SuiteConfig) -> list[dict]:
    """Cases for ``cfg``: task-major, case ``i`` of a task at ``lengths[i % L]`` and
    depth ``DEPTHS[i % 5]``; one RNG per (seed, task, i), so adding cases or tasks
    leaves the others unchanged."""
    tok = tokenizer if isinstance(tokenizer, Tok) else Tok(tokenizer)
    cases = []
    for task in cfg.tasks:
        if task not in MAKERS:
            raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
        for i in range(cfg.cases_per_task):
            length = cfg.lengths[i % len(cfg.lengths)]
            depth = DEPTHS[i % len(DEPTHS)]
            rng = random.Random(f"{cfg.seed}/{task}/{i}")
            case = MAKERS[task](tok, rng, length, depth)
            case["task"] = task
            case["id"] = _case_id(task, cfg.seed, i, length, case["prompt"], case["answer"])
            cases.append(case)
    return cases
