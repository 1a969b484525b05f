"""SemAlign: semantic bases, the depth pairing, decompose/recompose across an orthogonal change of basis, v1 and
the v2 reconstruction (the frontier schedule trains one layer at a time; their values are in test_objectives.py), and semalign, kd, hidden-kd beside lora on one
leaderboard with the same optimizer steps (pico probe and GSM8K)."""

import json

import pytest
import torch
import test_baselines
from helpers import REPO, cli
from test_kd import BUDGET, context

from pkt_bench.api import UserError
from pkt_bench.layers import depth_map, interpolation, student_layer_for
from pkt_bench.methods.kd import OnlineTeacher, kl_divergence
from pkt_bench.methods.lora import LoRA
from pkt_bench.methods.semalign import SemAlign, SemAlignConfig
from pkt_bench.methods.semalign.bases import (decompose, pseudo_inverse, recompose, semantic_bases,
                                              transfer_matrix)
from pkt_bench.methods.semalign.objectives import Frontier, fisher_loss, geometry_loss, lora_layers
from pkt_bench.methods.semalign.pairing import critical_pairs, window_sources
from pkt_bench.models import load_model
from pkt_bench.spec import Budget

DATA = REPO.parent / "shared" / "data" / "eval"


def head(tiny_models, name):
    model, _ = load_model(str(tiny_models[name]), "cpu", "float32")
    return model.get_output_embeddings().weight.detach()


@pytest.mark.parametrize("name", ["llama-teacher", "llama-student", "qwen2-teacher", "qwen2-student"])
def test_bases_are_the_pseudo_inverse_with_unit_columns(tiny_models, name):
    w = head(tiny_models, name)  # [V, D]
    inverse = pseudo_inverse(w)  # [D, V]
    assert (w @ inverse @ w - w).abs().max() < 1e-4
    assert (inverse @ w @ inverse - inverse).abs().max() < 1e-4 * inverse.abs().max()  # entries ~1e2 in fp32
    bases = semantic_bases(w)
    assert bases.shape == (w.shape[1], w.shape[0])
    used = w.norm(dim=1) > 0  # a zero head row (a padding token's, tied to its embedding) has no base
    assert torch.allclose(bases.norm(dim=0), used.float(), atol=1e-5) and used.sum() >= len(used) - 1
    assert torch.allclose(bases * inverse.norm(dim=0), inverse, atol=1e-6)  # the same directions


def test_depth_pairing_gives_the_notes_indices_and_weights():
    assert depth_map(40, 32)[:9] == [1, 2, 3, 5, 6, 7, 8, 10, 11] and depth_map(40, 32)[-1] == 40
    assert sorted(set(range(1, 41)) - set(depth_map(40, 32))) == [4, 9, 14, 19, 24, 29, 34, 39]
    assert interpolation(3, 40, 32) == (3, 4, 0.75) and interpolation(32, 40, 32) == (39, 40, 1.0)
    assert student_layer_for(4, 40, 32) == 4 and student_layer_for(39, 40, 32) == 32  # layer 5 / 40 supervise
    assert depth_map(24, 12) == [2 * k for k in range(1, 13)]
    assert [interpolation(k, 24, 12) for k in (1, 6, 12)] == [(2, 3, 0.0), (12, 13, 0.0), (23, 24, 1.0)]
    assert depth_map(28, 24) == [1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 14, 15, 16, 17, 18, 19, 21, 22, 23, 24, 25, 26, 28]
    a, b, weight = interpolation(5, 28, 24)  # u = 28·5/24 = 5.8333
    assert (a, b) == (5, 6) and weight == pytest.approx(5 / 6)
    assert depth_map(2, 4) == [1, 1, 1, 2]  # a shallower teacher shares its layers


