"""Online distillation (`kd`) and hidden-state distillation (`hidden-kd`): the objective hook of the shared loop,
kd at β = 0 is lora, the KL's fixed point, trained projections, teacher costs, and pairs without a shared
vocabulary."""

import pytest
import torch
from test_baselines import CountingTask, lora_factors
from test_baselines import context as baseline_context

from pkt_bench.api import UserError
from pkt_bench.context import RunContext
from pkt_bench.finetune import response_logits
from pkt_bench.methods.hidden_kd import HiddenKD, HiddenKDConfig, hidden_objective
from pkt_bench.methods.kd import KD, KDConfig, OnlineTeacher, kl_divergence
from pkt_bench.methods.lora import LoRA, LoRAConfig
from pkt_bench.methods.semalign import SemAlign, SemAlignConfig
from pkt_bench.models import ModelPair, resolve_model
from pkt_bench.spec import Budget
from pkt_bench.stages import StageMeter

BUDGET = dict(examples=8, epochs=2, batch_size=4, weight_decay=0.01)


def context(tiny_models, folder, family, **budget):
    folder.mkdir(parents=True, exist_ok=True)
    return baseline_context(tiny_models, folder, family, **budget)


def trained_adapter(method, ctx):
    torch.manual_seed(0)  # LoRA's A init draws from the global generator
    method.transfer(ctx)
    from safetensors.torch import load_file

    return load_file(str(ctx.workdir / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_kd_with_beta_zero_is_lora_exactly(tiny_models, tmp_path, family):
    lora = trained_adapter(LoRA(LoRAConfig(rank=4)), context(tiny_models, tmp_path / "lora", family, **BUDGET))
    ctx = context(tiny_models, tmp_path / "kd", family, **BUDGET)
    kd = trained_adapter(KD(KDConfig(rank=4, beta=0.0)), ctx)
    assert lora.keys() == kd.keys() and all(torch.equal(lora[k], kd[k]) for k in lora)
    assert ctx.costs["optimizer_steps"] == 4 and ctx.costs["teacher_forward"] == 16  # 8 examples x 2 epochs
    assert ctx.costs["teacher_tokens"] > 16
    mixed = trained_adapter(KD(KDConfig(rank=4, beta=0.5)), context(tiny_models, tmp_path / "mixed", family, **BUDGET))
    assert not all(torch.equal(lora[k], mixed[k]) for k in lora)  # the teacher term does move the adapter


def test_kl_of_a_model_with_itself_is_zero_and_has_no_gradient(tiny_models):
    pair = ModelPair.resolve(str(tiny_models["llama-student"]), str(tiny_models["llama-student"]))
    model, tokenizer = pair.load("student")
    ids = torch.tensor([tokenizer("w1 w2 w3 w4 w5").input_ids])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    logits, _ = response_logits(model, batch)
    teacher_logits, _ = OnlineTeacher(pair.load("student")[0], {})(batch)
    kl = kl_divergence(teacher_logits, logits, temperature=1.0)
    kl.backward()
    assert abs(kl.item()) < 1e-5
    assert max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None) < 1e-6
    other = kl_divergence(teacher_logits, logits.detach() + torch.randn_like(logits))
    assert other.item() > 0.01


def test_hidden_kd_trains_its_projections_counts_the_teacher_and_leaves_it_alone(tiny_models, tmp_path):
    ctx = context(tiny_models, tmp_path, "qwen2", **BUDGET)
    model, tokenizer = LoRA(LoRAConfig(rank=4)).initialize(ctx)
    teacher = ctx.pair.load("teacher")[0]
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    objective = hidden_objective(OnlineTeacher(teacher, ctx.costs), 3, 2, 64, 32, 1.0, 0, "cpu")
    assert objective.pairs == [(0, 0), (1, 2)]  # student layers 1, 2 <- teacher layers ⌊1.5⌋ = 1, 3 (0-based here)
    start = [p.detach().clone() for p in objective.parameters()]
    adapter = lora_factors(model)
    ctx.finetune(model, tokenizer, objective=objective)
    assert all(not torch.equal(a, p) for a, p in zip(start, objective.parameters()))  # in the optimizer
    assert any(not torch.equal(adapter[n], p) for n, p in model.named_parameters() if n in adapter)
    assert all(torch.equal(before[n], p) for n, p in teacher.named_parameters())
    assert ctx.costs["teacher_forward"] == ctx.costs["examples_seen"] == 16
    HiddenKD(HiddenKDConfig(rank=4)).transfer(context(tiny_models, tmp_path / "method", "qwen2", **BUDGET))
    assert (tmp_path / "method" / "work" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("method", [KD(KDConfig()), HiddenKD(HiddenKDConfig()), SemAlign(SemAlignConfig())])
def test_a_pair_without_a_shared_vocabulary_stops_before_any_work(tiny_models, tmp_path, method):
    pair = ModelPair(resolve_model(str(tiny_models["llama-teacher"])),
                     resolve_model(str(tiny_models["llama-other-vocab"])), "cpu", "float32")
    workdir = tmp_path / "work"
    workdir.mkdir()
    ctx = RunContext(pair, CountingTask(), Budget(), 0, workdir, StageMeter(), task_name="counting",
                          cache_dir=tmp_path / "cache")
    with pytest.raises(UserError, match="different vocabularies") as error:
        method.check(pair)  # the runner calls it in plan(), before any cell
    assert "\n" not in str(error.value) and not any(workdir.iterdir()) and not (tmp_path / "cache").exists()
