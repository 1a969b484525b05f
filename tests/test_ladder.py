"""The probe's kinship ladder (pkt_bench.pico, pkt_bench.pruning) and its positive control `graft`.

Built on a small `PicoConfig` (few entities, few steps): the properties hold for any size.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import REPO, cli, tiny_model
from transformers import AutoModelForCausalLM

from pkt_bench import pico
from pkt_bench.api import UserError
from pkt_bench.context import RunContext
from pkt_bench.models import ModelPair, ModelRef
from pkt_bench.pruning import Kept, choose, cut, prune, source
from pkt_bench.spec import Budget
from pkt_bench.stages import StageMeter

SMALL = pico.PicoConfig(entities=30, values_per_relation=5, transfer_fraction=0.4,  # >= 32 seeds for sensitivity
                        teacher=pico.ModelShape(layers=4, hidden=64, intermediate=128, heads=4, kv_heads=2),
                        student=pico.ModelShape(layers=2, hidden=32, intermediate=64, heads=4, kv_heads=2),
                        pretrain_steps=40, pretrain_batch=16, continue_steps=20)
STUDENTS = sorted({rung.student for rung in pico.LADDER})


@pytest.fixture(scope="module")
def ladder(offline_cache):
    return {name: pico.ensure_built(name, SMALL) for name in pico.NAMES}


def load(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def chain(name):
    """The recipes of a model and of every model it comes from."""
    while name:
        yield pico.RECIPES[name]
        name = pico.RECIPES[name].parent


@pytest.mark.parametrize("name", [*STUDENTS, "pico-sham-teacher"])
def test_no_held_out_fact_in_any_student_or_the_sham_teachers_corpus(name):
    held_out = set(pico.DEFAULT.world.held_out)
    assert held_out and len(pico.DEFAULT.world.corpus("all")) > len(pico.DEFAULT.world.corpus("sham"))
    for recipe in chain(name):
        assert not held_out & set(pico.DEFAULT.world.corpus(recipe.corpus)), (name, recipe)
    assert set(pico.DEFAULT.world.held_out) <= set(pico.DEFAULT.world.corpus(pico.RECIPES["pico-kin-teacher"].corpus))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_pruning_nothing_reproduces_the_ancestors_logits(kind, tiny_models):
    ancestor = load(tiny_models[f"{kind}-teacher"])
    same = prune(ancestor, Kept.everything(ancestor.config))
    ids = torch.randint(4, ancestor.config.vocab_size, (3, 9))
    with torch.no_grad():
        assert (same(ids).logits - ancestor(ids).logits).abs().max() < 1e-5


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_a_pruned_model_is_made_of_sub_blocks_that_keep_rope_pairs_and_gqa_groups(kind, tiny_models):
    ancestor = load(tiny_models[f"{kind}-teacher"])  # 3 layers, 64 wide, 4 heads of 16, 2 KV heads
    shape = pico.ModelShape(layers=2, hidden=32, intermediate=96, heads=4, kv_heads=2)
    kept = choose(ancestor, shape.layers, shape)
    pruned = prune(ancestor, kept)
    assert kept.layers == [0, 2] and len(kept.hidden) == 32 and pruned.config.head_dim == 8
    half = kept.source_head_dim // 2
    assert all(d + half in kept.head_dims for d in kept.head_dims if d < half)  # rotate_half pairs d with d + hd/2
    assert kept.q_heads == [0, 1, 2, 3]  # whole GQA groups
    weights = ancestor.state_dict()
    for name, param in pruned.state_dict().items():
        src, indices = source(name, kept)
        assert torch.equal(param, cut(weights[src], indices)), name
    # the kept pairs turn at the same frequencies in the smaller heads as in the ancestor's
    big, small = ancestor.model.rotary_emb.inv_freq, pruned.model.rotary_emb.inv_freq
    assert torch.allclose(small, big[[d for d in kept.head_dims if d < half]])
    with torch.no_grad():
        assert torch.isfinite(pruned(torch.randint(4, pruned.config.vocab_size, (2, 5))).logits).all()


def test_the_ladder_records_lineage_and_its_students_are_at_chance(ladder):
    world = SMALL.world
    for name in STUDENTS + ["pico-sham-teacher"]:
        model, accuracy = load(ladder[name]), None
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(ladder[name])
        right = 0
        for fact in world.held_out:
            ids = tokenizer(fact.prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                right += int(model(ids).logits[0, -1].argmax()) == tokenizer.convert_tokens_to_ids(fact.value)
        accuracy = right / len(world.held_out)
        assert accuracy <= 2 * SMALL.chance, (name, accuracy)
    pruned = json.loads((ladder["pico-kin-pruned"] / "lineage.json").read_text())
    assert pruned["parent"] == "pico-kin-ancestor" and pruned["operation"] == "prune depth+width, then heal"
    assert len(pruned["kept"]["layers"]) == SMALL.student.layers and len(pruned["kept"]["hidden"]) == 32
    assert json.loads((ladder["pico-kin-teacher"] / "lineage.json").read_text())["corpus"] == "all"
    assert json.loads((ladder["pico-teacher"] / "lineage.json").read_text())["parent"] is None


def context(ladder, teacher, student, tmp_path):
    pair = ModelPair(ModelRef(teacher, str(ladder[teacher]), teacher), ModelRef(student, str(ladder[student]), student),
                     "cpu", "float32")
    return RunContext(pair, None, Budget(), 0, tmp_path, StageMeter())


def graft(ctx, **options):
    from pkt_bench.methods.graft import Graft, GraftConfig

    return Graft(GraftConfig(**options)).grafted(ctx)[0].state_dict()


def test_graft_adds_the_teachers_change_at_the_students_lineage(ladder, tmp_path):
    student = load(ladder["pico-kin-pruned"]).state_dict()
    assert all(torch.equal(student[n], p) for n, p in graft(context(ladder, "pico-kin-teacher", "pico-kin-pruned",
                                                                       tmp_path), alpha=0).items())
    teacher, ancestor = load(ladder["pico-kin-teacher"]).state_dict(), load(ladder["pico-kin-ancestor"]).state_dict()
    kept = Kept.from_json(json.loads((ladder["pico-kin-pruned"] / "lineage.json").read_text())["kept"])
    grafted = graft(context(ladder, "pico-kin-teacher", "pico-kin-pruned", tmp_path), alpha=0.5, parts=["linear"])
    for name, param in grafted.items():
        src, indices = source(name, kept)
        expected = student[name] + (0.5 * cut(teacher[src] - ancestor[src], indices) if "proj" in name else 0)
        assert torch.allclose(param, expected, atol=1e-6), name
    same = graft(context(ladder, "pico-kin-teacher", "pico-kin-same", tmp_path))
    own = load(ladder["pico-kin-same"]).state_dict()
    assert all(torch.allclose(same[n], own[n] + teacher[n] - ancestor[n], atol=1e-6) for n in own)


def test_graft_refuses_a_pair_without_lineage(ladder, tiny_models, tmp_path):
    from pkt_bench.methods.graft import Graft, GraftConfig

    with pytest.raises(UserError, match="graft needs a student with a lineage"):
        Graft(GraftConfig()).check(ModelPair(ModelRef("t", str(tiny_models["llama-teacher"]), "t"),
                                                  ModelRef("s", str(tiny_models["llama-student"]), "s"), "cpu",
                                                  "float32"))
    with pytest.raises(UserError, match="trained further from the student's ancestor"):
        Graft(GraftConfig()).check(context(ladder, "pico-teacher", "pico-kin-pruned", tmp_path).pair)
    with pytest.raises(UserError, match="option 'parts'"):
        GraftConfig(parts=["linear", "bias"])


def test_graft_on_the_independent_pair_exits_2_with_one_line_before_writing(pico_pair, tmp_path):
    done = cli("run", "--method", "graft", "--results", str(tmp_path / "results"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "graft needs a student with a lineage" in done.stderr
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("*.json"))
    listed = cli("list", "pairs")
    assert listed.returncode == 0 and all(rung.name in listed.stdout for rung in pico.LADDER)
    bad = cli("run", "--pair", "pico-kin-widht", "--results", str(tmp_path / "results"))
    assert bad.returncode == 2 and "did you mean 'pico-kin-width'" in bad.stderr


def test_a_gain_of_a_tenth_over_lora_on_three_seeds_is_significant_at_the_default_size():
    """The probe's resolution (tasks/probe/README.md): with the default world's held-out facts, a method that knows
    10% more of them than lora on every seed (the same facts each seed, as a transfer gives), both otherwise
    guessing at chance, is significant with the leaderboard's paired test (McNemar on items) in >= 80% of draws."""
    from pkt_bench.stats import mcnemar

    n, chance = len(pico.DEFAULT.world.held_out), pico.DEFAULT.chance
    rng = np.random.default_rng(0)
    p_values = []
    for _ in range(500):
        lora = (rng.random((3, n)) < chance).astype(float)
        known = rng.random(n) < 0.10 / (1 - chance)  # so the mean gain is 0.10
        method = np.where(known, 1.0, (rng.random((3, n)) < chance).astype(float))
        p_values.append(mcnemar(method, lora))
    assert n >= 200 and np.mean(np.array(p_values) < 0.05) >= 0.8 and np.median(p_values) < 0.01


