import json

import pytest
import torch
from helpers import cli, tiny_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from pkt_bench.api import Example, UserError
from pkt_bench.context import RunContext
from pkt_bench.finetune import encode
from pkt_bench.methods.sensitivity import (Sensitivity, SensitivityConfig, cut, factorize, layer_map, matrix_key,
                                              max_block, select, sensitivity)
from pkt_bench.models import ModelPair
from pkt_bench.spec import Budget
from pkt_bench.stages import StageMeter
from pkt_bench.tasks.probe import Probe


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


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: tied embeddings, biases on q/k/v
def test_sensitivity_equals_per_sample_autograd(tiny_models, family):
    folder = tiny_models[f"{family}-teacher"]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    seeds = WordsTask().transfer_data("seed")[:3]
    totals = [0.0] * 3
    scored = ("q_proj", "down_proj", "embed_tokens", "lm_head")
    scores = dict(sensitivity(model, tokenizer, seeds, 64, lambda n: matrix_key(n) and matrix_key(n)[1] in scored,
                              totals))
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    params = dict(model.named_parameters())
    expected = {name: torch.zeros_like(p) for name, p in params.items()}
    for seed in seeds:  # the plain way: one sample, autograd over every parameter, |θ·g|, summed
        ids, labels = encode(seed, tokenizer, 64)
        model.requires_grad_(True)
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
        grads = torch.autograd.grad(loss, list(params.values()))
        model.requires_grad_(False)
        for (name, p), grad in zip(params.items(), grads):
            expected[name] += (p.detach() * grad).abs()
    names = {n for n in params if matrix_key(n) and matrix_key(n)[1] in scored}
    assert set(scores) == names and len(names) == 2 * 3 + (1 if family == "qwen2" else 2)
    for name in names:
        assert torch.allclose(scores[name], expected[name], rtol=1e-4, atol=1e-9), name
    for layer in range(3):  # the layer score counts every parameter of the layer, norms and biases included
        layer_total = sum(float(e.double().sum()) for n, e in expected.items() if f"layers.{layer}." in n)
        assert totals[layer] == pytest.approx(layer_total, rel=1e-5)


def test_factorization_is_the_best_rank_r_approximation():
    torch.manual_seed(0)
    for block in (torch.randn(40, 30), torch.randn(30, 40), torch.randn(40, 12) @ torch.randn(12, 30)):
        u, s, vh = torch.linalg.svd(block.double(), full_matrices=False)
        best = (u[:, :5] * s[:5]) @ vh[:5]
        for split in ("paper", "balanced"):
            b, a = factorize(block, 5, split)
            assert b.shape == (block.shape[0], 5) and a.shape == (5, block.shape[1])
            assert ((b.double() @ a.double() - best).norm() / best.norm()).item() < 1e-4
        b, a = factorize(block, 5, "paper")
        assert torch.allclose(a @ a.T, torch.eye(5), atol=1e-5)  # paper split: A = V_rᵀ, all of Σ in B
        assert torch.allclose(b.norm(dim=0).double(), s[:5], rtol=1e-5)
    decaying = torch.linalg.qr(torch.randn(60, 40))[0] @ torch.diag(0.8 ** torch.arange(40.0)) @ \
        torch.linalg.qr(torch.randn(40, 40))[0]
    u, s, vh = torch.linalg.svd(decaying.double(), full_matrices=False)
    optimal = (decaying.double() - (u[:, :5] * s[:5]) @ vh[:5]).norm()
    b, a = factorize(decaying, 5, "paper", "randomized")
    assert (decaying.double() - b.double() @ a.double()).norm() < 1.01 * optimal  # within 1% of the optimum
    b, a = factorize(torch.zeros(6, 4), 2, "balanced")  # a block of zeros factorizes to zeros, not NaN
    assert not b.isnan().any() and not a.isnan().any() and (b @ a).abs().sum() == 0