def test_critical_and_window_pairing():
    scores = [0.0] * 20
    scores[19] = 5.0  # the v1 figure: teacher layer 20 of 20 is critical, so student layer 10 of 10 trains
    assert critical_pairs(scores, 10, 1, interpolate=True) == {10: (19, 20, 1.0)}
    assert critical_pairs(scores, 10, 1, interpolate=False) == {10: (20, 20, 0.0)}
    scores = [0.0, 1.0, 9.0, 0.0, 2.0, 0.0, 0.0, 0.0]  # 8 -> 4: depth map 2, 4, 6, 8
    sources = window_sources(scores, 4)  # best within ±1, strictly increasing (k=2 may not take layer 3 again)
    assert [sources[k] for k in range(1, 5)] == [(3, 3, 0.0), (5, 5, 0.0), (6, 6, 0.0), (8, 8, 0.0)]
    assert [s[0] for s in window_sources([0.0] * 8, 4).values()] == [2, 4, 6, 8]  # ties: the depth map


def test_recomposition_on_an_orthogonally_rotated_student_is_r_transposed_times_the_teachers(tiny_models):
    w_teacher = head(tiny_models, "llama-student").double()  # [V, D], D = 32
    rotation, _ = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    w_student = w_teacher @ rotation  # W_S = W_T R
    s_teacher, s_student = semantic_bases(w_teacher), semantic_bases(w_student)
    hidden = torch.randn(5, 32)
    coefficients = decompose(hidden, s_teacher)
    on_teacher, on_student = recompose(coefficients, s_teacher), recompose(coefficients, s_student)
    expected = on_teacher @ rotation.float()  # rows: (Rᵀ h)ᵀ = hᵀ R
    assert (on_student - expected).abs().max() < 1e-5 * max(1.0, expected.abs().max().item())
    via_matrix = (hidden / hidden.norm(dim=-1, keepdim=True)) @ transfer_matrix(s_teacher, s_student)
    assert (via_matrix - on_student).abs().max() < 1e-5 * max(1.0, expected.abs().max().item())
    assert (on_student - on_teacher).abs().max() > 1e-2  # the rotation is not the identity


def test_layer_losses_geometry_is_scale_invariant_and_fisher_is_the_kl_to_second_order():
    torch.manual_seed(0)
    x, keep = torch.randn(2, 6, 8), torch.ones(2, 6, dtype=torch.bool)
    keep[1, 4:] = False
    assert geometry_loss(3 * x, x, keep) < 1e-10 and geometry_loss(torch.randn(2, 6, 8), x, keep) > 1e-2
    nothing = geometry_loss(x.requires_grad_(), x.detach(), torch.zeros_like(keep))  # every answer cut off
    assert nothing.item() == 0.0 and nothing.requires_grad
    w = torch.randn(50, 8)
    target = torch.randn(4, 8)
    student = target + 1e-2 * torch.randn(4, 8)  # small δ; smaller drowns in fp32 rounding
    surrogate = fisher_loss(student, target, w)
    exact = kl_divergence(target @ w.T * (student.norm(dim=-1, keepdim=True) / target.norm(dim=-1, keepdim=True)),
                          student @ w.T) / 4
    assert surrogate.item() == pytest.approx(exact.item(), rel=1e-2) and surrogate > 0


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_only_the_frontier_layer_changes_in_a_frontier_stage(tiny_models, tmp_path, family):
    ctx = context(tiny_models, tmp_path, family, **BUDGET, warmup_ratio=0.0)  # 4 steps, 2 student layers: 2 a stage
    method = SemAlign(SemAlignConfig(rank=4, objective="v2-reconstruction"))
    model, tokenizer = LoRA(method.config).initialize(ctx)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.01)  # B ≠ 0: every factor has a gradient when it trains
    scores = method.scores(ctx)
    assert len(scores) == 3 and ctx.costs["teacher_backward"] == len(ctx.examples("seed"))
    bases = {w: semantic_bases(head(tiny_models, f"{family}-{w}")) for w in ("teacher", "student")}
    snapshots = []
    frontier = Frontier(OnlineTeacher(ctx.pair.load("teacher")[0], ctx.costs), window_sources(scores, 2),
                        transfer_matrix(bases["teacher"], bases["student"]), "geometry",
                        model.get_base_model().get_output_embeddings().weight.detach(), 60, 1.0, 4, 1, "write", "all")

    def watched(model, batch):
        snapshots.append({layer: [p.detach().clone() for p in params] for layer, params in lora_layers(model).items()})
        return frontier(model, batch)

    ctx.finetune(model, tokenizer, objective=watched)
    snapshots.append({layer: [p.detach().clone() for p in params] for layer, params in lora_layers(model).items()})
    changed = [{layer for layer in (0, 1) if any(not torch.equal(a, b) for a, b in zip(before[layer], after[layer]))}
               for before, after in zip(snapshots, snapshots[1:])]
    assert changed == [{0}, {0}, {1}, {1}]  # steps 1-2: layer 1 only; steps 3-4: layer 2 only (weight decay on)
    assert not [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]  # LoRA alone


