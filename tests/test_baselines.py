"""The controls of issue 6: pissa, random-init, teacher-random, distill, and equal budgets across methods."""

import json

import pytest
import torch
from helpers import cli

from pkt_bench.api import Example, UserError
from pkt_bench.context import RunContext
from pkt_bench.methods.distill import GENERATIONS, Distill, DistillConfig
from pkt_bench.methods.lora import LoRA, LoRAConfig
from pkt_bench.methods.sensitivity import Sensitivity, SensitivityConfig
from pkt_bench.models import ModelPair
from pkt_bench.spec import Budget
from pkt_bench.stages import StageMeter


class CountingTask:
    """Words after words; the teacher's answer counts as correct only for even ids."""

    version = "1"
    generation = {"max_new_tokens": 2, "stop": []}

    def transfer_data(self, role):
        return [Example(f"w{i} w{i + 1}", f" w{i + 2} w{i + 3}", str(i)) for i in range(10)]

    def check(self, example, completion):
        return int(example.id) % 2 == 0


def context(tiny_models, tmp_path, family="llama", **budget):
    pair = ModelPair.resolve(str(tiny_models[f"{family}-teacher"]), str(tiny_models[f"{family}-student"]))
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    return RunContext(pair, CountingTask(), Budget(**budget), 0, workdir, StageMeter(), task_name="counting",
                           cache_dir=tmp_path / "cache")


def logits(model, tokenizer):
    ids = torch.tensor([tokenizer("w1 w2 w3 w4 w5").input_ids])
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def lora_factors(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_pissa_and_random_init_keep_the_step0_function_with_their_own_adapters(tiny_models, tmp_path, family):
    ctx = context(tiny_models, tmp_path, family)
    student, tokenizer = ctx.pair.load("student")
    expected = logits(student, tokenizer)

    pissa, _ = LoRA(LoRAConfig(rank=4, init="pissa")).initialize(ctx)
    assert (logits(pissa, tokenizer) - expected).abs().max() < 1e-4
    pissa_factors = lora_factors(pissa)
    assert all(f.abs().sum() > 0 for f in pissa_factors.values())  # B is not zero: the student's own components

    config = dict(n_seeds=3, rank=4, alpha=8.0)
    folder = tmp_path / "extraction"
    folder.mkdir()
    Sensitivity(SensitivityConfig(**config)).extract(ctx, folder)
    svd = Sensitivity(SensitivityConfig(**config)).inject(ctx.pair.load("student")[0], folder, seed=0)
    random = Sensitivity(SensitivityConfig(**config, init="random")).inject(ctx.pair.load("student")[0], folder, 0)
    again = Sensitivity(SensitivityConfig(**config, init="random")).inject(ctx.pair.load("student")[0], folder, 0)
    for model in (svd, random):
        assert (logits(model, tokenizer) - expected).abs().max() < 1e-4
    svd_factors, random_factors = lora_factors(svd), lora_factors(random)
    assert svd_factors.keys() == random_factors.keys()
    for name, factor in svd_factors.items():  # same Frobenius norm per matrix, other directions
        assert random_factors[name].norm() == pytest.approx(factor.norm().item(), rel=1e-4)
        assert not torch.allclose(random_factors[name], factor)
    assert all(torch.equal(random_factors[n], f) for n, f in lora_factors(again).items())  # fixed by the seed


def test_distill_reuses_the_teachers_answers_and_respects_the_filter(tiny_models, tmp_path):
    ctx = context(tiny_models, tmp_path, examples=8, epochs=1, batch_size=4)
    Distill(DistillConfig(rank=2)).transfer(ctx)
    (folder,) = (tmp_path / "cache").glob("distill-*")
    answers = [json.loads(line) for line in (folder / GENERATIONS).read_text().splitlines()]
    assert len(answers) == 8 and ctx.costs["teacher_tokens_generated"] > 0
    assert ctx.costs["teacher_forward"] == 8 and ctx.costs["teacher_tokens"] > 8  # the counters every method keeps
    assert ctx.costs["teacher_answers"] == ctx.costs["teacher_answers_kept"] == 8
    assert ctx.costs["optimizer_steps"] == Budget(examples=8, epochs=1, batch_size=4).optimizer_steps(8)
    written = (folder / GENERATIONS).stat().st_mtime_ns

    again = context(tiny_models, tmp_path, examples=8, epochs=1, batch_size=4)
    Distill(DistillConfig(rank=2, filter_correct=True)).transfer(again)
    assert again.costs["reused"] == 1 and (folder / GENERATIONS).stat().st_mtime_ns == written
    assert again.costs["teacher_tokens_generated"] == ctx.costs["teacher_tokens_generated"]
    kept = sum(int(a["id"]) % 2 == 0 for a in answers)
    assert again.costs["teacher_answers_kept"] == kept < 8
    assert again.costs["examples_seen"] == kept  # one epoch over the kept answers only


def test_distill_filter_needs_a_task_with_gold_answers(tiny_models, tmp_path):
    ctx = context(tiny_models, tmp_path)
    ctx.task = type("NoGold", (), {"version": "1", "transfer_data": CountingTask.transfer_data})()
    with pytest.raises(UserError, match="no gold answers"):
        Distill(DistillConfig(filter_correct=True)).transfer(ctx)


def test_every_method_spends_the_same_budget_and_the_leaderboard_shows_them_all(pico_pair, tmp_path):
    methods = ("lora", "pissa", "sensitivity", "teacher-random", "random-init", "distill")
    budget = ("--examples", "16", "--epochs", "1", "--limit", "10")
    for method in (*methods, "laten"):
        done = cli("run", "--method", method, *budget, "--results", str(tmp_path))
        assert done.returncode == 0, done.stderr
    records = {r["method"]: r for r in (json.loads(p.read_text()) for p in (tmp_path / "records").glob("*.json"))}
    assert set(records) == {"student", "teacher", "laten", *methods}
    assert records["laten"]["costs"]["optimizer_steps"] == 0  # laten does not fine-tune: no budget to match
    steps = {m: (records[m]["costs"]["optimizer_steps"], records[m]["costs"]["examples_seen"]) for m in methods}
    assert set(steps.values()) == {(Budget(examples=16, epochs=1).optimizer_steps(16), 16)}, steps
    assert records["sensitivity"]["costs"]["teacher_backward"] == 32 and "teacher_backward" not in records["lora"]["costs"]
    assert records["distill"]["costs"]["teacher_tokens_generated"] > 0
    board = cli("leaderboard", "--results", str(tmp_path), "--format", "csv", "--cost")
    assert board.returncode == 0, board.stderr
    header, *rows = board.stdout.splitlines()
    assert {row.split(",")[0] for row in rows} >= {"student", "teacher", "laten", *methods}
    assert "optimizer_steps" in header and "teacher_forward" in header and "wall_s" in header