def test_selection_strategies():
    score = torch.zeros(6, 8)
    score[1, :] = 5.0  # the heaviest row
    score[:, 6] += 3.0  # the heaviest column
    assert select("max-sum", score, (6, 8), 2, 3, "s") == {"row": 0, "col": 4}  # ties: smallest row, column
    top = select("top-rows-cols", score, (6, 8), 2, 3, "s")
    assert 1 in top["rows"] and 6 in top["cols"] and top["rows"] == sorted(top["rows"]) and len(top["cols"]) == 3
    first, again, other = (select("random-block", None, (6, 8), 2, 3, seed) for seed in ("a", "a", "b"))
    assert first == again and 0 <= first["row"] <= 4 and 0 <= first["col"] <= 5
    assert len({tuple(select("random-rows-cols", None, (60, 80), 2, 3, str(i))["rows"]) for i in range(5)}) > 1
    picked = select("random-rows-cols", None, (6, 8), 2, 3, "a")
    assert cut(torch.arange(48.0).view(6, 8), picked, 2, 3).shape == (2, 3)


def test_layer_map_random_is_sorted_and_fixed_by_the_seed():
    assert layer_map([0.0] * 10, 4, "random", 3) == layer_map([1.0] * 10, 4, "random", 3)
    assert layer_map([0.0] * 10, 4, "random", 3) == sorted(layer_map([0.0] * 10, 4, "random", 3))
    assert len({tuple(layer_map([0.0] * 10, 4, "random", seed)) for seed in range(6)}) > 1


def context(tiny_models, family, tmp_path, teacher=None, cache=None):
    pair = ModelPair.resolve(str(teacher or tiny_models[f"{family}-teacher"]), str(tiny_models[f"{family}-student"]))
    return RunContext(pair, WordsTask(), Budget(), 0, tmp_path, StageMeter(), task_name="words", cache_dir=cache)


