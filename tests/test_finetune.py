import dataclasses

import pytest
import torch
from peft import LoraConfig, get_peft_model

from pkt_bench.api import Example
from pkt_bench.finetune import encode, finetune
from pkt_bench.models import load_model
from pkt_bench.spec import Budget
from pkt_bench.tasks.probe import Probe

LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
            task_type="CAUSAL_LM")


def student(pico_pair):
    model, tokenizer = load_model(str(pico_pair / "student"), "cpu", "float32")
    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(**LORA)), tokenizer


def adapter_weights(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def test_labels_cover_the_response_and_eos_only(pico_pair):
    _, tokenizer = load_model(str(pico_pair / "student"), "cpu", "float32")
    ids, labels = encode(Example("zo ka", " bel ."), tokenizer, 64)
    n_prompt = len(tokenizer("zo ka").input_ids)
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tokenizer.eos_token_id
    assert len(encode(Example("zo ka", " bel ."), tokenizer, 3)[0]) == 3


def test_loop_learns_is_seeded_and_counts_its_budget(pico_pair):
    examples = Probe().transfer_data("train")
    budget = Budget(epochs=4, batch_size=8, lr=2e-2)
    model, tokenizer = student(pico_pair)
    stats = finetune(model, tokenizer, examples, budget, seed=1)
    assert stats.optimizer_steps == budget.optimizer_steps(len(examples)) == 32
    assert stats.examples_seen == 4 * len(examples)
    assert stats.last_loss < 0.5 * stats.first_loss
    again, _ = student(pico_pair)
    finetune(again, tokenizer, examples, budget, seed=1)
    first, second = adapter_weights(model), adapter_weights(again)
    assert all(torch.equal(first[k], second[k]) for k in first)
    other, _ = student(pico_pair)
    finetune(other, tokenizer, examples, budget, seed=2)
    assert not all(torch.equal(first[k], v) for k, v in adapter_weights(other).items())


def test_gradient_accumulation_matches_one_big_batch(pico_pair):
    """Loss is averaged over the response tokens of a whole optimizer step, so 2 x 4 equals 1 x 8."""
    examples = Probe().transfer_data("train")[:8]
    big = Budget(epochs=1, batch_size=8, grad_accum=1, lr=1e-2, warmup_ratio=0.0)
    small = dataclasses.replace(big, batch_size=4, grad_accum=2)
    weights = []
    for budget in (big, small):
        model, tokenizer = student(pico_pair)
        assert finetune(model, tokenizer, examples, budget, seed=0).optimizer_steps == 1
        weights.append(adapter_weights(model))
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=1e-6) for k in weights[0])
    base, _ = student(pico_pair)
    assert not all(torch.allclose(weights[0][k], v) for k, v in adapter_weights(base).items())


def test_empty_train_data_is_an_internal_error(pico_pair):
    model, tokenizer = student(pico_pair)
    with pytest.raises(AssertionError):
        finetune(model, tokenizer, [], Budget(), seed=0)
