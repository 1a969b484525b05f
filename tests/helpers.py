"""Helpers shared by tests."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("PKT_BENCH_DATA") or REPO.parent / "shared" / "data" / "eval")
"""The real tasks' local data (`PKT_BENCH_DATA`, else `../shared/data/eval`); their tests skip, saying so, without it."""
NO_DATA = (f"no task data at {DATA}: set PKT_BENCH_DATA to a folder in the layout of shared/data/eval "
           f"(gsm8k/, mmlu/, humaneval/, mbpp/) to run the real-task tests")


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python -m pkt_bench ARGS` the way a user runs the console script."""
    return subprocess.run([sys.executable, "-m", "pkt_bench", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, env={**os.environ, **(env or {})}, timeout=600)


def tree_digest(folder: Path) -> str:
    """A digest of every file under `folder` (names and bytes), to prove nothing stored changed."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def tiny_model(kind: str, layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int, tokenizer, out: Path) -> Path:
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


def qwen2_tokenizer():
    """A byte-level BPE tokenizer of the Qwen2 kind (transformers loads every qwen2 folder as Qwen2Tokenizer).

    It knows "w", "Ġw" (w after a space) and the digits, so "w1 w12" is w 1 Ġw 1 2, as Qwen splits digits.
    """
    from transformers import Qwen2Tokenizer

    vocab = {token: i for i, token in enumerate(["<pad>", "<s>", "</s>", "<unk>", "Ġ", "w", "Ġw", *"0123456789"])}
    return Qwen2Tokenizer(vocab=vocab, merges=[("Ġ", "w")], bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                          unk_token="<unk>")