def step0_gap(method, ctx, folder):
    student, tokenizer = ctx.pair.load("student")
    model = method.inject(student, folder).eval()
    reference, _ = ctx.pair.load("student")
    ids = torch.tensor([tokenizer("w1 w2 w3 w4 w5").input_ids])
    with torch.no_grad():
        return (model(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max().item(), model


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("embeddings", [False, True])
def test_residual_keeps_the_students_step0_function_and_carries_teacher_blocks(tiny_models, family, embeddings,
                                                                                tmp_path):
    ctx = context(tiny_models, family, tmp_path)
    method = Sensitivity(SensitivityConfig(n_seeds=4, rank=4, alpha=8.0, embeddings=embeddings))
    method.extract(ctx, tmp_path)
    gap, model = step0_gap(method, ctx, tmp_path)
    assert gap < 1e-4
    tokenizer = AutoTokenizer.from_pretrained(tiny_models[f"{family}-student"])
    selection = json.loads((tmp_path / "selection.json").read_text())
    assert len(selection["layer_map"]) == 2 and selection["layer_map"] == sorted(selection["layer_map"])
    assert len(selection["blocks"]) == 2 * 7 + (2 if embeddings else 0)
    layer = model.base_model.model.model.layers[0].self_attn.k_proj
    lora_b, lora_a = layer.lora_B["default"].weight, layer.lora_A["default"].weight
    assert lora_b.shape == (16, 4) and lora_b.abs().sum() > 0  # GQA: 2 KV heads x head size 8
    teacher = AutoModelForCausalLM.from_pretrained(tiny_models[f"{family}-teacher"])
    block = selection["blocks"]["layers.0.k_proj"]
    source = teacher.model.layers[int(block["teacher"].split(".")[1])].self_attn.k_proj.weight.detach()
    u, s, vh = torch.linalg.svd(cut(source, block, 16, 32).double(), full_matrices=False)
    best = (u[:, :4] * s[:4]) @ vh[:4]  # the best rank-4 approximation, by a full SVD
    assert ((lora_b.double() @ lora_a.double() - best).norm() / best.norm()).item() < 1e-4
    if embeddings:
        embed = model.base_model.model.model.embed_tokens
        emb_a, emb_b = embed.lora_embedding_A["default"].double(), embed.lora_embedding_B["default"].double()
        assert emb_a.shape == (4, len(tokenizer))  # [r, vocab]
        assert torch.allclose(emb_a @ emb_a.T, torch.eye(4, dtype=torch.float64), atol=1e-5)  # A = Vᵀ
        sigma = emb_b.norm(dim=0)  # B = UΣ: Σ on the B side, as upstream and as for the linear layers
        assert torch.allclose(emb_b.T @ emb_b, torch.diag(sigma**2), atol=1e-6) and (sigma - 1).abs().min() > 0.1
        assert "col" in selection["blocks"]["lm_head"] and selection["blocks"]["embed_tokens"]["row"] == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["lora_dropout"] == 0.05  # the saved config says what is trained
    assert len((tmp_path / "seeds.jsonl").read_text().splitlines()) == 4
    with safe_open(tmp_path / "sensitivity.safetensors", "pt") as scores:
        assert len(scores.keys()) == 3 * 7 + (0 if not embeddings else 1 if family == "qwen2" else 2)
        score = scores.get_tensor(f"model.{block['teacher'].replace('k_proj', 'self_attn.k_proj')}.weight")
    assert score.shape == source.shape and (score >= 0).all() and score.sum() > 0
    assert (block["row"], block["col"]) == max_block(score, 16, 32)


@pytest.mark.parametrize("strategy", ["top-rows-cols", "random-block", "random-rows-cols"])
def test_ablation_strategies_keep_step0_and_random_ones_are_fixed_by_extract_seed(tiny_models, strategy, tmp_path):
    ctx = context(tiny_models, "qwen2", tmp_path)
    blocks = []
    for name, extract_seed in (("a", 0), ("b", 0), ("c", 1)):
        method = Sensitivity(SensitivityConfig(n_seeds=2, rank=2, block=strategy, layer_map="uniform",
                                               extract_seed=extract_seed))
        (tmp_path / name).mkdir()
        method.extract(ctx, tmp_path / name)
        blocks.append(json.loads((tmp_path / name / "selection.json").read_text())["blocks"])
    assert step0_gap(method, ctx, tmp_path / "c")[0] < 1e-4
    assert blocks[0] == blocks[1]
    if strategy.startswith("random"):  # another extract_seed, other blocks; no score needed: no teacher pass
        assert blocks[0] != blocks[2]
        assert not (tmp_path / "a" / "sensitivity.safetensors").exists() and "teacher_forward" not in ctx.costs


def test_teacher_narrower_than_the_student_names_the_matrix(tiny_models, tmp_path):
    narrow = tiny_model("llama", 3, 16, 2, 1, 8, AutoTokenizer.from_pretrained(tiny_models["llama-student"]),
                   tmp_path / "narrow")
    ctx = context(tiny_models, "llama", tmp_path, teacher=narrow)
    with pytest.raises(UserError, match=r"teacher q_proj of layer \d is 16x16, smaller than the student's 32x32"):
        Sensitivity(SensitivityConfig(n_seeds=2, rank=2)).extract(ctx, tmp_path)


def test_extract_command_writes_its_files_and_refuses_a_used_folder(tiny_models, tmp_path):
    out = tmp_path / "x"
    args = ("extract", "--method", "sensitivity", "--teacher", str(tiny_models["llama-teacher"]), "--student",
            str(tiny_models["llama-student"]), "--task", "probe", "-o", "n_seeds=3", "-o", "rank=2")
    done = cli(*args, "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert {p.name for p in out.iterdir()} == {"adapter", "residual", "selection.json", "sensitivity.safetensors",
                                               "seeds.jsonl"}
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 2
    again = cli(*args, "--out", str(out))
    assert again.returncode == 2 and "not an empty folder" in again.stderr and len(again.stderr.splitlines()) == 1
    lora = cli("extract", "--method", "lora", "--task", "probe", "--out", str(tmp_path / "y"))
    assert lora.returncode == 2 and "no extraction stage" in lora.stderr and "sensitivity" in lora.stderr


def test_sensitivity_and_teacher_random_run_end_to_end_and_reuse_the_extraction(pico_pair, tmp_path):
    for method, seed in (("sensitivity", "0"), ("sensitivity", "1"), ("teacher-random", "0")):
        done = cli("run", "--method", method, "--seed", seed, "--results", str(tmp_path), "--epochs", "1")
        assert done.returncode == 0, done.stderr
    stored = [json.loads(p.read_text()) for p in (tmp_path / "records").glob("*.json")]
    runs = {(r["method"], r["seed"]): r for r in stored}
    first, second, random_block = runs["sensitivity", 0], runs["sensitivity", 1], runs["teacher-random", 0]
    assert first["costs"]["teacher_forward"] == second["costs"]["teacher_forward"] == 64
    assert "reused" not in first["costs"] and second["costs"]["reused"] == 1 and "reused" not in random_block["costs"]
    assert first["costs"]["optimizer_steps"] == random_block["costs"]["optimizer_steps"] \
        == Budget(epochs=1).optimizer_steps(len(Probe().transfer_data("train")))
    assert first["artifact"]["kind"] == "model" and first["stages"]["extract"]["wall_s"] > 0
    assert len(list((tmp_path / "cache").glob("sensitivity-*"))) == 2  # one per distinct extraction
    first_blocks, again_blocks, random_blocks = (
        json.loads((tmp_path / "artifacts" / r["key"] / "selection.json").read_text())["blocks"]
        for r in (first, second, random_block))
    assert first_blocks == again_blocks and first_blocks != random_blocks


class ShortSeeds(WordsTask):
    def transfer_data(self, role):
        return super().transfer_data(role)[:3] if role == "seed" else super().transfer_data(role)


def test_n_seeds_beyond_the_seed_role_come_from_the_train_pool_or_stop(tiny_models, tmp_path):
    pair = ModelPair.resolve(str(tiny_models["llama-teacher"]), str(tiny_models["llama-student"]))
    ctx = RunContext(pair, ShortSeeds(), Budget(), 0, tmp_path, StageMeter(), task_name="short")
    seeds = Sensitivity(SensitivityConfig(n_seeds=7)).seeds(ctx)
    assert len(seeds) == 7 and len({s.id for s in seeds}) == 7 and ctx.costs["seeds_scored"] == 7
    assert {s.id for s in ShortSeeds().transfer_data("seed")} < {s.id for s in seeds}
    with pytest.raises(UserError, match="n_seeds=40 but task 'short' has only 12 seed and train examples"):
        Sensitivity(SensitivityConfig(n_seeds=40)).seeds(ctx)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_bf16_extraction_chooses_what_fp32_chooses(tiny_models, family, tmp_path):
    """Scores are accumulated in fp32 from bf16 gradients: the layer map is fp32's and every block overlaps fp32's
    block by >= 90% of its area."""
    chosen = {}
    for dtype in ("float32", "bfloat16"):
        pair = ModelPair.resolve(str(tiny_models[f"{family}-teacher"]), str(tiny_models[f"{family}-student"]),
                                 dtype=dtype)
        ctx = RunContext(pair, WordsTask(), Budget(), 0, tmp_path, StageMeter(), task_name="words")
        (tmp_path / dtype).mkdir()
        Sensitivity(SensitivityConfig(n_seeds=8, rank=2)).extract(ctx, tmp_path / dtype)
        chosen[dtype] = json.loads((tmp_path / dtype / "selection.json").read_text())
    full, half = chosen["float32"], chosen["bfloat16"]
    assert half["layer_map"] == full["layer_map"]
    student = AutoModelForCausalLM.from_pretrained(tiny_models[f"{family}-student"])
    shapes = {name.removeprefix("model.").removesuffix(".weight").replace("self_attn.", "").replace("mlp.", ""):
              p.shape for name, p in student.named_parameters()}
    for label, block in full["blocks"].items():
        rows, cols = shapes[label]
        other = half["blocks"][label]
        overlap = max(0, rows - abs(block["row"] - other["row"])) * max(0, cols - abs(block["col"] - other["col"]))
        assert overlap >= 0.9 * rows * cols, (label, block, other)


def test_a_cached_extraction_is_keyed_by_everything_its_text_and_weights_depend_on(tiny_models, tmp_path):
    from dataclasses import replace

    from pkt_bench.cache import cache_identity
    from pkt_bench.spec import cell_key

    ctx = context(tiny_models, "llama", tmp_path)

    def key(c, identity=None):
        return cell_key(cache_identity(c, "sensitivity", identity or {"rank": 4}))

    class Rewritten(WordsTask):
        transfer_version = "3"

    class Unversioned(WordsTask):
        transfer_version = "1"

    other_teacher = context(tiny_models, "llama", tmp_path, teacher=tiny_models["llama-student"])
    variants = {"rank": key(ctx, {"rank": 8}), "format": key(replace(ctx, transfer_format="chat_template")),
                "version": key(replace(ctx, task=Rewritten())), "teacher": key(other_teacher),
                "dtype": key(replace(ctx, pair=replace(ctx.pair, dtype="bfloat16"))),
                "task": key(replace(ctx, task_name="other"))}
    assert key(ctx) not in variants.values() and len(set(variants.values())) == len(variants)
    # the workdir, seed and backend do not change what is extracted; version "1" is the key made before versions
    assert key(replace(ctx, workdir=tmp_path / "elsewhere", seed=7, backend="vllm")) == key(ctx)
    assert key(replace(ctx, task=Unversioned())) == key(ctx)
