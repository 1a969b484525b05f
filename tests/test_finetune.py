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
    assert stats.optimizer_steps == budget.optimizer_steps(len(examples)) == 4 * -(-len(examples) // 8)
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


def full_logit_ce(model, batch):
    """The loss as the loop computed it before: logits at every position, CE where labels are."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                                             reduction="sum")


def batch_of(tokenizer, examples, max_length=64):
    from pkt_bench.finetune import _collate

    return _collate([encode(e, tokenizer, max_length) for e in examples], tokenizer.pad_token_id, "cpu")


@pytest.mark.parametrize("kind", ["llama-student", "qwen2-student"])
def test_response_loss_equals_the_full_logit_loss_in_value_and_gradient(tiny_models, kind):
    """Only response positions reach the LM head, in chunks recomputed on backward: same loss, same gradients."""
    from pkt_bench.finetune import response_ce, response_logits

    model, tokenizer = load_model(str(tiny_models[kind]), "cpu", "float32")
    model = get_peft_model(model, LoraConfig(**LORA, init_lora_weights=False))
    batch = batch_of(tokenizer, [Example("w1 w2", " w3 w4 w5"), Example("w7", " w8"), Example("w9 w1 w2 w3", " w4 w4")])
    losses, grads = [], []
    for objective in (full_logit_ce, response_ce, lambda m, b: response_ce(m, b, chunk=2)):
        model.zero_grad()
        loss = objective(model, batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad})
    logits, targets = response_logits(model, batch)
    assert logits.shape == (int((batch["labels"][:, 1:] != -100).sum()), model.config.vocab_size)
    assert torch.allclose(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"), losses[0], atol=1e-5)
    for loss, grad in zip(losses[1:], grads[1:]):
        assert torch.allclose(loss, losses[0], atol=1e-5)
        assert all(torch.allclose(grad[k], grads[0][k], atol=1e-5) for k in grad)
    assert any(g.abs().sum() > 0 for g in grads[0].values())


@pytest.mark.parametrize("schedule", ["linear", "constant"])
def test_the_schedule_sets_each_steps_learning_rate(pico_pair, monkeypatch, schedule):
    rates = []
    step = torch.optim.AdamW.step

    def recorded(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recorded)
    model, tokenizer = student(pico_pair)
    budget = Budget(epochs=1, batch_size=2, lr=1e-2, warmup_ratio=0.25, schedule=schedule)  # 8 examples: 4 steps
    finetune(model, tokenizer, Probe().transfer_data("train")[:8], budget, seed=0)
    # one warmup step (⌈0.25·4⌉) from 0, then 1e-2 decaying linearly to 0 over the 3 left, or held
    expected = [0.0, 1e-2, 1e-2 * 2 / 3, 1e-2 / 3] if schedule == "linear" else [0.0, 1e-2, 1e-2, 1e-2]
    assert rates == pytest.approx(expected)


def test_custom_objective_is_used_and_normalized_by_the_step_tokens(pico_pair):
    seen = []

    def objective(model, batch):
        seen.append(int((batch["labels"][:, 1:] != -100).sum()))
        return full_logit_ce(model, batch)

    examples = Probe().transfer_data("train")[:8]
    budget = Budget(epochs=1, batch_size=8, lr=1e-2, warmup_ratio=0.0)
    model, tokenizer = student(pico_pair)
    stats = finetune(model, tokenizer, examples, budget, seed=0, objective=objective)
    reference, _ = student(pico_pair)
    again = finetune(reference, tokenizer, examples, budget, seed=0)
    assert len(seen) == 1 and seen[0] > 0
    assert stats.first_loss == pytest.approx(again.first_loss, rel=1e-5)
    first, second = adapter_weights(model), adapter_weights(reference)
    assert all(torch.allclose(first[k], second[k], atol=1e-6) for k in first)


def test_bf16_autocast_and_checkpointing_track_the_fp32_loop(pico_pair):
    """bf16 autocast over fp32 weights keeps the adapter in fp32 and lands near the fp32 run; gradient
    checkpointing changes nothing but memory."""
    examples = Probe().transfer_data("train")[:16]
    budget = Budget(epochs=2, batch_size=8, lr=1e-2, warmup_ratio=0.0)
    runs = {}
    for name, options in {"fp32": {}, "bf16": {"autocast": "bf16"}, "ckpt": {"gradient_checkpointing": True}}.items():
        model, tokenizer = student(pico_pair)
        stats = finetune(model, tokenizer, examples, dataclasses.replace(budget, **options), seed=0)
        runs[name] = (stats, adapter_weights(model))
    assert runs["bf16"][0].autocast == "bf16" and runs["fp32"][0].autocast == "off"
    assert all(w.dtype == torch.float32 for w in runs["bf16"][1].values())
    assert runs["bf16"][0].last_loss == pytest.approx(runs["fp32"][0].last_loss, rel=0.05)
    assert runs["bf16"][0].last_loss != runs["fp32"][0].last_loss  # autocast did run in bf16
    assert runs["ckpt"][0].last_loss == pytest.approx(runs["fp32"][0].last_loss, rel=1e-5)
    assert runs["ckpt"][0].gradient_checkpointing and not runs["fp32"][0].gradient_checkpointing


def test_gradient_checkpointing_is_recorded_but_not_in_the_cell_key(pico_pair):
    """It changes memory, not results (the test above): a cell run with it is the cell run without it."""
    from pkt_bench.runner import plan
    from pkt_bench.spec import RunSpec

    keys = {flag: plan(RunSpec(method="lora", budget=Budget(examples=8, gradient_checkpointing=flag)))[0]
            for flag in (False, True)}
    assert keys[True].key == keys[False].key
    assert keys[True].describe()["budget"]["gradient_checkpointing"] is False
    other = plan(RunSpec(method="lora", budget=Budget(examples=8, group_by_length=True)))[0]
    assert other.key != keys[False].key  # a field that changes the batches stays in the key


def test_group_by_length_batches_similar_lengths_and_keeps_every_row():
    from pkt_bench.finetune import micro_batches

    rows = [([0] * n, [0] * n) for n in [3, 40, 5, 38, 4, 41, 6, 39] * 4]  # short and long rows interleaved
    plain = micro_batches(rows, Budget(epochs=2, batch_size=4), seed=0)
    grouped = micro_batches(rows, Budget(epochs=2, batch_size=4, group_by_length=True), seed=0)

    def padded(batches):
        return sum(len(b) * max(len(r[0]) for r in b) for b in batches)

    assert sorted(len(r[0]) for b in grouped for r in b) == sorted(len(r[0]) for b in plain for r in b)
    assert padded(grouped) < 0.8 * padded(plain)
    assert grouped == micro_batches(rows, Budget(epochs=2, batch_size=4, group_by_length=True), seed=0)
    assert grouped != micro_batches(rows, Budget(epochs=2, batch_size=4, group_by_length=True), seed=1)
