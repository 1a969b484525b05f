"""Generation backends: stop sequences end generation early and cut the text, batching does not change greedy
outputs, closed word-level vocabularies (the pico pair) do not crash, and backends are checked before a run."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from pkt_bench.api import UserError
from pkt_bench.generate import HFGenerator, cut_at_stop


@pytest.fixture(scope="module")
def byte_level_model():
    """A random tiny Llama over a byte-level BPE vocabulary (which transformers' stop-string criterion reads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(["the cat sat on the mat. a dog ran to the park! 12 + 30 = 42."] * 50, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config).eval(), tokenizer


def counting_forward(model):
    calls = {"n": 0}
    forward = model.forward

    def counted(*args, **kwargs):
        calls["n"] += 1
        return forward(*args, **kwargs)

    model.forward = counted
    return calls


def test_a_stop_sequence_ends_generation_early_and_is_cut(byte_level_model):
    model, tokenizer = byte_level_model
    prompts = ["the cat sat", "a dog ran to", "12 + 30 ="]
    full = HFGenerator(model, tokenizer).generate(prompts, max_new_tokens=24)
    # a stop string first produced a few tokens into the first prompt's continuation
    ids = tokenizer(full[0], add_special_tokens=False).input_ids
    stop = next(s for k in range(3, len(ids)) if (s := tokenizer.decode(ids[k:k + 1]).strip())
                and full[0].find(s) >= len(tokenizer.decode(ids[:3])))
    calls = counting_forward(model)
    stopped = HFGenerator(model, tokenizer, batch_size=1).generate(prompts[:1], max_new_tokens=24, stop=[stop])
    assert stopped == [cut_at_stop(full[0], [stop])] and stop not in stopped[0]
    assert calls["n"] < 24  # the criterion ended generation, not max_new_tokens


def test_batching_keeps_greedy_outputs_and_their_order(pico_pair):
    from pkt_bench.models import load_model
    from pkt_bench.tasks.probe import Probe

    model, tokenizer = load_model(str(pico_pair / "teacher"), "cpu", "float32")
    prompts = [fact.prompt for fact in Probe().world.held_out[:7]]
    batched = HFGenerator(model, tokenizer, batch_size=4).generate(prompts, max_new_tokens=4, stop=["."])
    single = HFGenerator(model, tokenizer, batch_size=1).generate(prompts, max_new_tokens=4, stop=["."])
    assert batched == single
    assert [out.split()[0] for out in batched] == [fact.value for fact in Probe().world.held_out[:7]]
    assert not any("." in out for out in batched)  # cut at the stop although pico's vocabulary is closed


def test_backends_are_checked_before_a_run():
    from pkt_bench.evaluate import check_backend

    with pytest.raises(UserError, match="unknown backend 'tgi'; known backends: auto, hf, vllm, vllm-lora"):
        check_backend("tgi")
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(UserError, match="needs vLLM, which is not installed: pip install"):
            check_backend("vllm")
    else:
        check_backend("vllm-lora")


def test_the_leaderboard_names_backends_when_a_column_mixes_them():
    from pkt_bench.leaderboard import scores

    def record(method, backend, value):
        return {"method": method, "task": "gsm8k", "seed": 0, "teacher": "T", "student": "S",
                "cell": {"method": method, "backend": backend}, "primary_metric": "exact_match",
                "metrics": {"exact_match": value}, "items": []}

    one = [record("student", "hf", 0.1), record("lora", "hf", 0.2)]
    assert {s.method for s in scores(one)} == {"student", "lora"}
    mixed = one + [record("lora", "vllm", 0.25)]
    labels = {s.method for s in scores(mixed)}
    assert {label.split(" (")[1] for label in labels} == {"hf)", "vllm)"} and "student (hf)" in labels
    assert len(scores(mixed, baseline="student")) == 3  # the baseline is still found by its method name


def test_vllm_cpu_settings_use_every_core_and_size_the_kv_cache_to_the_model(tmp_path):
    """On CPU pkt-bench binds vLLM to every core it may use (none kept back for a front end that does not run)
    and reserves the KV cache a full batch needs: 16 rows x 4096 tokens of K and V in every layer, in 16 bits."""
    import json

    from pkt_bench.evaluate import _ranges, vllm_cpu_settings

    shapes = {"0.5b": (24, 14, 2, 896, 1), "1.5b": (28, 12, 2, 1536, 2), "7b": (28, 28, 4, 3584, 4)}  # Qwen2.5
    for name, (layers, heads, kv_heads, hidden, gib) in shapes.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "hidden_size": hidden}))
        settings = vllm_cpu_settings(str(folder), batch_size=16, cpus=[0, 1])
        assert settings == {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
                            "VLLM_CPU_KVCACHE_SPACE": str(gib)}, name
    assert _ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


def test_closing_a_target_drops_its_model(pico_pair):
    from pkt_bench.api import Artifact
    from pkt_bench.evaluate import make_target

    target = make_target(Artifact(kind="model", path=str(pico_pair / "student")), "hf", "cpu", "float32")
    model, _ = target.model_and_tokenizer()
    target.close()
    assert target._loaded is None and target.model_and_tokenizer()[0] is not model