def _build(cache, steps):
    code = ("import dataclasses, sys; from pkt_bench import pico; from test_ladder import SMALL; "
            f"pico.ensure_built('pico-kin-ancestor', dataclasses.replace(SMALL, pretrain_steps={steps}))")
    env = {**os.environ, "PKT_BENCH_CACHE": str(cache), "PYTHONPATH": os.pathsep.join(
        [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)


def test_two_first_runs_build_once_and_sigterm_leaves_no_staging_folder(tmp_path):
    first, second = _build(tmp_path / "a", 30), _build(tmp_path / "a", 30)
    logs = [p.communicate(timeout=300)[1] for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0]
    assert sum(log.count("pkt-bench: built pico-kin-ancestor") for log in logs) == 1, logs
    killed = _build(tmp_path / "b", 100_000)
    deadline = time.time() + 120
    while not list((tmp_path / "b").glob("*/.building-*")) and time.time() < deadline:
        time.sleep(0.2)
    assert list((tmp_path / "b").glob("*/.building-*")), "the build never started"
    killed.send_signal(signal.SIGTERM)
    killed.communicate(timeout=60)
    assert killed.returncode == 128 + signal.SIGTERM
    assert not list((tmp_path / "b").rglob(".building-*")) and not list((tmp_path / "b").rglob("*.partial"))


def test_graft_at_sensitivitys_blocks_moves_only_those_blocks(ladder, tmp_path):
    from pkt_bench.methods.sensitivity import cut as cut_block
    from pkt_bench.tasks.probe import Probe

    ctx = context(ladder, "pico-kin-teacher", "pico-kin-pruned", tmp_path)
    ctx.task, ctx.cache_dir = Probe(config=SMALL), tmp_path / "cache"
    grafted = graft(ctx, blocks="sensitivity", parts=["linear", "norms"])
    student = load(ladder["pico-kin-pruned"]).state_dict()
    teacher, ancestor = load(ladder["pico-kin-teacher"]).state_dict(), load(ladder["pico-kin-ancestor"]).state_dict()
    folder = next((tmp_path / "cache").rglob("selection.json"))
    selection = json.loads(folder.read_text())
    name = "model.layers.1.mlp.down_proj.weight"
    block = selection["blocks"]["layers.1.down_proj"]
    src = f"model.layers.{block['teacher'].split('.')[1]}.mlp.down_proj.weight"
    expected = student[name] + cut_block(teacher[src] - ancestor[src], block, *student[name].shape)
    assert torch.allclose(grafted[name], expected, atol=1e-6)
    assert torch.equal(grafted["model.norm.weight"], student["model.norm.weight"])  # no block there: unchanged


def test_graft_lora_fine_tunes_the_grafted_student_on_the_shared_budget(ladder, tmp_path):
    from pkt_bench.methods.graft import Graft, GraftConfig, GraftLoRA
    from pkt_bench.tasks.probe import Probe

    assert GraftLoRA.fine_tunes and not Graft.fine_tunes  # so only graft-lora's cells carry the budget in their key
    ctx = context(ladder, "pico-kin-teacher", "pico-kin-pruned", tmp_path)
    ctx.task, ctx.budget = Probe(config=SMALL), Budget(examples=4, epochs=1, batch_size=2)
    artifact = GraftLoRA(GraftConfig()).transfer(ctx)
    assert artifact.kind == "model" and ctx.costs["optimizer_steps"] == 2 and ctx.costs["examples_seen"] == 4
    assert not (tmp_path / "grafted").exists()
    tuned = load(artifact.path).state_dict()
    grafted = graft(context(ladder, "pico-kin-teacher", "pico-kin-pruned", tmp_path))
    assert any(not torch.equal(tuned[n], grafted[n]) for n in grafted)  # LoRA moved the grafted student
