import json

import pytest
import torch
from helpers import cli, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from pkt_bench.api import Example, TransferContext, UserError
from pkt_bench.methods.sensitivity import Sensitivity, SensitivityConfig, layer_map, max_block, sensitivity
from pkt_bench.models import ModelPair
from pkt_bench.spec import Budget
from pkt_bench.stages import StageMeter


class WordsTask:
    version = "1"

    def transfer_data(self, role):
        return [Example(f"w{i} w{i + 1}", f" w{i + 2} w{i + 3}", str(i)) for i in range(12)]


def test_max_block_matches_brute_force_and_breaks_ties_low():
    torch.manual_seed(0)
    for n, m, rows, cols in [(9, 11, 4, 5), (6, 6, 6, 6), (7, 3, 1, 3), (20, 13, 7, 2)]:
        score = torch.rand(n, m)
        sums = {(a, b): score[a : a + rows, b : b + cols].double().sum().item()
                for a in range(n - rows + 1) for b in range(m - cols + 1)}
        best = max(sums.values())
        assert max_block(score, rows, cols) == min(k for k, v in sums.items() if abs(v - best) < 1e-9)
    assert max_block(torch.zeros(5, 5), 2, 2) == (0, 0)


def test_layer_map_top_keeps_order_uniform_spreads_and_shallow_teacher_errors():
    assert layer_map([5.0, 1.0, 7.0, 6.0], 3, "top") == [0, 2, 3]
    assert layer_map([5.0, 1.0, 7.0, 6.0], 2, "top") == [2, 3]
    assert layer_map([0.0] * 4, 2, "uniform") == [0, 3]
    with pytest.raises(UserError, match="fewer than the student's 3"):
        layer_map([1.0, 2.0], 3, "top")


def test_sensitivity_equals_per_sample_autograd(tiny_models):
    folder = tiny_models["llama-teacher"]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    seeds = WordsTask().transfer_data("seed")[:3]
    scores = sensitivity(model, tokenizer, seeds, ["q_proj", "down_proj"], 64)
    assert set(scores) == {(layer, name) for layer in range(3) for name in ("q_proj", "down_proj")}
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    weight = model.model.layers[1].mlp.down_proj.weight
    expected = torch.zeros_like(weight)
    from pkt_bench.finetune import encode

    for seed in seeds:
        ids, labels = encode(seed, tokenizer, 64)
        weight.requires_grad_(True)
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
        (grad,) = torch.autograd.grad(loss, weight)
        expected += (weight.detach() * grad).abs()
        weight.requires_grad_(False)
    assert torch.allclose(scores[(1, "down_proj")], expected, rtol=1e-5, atol=1e-9)


def context(tiny_models, family, tmp_path, teacher=None):
    pair = ModelPair.resolve(str(teacher or tiny_models[f"{family}-teacher"]), str(tiny_models[f"{family}-student"]))
    return TransferContext(pair, WordsTask(), Budget(), 0, tmp_path, StageMeter())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_injection_keeps_the_students_step0_function_and_carries_teacher_blocks(tiny_models, family, tmp_path):
    ctx = context(tiny_models, family, tmp_path)
    model, tokenizer = Sensitivity(SensitivityConfig(n_seeds=4, rank=4, alpha=8.0)).initialize(ctx)
    student, _ = ctx.pair.load("student")
    ids = torch.tensor([tokenizer("w1 w2 w3 w4").input_ids])
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, student(input_ids=ids).logits, atol=1e-4)
    selection = json.loads((tmp_path / "selection.json").read_text())
    assert len(selection["layer_map"]) == 2 and selection["layer_map"] == sorted(selection["layer_map"])
    assert len(selection["blocks"]) == 2 * 7
    lora_b = model.base_model.model.model.layers[0].self_attn.k_proj.lora_B["default"].weight
    assert lora_b.shape == (16, 4) and lora_b.abs().sum() > 0  # GQA: 2 KV heads x head size 8
    assert len((tmp_path / "seeds.jsonl").read_text().splitlines()) == 4


def test_teacher_narrower_than_the_student_names_the_matrix(tiny_models, tmp_path):
    narrow = tiny_model("llama", 3, 16, 2, 1, 8, AutoTokenizer.from_pretrained(tiny_models["llama-student"]),
                   tmp_path / "narrow")
    ctx = context(tiny_models, "llama", tmp_path, teacher=narrow)
    with pytest.raises(UserError, match=r"teacher q_proj of layer \d is 16x16, smaller than the student's 32x32"):
        Sensitivity(SensitivityConfig(n_seeds=2, rank=2)).initialize(ctx)


def test_sensitivity_runs_end_to_end_on_the_probe_with_the_lora_budget(pico_pair, tmp_path):
    done = cli("run", "--method", "sensitivity", "--results", str(tmp_path))
    assert done.returncode == 0, done.stderr
    stored = {r["method"]: r for r in (json.loads(p.read_text()) for p in (tmp_path / "records").glob("*.json"))}
    record = stored["sensitivity"]
    assert record["costs"]["teacher_forward"] == 32 and record["stages"]["extract"]["wall_s"] > 0
    assert record["costs"]["optimizer_steps"] == Budget().optimizer_steps(60)
    assert record["artifact"]["kind"] == "model"
    assert (tmp_path / "artifacts" / record["key"] / "selection.json").exists()
