"""The shared transfer format (spec key `transfer_format`) and the papers' budget presets."""

import dataclasses
import json

import pytest
from helpers import tiny_model

from pkt_bench.api import Example, UserError
from pkt_bench.context import RunContext
from pkt_bench.formats import check, render, resolve
from pkt_bench.models import ModelPair
from pkt_bench.runner import plan
from pkt_bench.spec import Budget, RunSpec, make_budget
from pkt_bench.stages import StageMeter

EXAMPLE = Example("Question: 2 + 3?\nAnswer:", " 2 + 3 = 5. So the answer is 5.", "q1")


def test_paper_format_is_the_upstream_chat_text_and_task_is_unchanged():
    paper = render(EXAMPLE, "paper")
    assert paper.prompt == "<|user|>\nQuestion: 2 + 3?\nAnswer:\n\n<|assistant|>\n"
    assert paper.response == "2 + 3 = 5. So the answer is 5.\n\n" and paper.id == "q1"
    assert render(EXAMPLE, "task") == EXAMPLE


def test_chat_formats_write_an_examples_chat_exchange_and_task_keeps_its_plain_form():
    """The code tasks' plain answers end in MBPP's "[DONE]", which no chat evaluation stops at: a model trained
    on it in a chat wrote "[DONE]" into 58 of its 164 HumanEval programs (NameError, pass@1 0.18 against 0.46)."""
    code = Example("task [BEGIN]\n", "x = 1\n[DONE]", "m1", chat=("task", "```python\nx = 1\n```"))
    assert render(code, "task") == code
    paper = render(code, "paper")
    assert paper.prompt == "<|user|>\ntask\n\n<|assistant|>\n" and paper.response == "```python\nx = 1\n```\n\n"
    assert paper.chat is None and paper.id == "m1"


def test_transfer_identity_holds_the_tasks_transfer_version_from_2_on():
    from pkt_bench.formats import identity

    class Old:
        pass

    class New:
        transfer_version = "2"

    assert identity("paper", Old()) == {"transfer_format": "paper"}  # keys made before the field stay valid
    assert identity("paper", New()) == {"transfer_format": "paper", "transfer_version": "2"}


def test_auto_resolves_per_task_and_bad_names_stop():
    class Benchmark:
        pass

    class Probe:
        transfer_format = "task"

    assert resolve("auto", Benchmark()) == "paper" and resolve("auto", Probe()) == "task"
    assert resolve("chat_template", Probe()) == "chat_template"
    with pytest.raises(UserError, match="transfer_format must be one of auto, paper, task, chat_template"):
        resolve("tulu", Benchmark())
    with pytest.raises(UserError, match="transfer_format"):
        RunSpec.from_dict({"transfer_format": "tulu"})


def test_chat_template_renders_one_user_turn_or_stops_without_a_template(tiny_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["qwen2-student"])
    with pytest.raises(UserError, match="no chat template; pick --transfer-format paper or task"):
        check("chat_template", tokenizer)
    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}[assistant]"
    check("chat_template", tokenizer)
    chat = render(EXAMPLE, "chat_template", tokenizer)
    assert chat.prompt == "[user]Question: 2 + 3?\nAnswer:[assistant]" and chat.response == EXAMPLE.response.strip()


def test_context_hands_out_examples_in_the_runs_format(tiny_models, tmp_path):
    class Words:
        version = "1"

        def transfer_data(self, role):
            return [EXAMPLE]

    pair = ModelPair.resolve(str(tiny_models["llama-teacher"]), str(tiny_models["llama-student"]))
    for name in ("paper", "task"):
        ctx = RunContext(pair, Words(), Budget(), 0, tmp_path, StageMeter(), transfer_format=name)
        assert ctx.examples("seed") == [render(EXAMPLE, name)]