@pytest.mark.parametrize("config", [dict(), dict(objective="v2-reconstruction", layer_loss="fisher")])
def test_v1_trains_the_attributed_layer_only_and_fisher_runs(tiny_models, tmp_path, config):
    ctx = context(tiny_models, tmp_path, "llama", **BUDGET)
    torch.manual_seed(0)
    artifact = SemAlign(SemAlignConfig(rank=4, **config)).transfer(ctx)
    saved = json.loads((tmp_path / "work" / "adapter" / "semalign.json").read_text())
    from safetensors.torch import load_file

    adapter = load_file(f"{artifact.path}/adapter_model.safetensors")
    trained = {int(n.split(".layers.")[1].split(".")[0]) for n, p in adapter.items() if "lora_B" in n and p.any()}
    if config.get("objective", "v1") == "v1":
        assert len(saved["pairs"]) == 1 and trained == {int(k) - 1 for k in saved["pairs"]}
    else:
        assert list(saved["pairs"]) == ["1", "2"] and trained == {0, 1}
    assert ctx.costs["optimizer_steps"] == Budget(**BUDGET).optimizer_steps(8) and ctx.costs["teacher_forward"] > 16


def test_v1_targets_precomputed_once_per_example_train_the_same_adapter(tiny_models, tmp_path):
    from safetensors.torch import load_file

    adapters, costs = {}, {}
    for how in ("online", "precomputed"):
        ctx = context(tiny_models, tmp_path / how, "qwen2", **BUDGET)
        torch.manual_seed(0)
        artifact = SemAlign(SemAlignConfig(rank=4, objective="v1", teacher_targets=how)).transfer(ctx)
        adapters[how], costs[how] = load_file(f"{artifact.path}/adapter_model.safetensors"), ctx.costs
    assert all(torch.allclose(adapters["online"][k], v, atol=1e-5) for k, v in adapters["precomputed"].items())
    assert any(v.any() for k, v in adapters["online"].items() if "lora_B" in k)
    seeds = costs["online"]["teacher_backward"]  # attribution: one forward and backward per seed example
    assert costs["online"]["teacher_forward"] - seeds == 16 and costs["precomputed"]["teacher_forward"] - seeds == 8
    with pytest.raises(UserError, match="needs objective=v1"):
        SemAlignConfig(teacher_targets="precomputed", objective="v2-reconstruction")


def test_v1_is_the_default_and_each_objective_resolves_its_own_interface_and_positions():
    v1, v2 = SemAlignConfig(), SemAlignConfig(objective="v2-reconstruction")
    assert (v1.objective, v1.interface, v1.positions, v1.interpolate) == ("v1", "mlp", "response", False)
    assert (v2.interface, v2.positions) == ("write", "all")
    assert SemAlignConfig(interface="attention", positions="all").interface == "attention"
    with pytest.raises(UserError, match="renamed v2-reconstruction"):
        SemAlignConfig(objective="final")
    with pytest.raises(UserError, match="'interface' must be one of mlp, attention, write"):
        SemAlignConfig(interface="residual")


def records(results):
    return {r["method"]: r for r in (json.loads(p.read_text()) for p in (results / "records").glob("*.json"))}


