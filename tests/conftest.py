"""Session fixtures: the pico pair (pretrained once into a temp cache) and tiny random models built from configs.

No test touches the network: every model comes from a config built here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

@pytest.fixture(scope="session", autouse=True)
def offline_cache(tmp_path_factory):
    """Every test runs offline with a private cache, so the pico pair is built once, here, from scratch."""
    cache = tmp_path_factory.mktemp("cache")
    saved = {k: os.environ.get(k) for k in ("PKT_BENCH_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(PKT_BENCH_CACHE=str(cache), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    yield cache
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def pico_pair(offline_cache):
    from pkt_bench import pico

    return pico.ensure_built("teacher").parent


def _tiny(kind: str, layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int, tokenizer, out: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(layers * 1000 + hidden)
    config = AutoConfig.for_model(
        kind, vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 3,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=(kind == "qwen2"),
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Llama and Qwen2 teacher/student pairs (teacher deeper, wider, larger heads, GQA) plus odd cases."""
    from pkt_bench.pico import build_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    words = [f"w{i}" for i in range(60)]
    tok = build_tokenizer(words)
    other_tok = build_tokenizer([f"v{i}" for i in range(60)])
    return {
        "llama-teacher": _tiny("llama", 3, 64, 4, 2, 16, tok, root / "llama-teacher"),
        "llama-student": _tiny("llama", 2, 32, 4, 2, 8, tok, root / "llama-student"),
        "qwen2-teacher": _tiny("qwen2", 3, 64, 4, 2, 16, tok, root / "qwen2-teacher"),
        "qwen2-student": _tiny("qwen2", 2, 32, 4, 2, 8, tok, root / "qwen2-student"),
        "llama-other-vocab": _tiny("llama", 2, 32, 4, 2, 8, other_tok, root / "llama-other-vocab"),
    }
