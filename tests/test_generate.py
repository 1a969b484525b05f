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

    with pytest.raises(UserError, match="unknown backend 'tgi'; known backends: hf, vllm, vllm-lora"):
        check_backend("tgi")
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(UserError, match="needs vLLM, which is not installed: pip install"):
            check_backend("vllm")
    else:
        check_backend("vllm-lora")
