"""Fast checks of the tiny offline Llama builder (no vLLM engine here)."""

import json
import os

import pytest

from vllm_kvcomp.models import build_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # One build shared by the module: building takes ~1-2 s after imports.
    return build_tiny_llama(tmp_path_factory.mktemp("m") / "tiny", seed=0)


def test_folder_is_complete(tiny):
    names = set(os.listdir(tiny))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    assert not any(n.startswith(".") for n in os.listdir(os.path.dirname(tiny)))  # no temp dir left


def test_config_loads_with_transformers(tiny):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny)
    assert cfg.model_type == "llama"
    assert cfg.head_dim == 32 and cfg.head_dim in (32, 64, 128)  # vLLM CPU attention sizes
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert json.load(open(os.path.join(tiny, "config.json")))["dtype"] == "float32"


def test_weights_float32_and_match_config(tiny):
    from safetensors import safe_open

    with safe_open(os.path.join(tiny, "model.safetensors"), "pt") as f:
        emb = f.get_tensor("model.embed_tokens.weight")
    cfg = json.load(open(os.path.join(tiny, "config.json")))
    assert str(emb.dtype) == "torch.float32"
    assert tuple(emb.shape) == (cfg["vocab_size"], cfg["hidden_size"])


def test_tokenizer_round_trips(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    cfg = json.load(open(os.path.join(tiny, "config.json")))
    assert 800 <= len(tok) <= cfg["vocab_size"]
    text = "The capital of France is Paris. Naïve café, 42 ünïcode 🙂!"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id == cfg["bos_token_id"]
    assert max(ids) < cfg["vocab_size"]
    assert tok.decode(ids, skip_special_tokens=True) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert "hi" in chat and chat.endswith("<|assistant|>\n")


def test_idempotent_and_deterministic(tiny, tmp_path):
    before = {n: os.stat(os.path.join(tiny, n)).st_mtime_ns for n in os.listdir(tiny)}
    assert build_tiny_llama(tiny) == tiny  # complete folder: returned untouched
    assert {n: os.stat(os.path.join(tiny, n)).st_mtime_ns for n in os.listdir(tiny)} == before

    other = build_tiny_llama(tmp_path / "again", seed=0)  # same seed -> same bytes
    for name in ("model.safetensors", "tokenizer.json"):
        with open(os.path.join(tiny, name), "rb") as a, open(os.path.join(other, name), "rb") as b:
            assert a.read() == b.read(), name


def test_rejects_unsupported_head_dim(tmp_path):
    with pytest.raises(ValueError, match="head_dim"):
        build_tiny_llama(tmp_path / "bad", hidden_size=48, num_heads=4, head_dim=None)  # 12
    assert not (tmp_path / "bad").exists()