@pytest.mark.parametrize("task", ["probe", "gsm8k"])
def test_semalign_kd_hidden_kd_gkd_beside_lora_on_one_leaderboard(pico_pair, tmp_path, task):
    if task == "gsm8k" and not DATA.is_dir():
        pytest.skip(f"no task data at {DATA}")
    methods = ("lora", "semalign", "kd", "hidden-kd", "gkd")
    task_args = (("--task", "gsm8k", "--data-dir", str(DATA), "--fit-context") if task == "gsm8k"  # pico: 64 tokens
                 else ("--task", "probe"))
    for method in methods:
        done = cli("run", "--method", method, *task_args, "--examples", "8", "--epochs", "1", "--batch-size", "4",
                   "--limit", "5", "--results", str(tmp_path))
        assert done.returncode == 0, done.stderr
    found = records(tmp_path)
    assert set(found) == {"student", "teacher", *methods}
    assert {found[m]["costs"]["optimizer_steps"] for m in methods} == {2}
    assert all(found[m]["costs"]["teacher_forward"] >= 8 for m in methods[1:])
    assert "teacher_forward" not in found["lora"]["costs"]
    assert found["gkd"]["costs"]["student_tokens_generated"] > 0
    board = cli("leaderboard", "--results", str(tmp_path), "--format", "csv", "--cost")
    assert board.returncode == 0, board.stderr
    assert {row.split(",")[0] for row in board.stdout.splitlines()[1:]} >= set(methods)


def test_objectives_in_bf16_match_fp32(tiny_models):
    """Every new objective on a bf16 pair (the CUDA default) gives the fp32 value to bf16 precision."""
    from pkt_bench.finetune import encode
    from pkt_bench.methods.gkd import OnPolicyDistillation, Sampling
    from pkt_bench.methods.hidden_kd import hidden_objective
    from pkt_bench.methods.kd import Distillation
    from pkt_bench.methods.semalign.objectives import Cosine, OnlineTargets

    values = {}
    for dtype in ("float32", "bfloat16"):
        student, tokenizer = load_model(str(tiny_models["llama-student"]), "cpu", dtype)
        teacher = OnlineTeacher(load_model(str(tiny_models["llama-teacher"]), "cpu", dtype)[0], {})
        rows = [encode(e, tokenizer, 64) for e in test_baselines.CountingTask().transfer_data("train")[:2]]
        batch = {"input_ids": torch.tensor([r[0] for r in rows]), "labels": torch.tensor([r[1] for r in rows])}
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        bases = {w: semantic_bases(head(tiny_models, f"llama-{w}")) for w in ("teacher", "student")}
        matrix = transfer_matrix(bases["teacher"], bases["student"])
        sources = window_sources([1.0, 2.0, 3.0], 2)
        out_head = student.get_output_embeddings().weight.detach()
        objectives = {
            "kd": Distillation(teacher, 0.5, 2.0, 60),
            "hidden-kd": hidden_objective(teacher, 3, 2, 64, 32, 1.0, 0, "cpu"),
            "v1": Cosine(OnlineTargets(teacher, {2: (2, 3, 0.5)}, matrix, "mlp"), {2: (2, 3, 0.5)}, "mlp", "response"),
            "v1-attention": Cosine(OnlineTargets(teacher, {1: (1, 1, 0.0)}, matrix, "attention"), {1: (1, 1, 0.0)},
                                   "attention", "all"),
            "geometry": Frontier(teacher, sources, matrix, "geometry", out_head, 60, 1.0, 2, 1, "write", "all"),
            "fisher": Frontier(teacher, sources, matrix, "fisher", out_head, 60, 1.0, 2, 1, "write", "all"),
            # λ = 0: the JSD on the train answers (a sample drawn in bf16 is another sequence, not a precision test)
            "gkd": OnPolicyDistillation(teacher, 0.5, 0.0, Sampling(4, 0.9, (1,), 0), 60, {}, 0),
        }
        with torch.no_grad():
            values[dtype] = {name: objective(student, batch).item() for name, objective in objectives.items()}
    for name, exact in values["float32"].items():
        assert exact > 0 and values["bfloat16"][name] == pytest.approx(exact, rel=5e-2), name