def test_distillation_stops_the_teachers_answers_where_the_format_ends_them(tiny_models, tmp_path, monkeypatch):
    """The task's stops (gsm8k: one line) hold in its own format only: under the chat template an instruct teacher
    answers in several lines, and a cut at the first newline left one sentence to learn (gsm8k score 0)."""
    from pkt_bench.formats import answer_stops
    from pkt_bench.methods.distill import GENERATIONS, Distill, DistillConfig

    assert answer_stops("task", ["\n"]) == ["\n"] and answer_stops("paper", ["\n"]) == ["<|user|>"]
    assert answer_stops("chat_template", ["\n"]) == []

    class OneLine:
        version = "1"
        generation = {"max_new_tokens": 8, "stop": ["\n"]}

        def transfer_data(self, role):
            return [EXAMPLE]

    seen = {}

    def generate(ctx, train, generation, out):
        seen[ctx.transfer_format] = generation["stop"]
        (out / GENERATIONS).write_text(json.dumps({"id": "q1", "prompt": "", "completion": " 5"}) + "\n")

    monkeypatch.setattr(Distill, "generate", staticmethod(generate))
    pair = ModelPair.resolve(str(tiny_models["llama-teacher"]), str(tiny_models["llama-student"]))
    for name in ("task", "paper"):
        ctx = RunContext(pair, OneLine(), Budget(examples=1, epochs=1, batch_size=1), 0, tmp_path / name,
                              StageMeter(), transfer_format=name)
        Distill(DistillConfig()).transfer(ctx)
    assert seen == {"task": ["\n"], "paper": ["<|user|>"]}


def test_the_resolved_format_is_in_the_cell_key_but_not_in_the_references(pico_pair):
    cells = {name: plan(RunSpec(method="lora", transfer_format=name))[0] for name in ("auto", "task", "paper")}
    assert cells["auto"].describe()["transfer_format"] == "task"  # the probe's own format
    assert cells["auto"].key == cells["task"].key != cells["paper"].key
    student = plan(RunSpec(method="student", transfer_format="paper"))[0]
    assert "transfer_format" not in student.describe()
    assert student.key == plan(RunSpec(method="student"))[0].key


def test_budget_presets_set_every_field_and_flags_override_them(tmp_path):
    seeking = make_budget("seeking")
    assert dataclasses.asdict(seeking) == dict(examples=1000, epochs=3, batch_size=8, grad_accum=8, lr=3e-4,
                                               warmup_ratio=0.03, schedule="linear", weight_decay=0.0,
                                               max_grad_norm=1.0, max_length=2048, autocast="off",
                                               group_by_length=False, gradient_checkpointing=False)
    assert seeking.optimizer_steps(1000) == 47  # global batch 64: 375 micro-batches of 8 in groups of 8
    laten = make_budget("laten")
    assert (laten.epochs, laten.batch_size * laten.grad_accum, laten.lr, laten.max_length) == (5, 64, 3e-4, 1024)
    semalign = make_budget("semalign")  # SemAlign v1's Table 5; schedule and warmup not stated there: constant, none
    assert (semalign.examples, semalign.epochs, semalign.batch_size * semalign.grad_accum, semalign.lr,
            semalign.schedule, semalign.warmup_ratio) == (1000, 5, 64, 3e-4, "constant", 0.0)
    # a field added later stays out of keys at its default, so the records stored before it are found again
    assert "schedule" not in seeking.keyed() and semalign.keyed()["schedule"] == "constant"
    with pytest.raises(UserError, match="budget schedule must be one of linear, constant, got 'cosine'"):
        Budget(schedule="cosine")
    spec = RunSpec().with_overrides(budget="seeking", **{"budget.lr": 1e-4})
    assert spec.budget == dataclasses.replace(seeking, lr=1e-4)
    path = tmp_path / "spec.yaml"
    path.write_text("method: lora\nbudget:\n  preset: laten\n  epochs: 3\n")
    assert RunSpec.from_yaml(path).budget == dataclasses.replace(laten, epochs=3)
    path.write_text("method: lora\nbudget: seekng\n")
    with pytest.raises(UserError, match=r"spec.yaml:2: unknown budget preset 'seekng'; presets: seeking, laten, semalign"):
        RunSpec.from_yaml(path)


def test_sensitivity_paper_preset_targets_embeddings():
    from pkt_bench.registry import METHODS

    entry = METHODS.get("sensitivity-paper")
    config = entry.make_config({})
    assert config.embeddings and config.rank == 16 and config.alpha == 16.0 and config.dropout == 0.05
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
